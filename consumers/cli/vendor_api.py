"""`cachesync vendor-api get`: a call through the vendor API cache."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from cachesync.consumers.cli.common import (
    console,
    load_settings_or_exit,
    require_services,
)
from cachesync.consumers.cli.terminal import Commands

vendor_api_app = Commands(
    help="Call external vendor APIs through the vendor API cache.", no_args_is_help=True
)


@vendor_api_app.command("get")
def vendor_api_get(
    api: Annotated[str, typer.Argument(help="Integration, as named in topology vendor_apis")],
    path: Annotated[str, typer.Argument(help="Path under the integration's base_url")],
    vendor: Annotated[str, typer.Option(help="Platform vendor id; tags the entry")],
    region: Annotated[str, typer.Option(help="Region whose Redis holds the cache")] = "",
    wedding: Annotated[
        str | None, typer.Option(help="Wedding id, for wedding-scoped calls")
    ] = None,
) -> None:
    """GET through the cache: prints the cache status on stderr, the JSON body on stdout."""
    import json

    from cachesync.consumers.errors import VendorApiError
    from cachesync.consumers.vendor_api import VendorApiClient, VendorResponse

    settings = load_settings_or_exit()
    region = region or settings.topology.default_region
    if region not in settings.region_redis_urls:
        console.print(f"[red]unknown region {region!r}[/red]")
        raise typer.Exit(2)
    require_services(settings, kafka=False, regions=[region])

    async def fetch() -> VendorResponse:
        url = settings.region_redis_urls[region]
        async with VendorApiClient.from_topology(settings.topology, url) as client:
            return await client.get(api, path, vendor_id=vendor, wedding_id=wedding)

    try:
        response = asyncio.run(fetch())
    except VendorApiError as exc:
        console.print(f"[red]{type(exc).__name__}:[/red] {exc}")
        raise typer.Exit(1) from None
    reason = f" ({response.stale_reason}: {response.error or ''})" if response.is_stale else ""
    console.print(f"{response.cache_status}{reason} age={response.age_s:.0f}s {response.url}")
    typer.echo(json.dumps(response.json(), indent=2))
