"""The local stack's Python side: the CDN stand-ins' launcher and the stand-ins themselves."""
