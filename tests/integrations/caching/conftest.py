"""Fixtures for the CDN tests: the local Varnish edge, a Cloudflare API stub, moto for CloudFront."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from deploy.local.standins.aws import create_distribution, moto_server
from deploy.local.standins.cloudflare import CloudflareStub
from deploy.local.standins.serve import serve
from tests.conftest import REPO

CLOUDFLARE_TOKEN = "test-cloudflare-token"


@pytest.fixture(scope="session")
def edge(services: dict[str, str]) -> str:
    """The local Varnish edge (deploy/local/up.d/varnish.sh), or CACHESYNC_EDGE_URL if set."""
    url = os.environ.get("CACHESYNC_EDGE_URL")
    if not url:
        proc = subprocess.run(
            ["bash", str(REPO / "deploy/local/up.sh")], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            pytest.fail(f"deploy/local/up.sh failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
        url = f"http://127.0.0.1:{os.environ.get('VARNISH_PORT', '16081')}"
    response = httpx.get(f"{url}/_health", timeout=5)
    assert response.status_code == 200, f"the edge at {url} does not answer: {response}"
    return url


@dataclass
class CloudflareApi:
    stub: CloudflareStub
    url: str
    token: str = CLOUDFLARE_TOKEN


@pytest.fixture
def cloudflare_api() -> Iterator[CloudflareApi]:
    """A fresh Cloudflare API stub on a loopback port, per test."""
    stub = CloudflareStub(token=CLOUDFLARE_TOKEN)
    with serve(stub.app) as url:
        yield CloudflareApi(stub, url)


@pytest.fixture(scope="session")
def cloudfront_endpoint() -> Iterator[str]:
    """moto in server mode, with dummy credentials for the clients."""
    with moto_server() as url:
        yield url


@pytest.fixture
def distribution(cloudfront_endpoint: str) -> str:
    return create_distribution(cloudfront_endpoint, comment=f"test {uuid.uuid4().hex[:6]}")
