"""Deployment material; `deploy.local` is the local stack's Python side."""
