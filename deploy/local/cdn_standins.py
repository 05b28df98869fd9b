"""Local stand-ins for the CDN APIs that cannot be reached from here, for `make run`.

One process serves the Cloudflare purge_cache API stub (the contract-faithful stub the
tests use, `deploy/local/standins/cloudflare.py`) and moto's CloudFront in server mode,
creates one CloudFront distribution per region, and writes the environment that points
cachesync at them to `$CACHESYNC_STACK_DIR/cdn.env` (sourced by `make run`). The Cloudflare
stub is also each region's zone as an edge, in front of the local origin (ORIGIN_PORT), for
the regions' public hosts: `CLOUDFLARE_EDGE_URL` is where guests send their GETs.

Usage, from the repository root:
    python -m deploy.local.cdn_standins CLOUDFLARE_PORT MOTO_PORT ENV_FILE
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
from moto.server import ThreadedMotoServer

from cachesync.consumers.settings import region_var
from cachesync.topology import load_topology
from deploy.local.standins.aws import create_distribution
from deploy.local.standins.cloudflare import CloudflareStub

TOKEN = "local-cloudflare-token"  # the stub's; a real token only ever comes from the environment


def main(cloudflare_port: int, moto_port: int, env_file: Path) -> None:
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{moto_port}"
    lines = [
        f"CLOUDFLARE_API_URL=http://127.0.0.1:{cloudflare_port}",
        f"CLOUDFLARE_API_TOKEN={TOKEN}",
        f"CLOUDFRONT_ENDPOINT_URL={endpoint}",
        "AWS_ACCESS_KEY_ID=testing",
        "AWS_SECRET_ACCESS_KEY=testing",
        "AWS_DEFAULT_REGION=us-east-1",
        f"CLOUDFLARE_EDGE_URL=http://127.0.0.1:{cloudflare_port}",
    ]
    zone_hosts: dict[str, str] = {}
    for region, spec in load_topology().regions.items():
        lines.append(f"{region_var('CLOUDFLARE_ZONE_', region)}=local-zone-{region}")
        if spec.public_url:
            zone_hosts[urlsplit(spec.public_url).netloc] = f"local-zone-{region}"
        distribution = create_distribution(endpoint, f"local {region}")
        lines.append(f"{region_var('CLOUDFRONT_DISTRIBUTION_', region)}={distribution}")
    tmp = env_file.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(env_file)  # appears whole: up.d/cdn.sh waits for it
    # A generous rate: locally the stub stands in for an Enterprise zone (50 req/s).
    origin = f"http://127.0.0.1:{os.environ.get('ORIGIN_PORT', '16090')}"
    stub = CloudflareStub(token=TOKEN, origin_url=origin, zone_hosts=zone_hosts)
    stub.set_rate(50, 50)
    uvicorn.run(stub.app, host="127.0.0.1", port=cloudflare_port, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
