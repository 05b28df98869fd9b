"""Choosing and starting the wire encoding from settings.

Single-object encoding needs nothing but `schemas/`; the Confluent format needs a
registry, which is contacted at start to register (and learn the ids of) every
schema version.
"""

from __future__ import annotations

from consumers.errors import TransientError
from consumers.settings import Settings
from schemas import Codec, ConfluentCodec, RegistryUnavailable, SingleObjectCodec


def codec_for(settings: Settings) -> Codec:
    if settings.encoding == "confluent":
        assert settings.schema_registry_url is not None  # enforced by Settings
        return ConfluentCodec(settings.catalog, str(settings.schema_registry_url))
    return SingleObjectCodec(settings.catalog)


async def start_codec(codec: Codec) -> None:
    if isinstance(codec, ConfluentCodec):
        try:
            await codec.start()
        except RegistryUnavailable as exc:
            raise TransientError(str(exc)) from exc


async def close_codec(codec: Codec) -> None:
    if isinstance(codec, ConfluentCodec):
        await codec.close()


async def resolve(codec: Codec, data: bytes) -> None:
    """Fetch what decoding `data` needs; a registry outage is transient (batch retried)."""
    try:
        await codec.resolve(data)
    except RegistryUnavailable as exc:
        raise TransientError(str(exc)) from exc
