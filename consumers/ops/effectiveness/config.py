"""Where each tier's counters are read, from the environment.

The Redis servers, Cloudflare zones and CloudFront distributions are the pipeline's own
(`Settings`). What only this tool needs is here: the varnishd instance behind each region's
edge (`VARNISH_INSTANCE_<REGION>`, else `VARNISH_INSTANCE`, else the local stack's), the
CloudWatch endpoint, and the recorder's interval, retention and invalidation window.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.settings import Settings, region_var

# The local stack's varnishd (deploy/local/up.d/varnish.sh starts it with this -n).
LOCAL_VARNISH = Path(os.environ.get("CACHESYNC_STACK_DIR", ".stack")) / "varnish" / "work"


class EffectivenessSettings(BaseSettings):
    """The recorder's and the report's own settings (`CACHESYNC_EFFECTIVENESS_*` and a few more)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    varnish_instance: str | None = Field(
        default=None,
        alias="VARNISH_INSTANCE",
        description="varnishd -n of every region's edge (VARNISH_INSTANCE_<REGION> per region)",
    )
    cloudwatch_endpoint_url: str | None = Field(
        default=None,
        alias="CLOUDWATCH_ENDPOINT_URL",
        description="CloudWatch endpoint; unset: CLOUDFRONT_ENDPOINT_URL when that is set "
        "(one stand-in serves both), else AWS's own",
    )
    interval_s: float = Field(default=5.0, gt=0, alias="CACHESYNC_EFFECTIVENESS_INTERVAL_S")
    retention_s: int = Field(default=6 * 3600, ge=60, alias="CACHESYNC_EFFECTIVENESS_RETENTION_S")
    window_s: float = Field(
        default=10.0,
        gt=0,
        alias="CACHESYNC_INVALIDATION_WINDOW_S",
        description="N: misses and origin requests in the N s after a purge are its cost",
    )
    redis_key_events: Literal["enable", "use", "off"] = Field(
        default="use",
        alias="CACHESYNC_REDIS_KEY_EVENTS",
        description="per-key misses and refills from Redis keyspace notifications: 'enable' "
        "turns them on (CONFIG SET), 'use' reads them where the server already sends them",
    )
    cloudflare_edge_url: str | None = Field(
        default=None,
        alias="CLOUDFLARE_EDGE_URL",
        description="where guests reach the Cloudflare zones (the local stand-in); the demo's guests only",
    )

    def varnish_instances(self, settings: Settings) -> dict[str, str]:
        """Region -> the absolute -n of the varnishd behind its edge (regions may share one)."""
        out: dict[str, str] = {}
        for region in settings.topology.regions:
            name = os.environ.get(region_var("VARNISH_INSTANCE_", region)) or self.varnish_instance
            if not name and LOCAL_VARNISH.is_dir():
                name = str(LOCAL_VARNISH)
            if name:
                # varnishstat resolves a relative -n against its own directory, not ours.
                out[region] = str(Path(name).resolve()) if "/" in name else name
        return out

    def cloudwatch_endpoint(self, settings: Settings) -> str | None:
        return self.cloudwatch_endpoint_url or settings.cloudfront_endpoint_url


def load_effectiveness_settings() -> EffectivenessSettings:
    try:
        return EffectivenessSettings()
    except ValidationError as exc:
        fields = EffectivenessSettings.model_fields
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            alias = fields[name].alias if name in fields and fields[name].alias else name
            lines.append(f"{alias}: {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(lines)) from None
