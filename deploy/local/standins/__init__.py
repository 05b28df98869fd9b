"""Stand-ins for what cannot be reached from a laptop, shared by the local stack, bench/ and tests/.

- `cloudflare`: the Cloudflare purge_cache API, keeping the real contract;
- `aws`: moto's CloudFront in server mode, and a distribution in it;
- `vendor_api`: a vendor API that caches like a real one (and `vendor_api_worker`,
  one process of the cross-process coalescing test);
- `origin`: the local edge's origin, whose pages carry surrogate keys;
- `serve`: serving any of the ASGI ones with uvicorn on a free loopback port.

Importing this package imports nothing else: `origin` runs on the standard library
alone (before the project's virtualenv exists), the others need the test extras.
"""
