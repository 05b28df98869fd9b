"""Choosing and starting the wire encoding from settings.

Single-object encoding needs nothing but `schemas/`; the Confluent format needs a
registry, which is contacted at start to register (and learn the ids of) every
schema version.
"""

from __future__ import annotations

from cachesync.consumers.errors import Oversized, TransientError
from cachesync.consumers.mapping.validation import validate_event
from cachesync.consumers.settings import Settings
from cachesync.schemas import (
    Codec,
    ConfluentCodec,
    Decoded,
    RegistryUnavailable,
    SingleObjectCodec,
)


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


async def decode(codec: Codec, data: bytes) -> Decoded:
    """Resolve and decode one message; what does not decode raises the schemas package's
    SerdeError, which is a BadInput (one error tree, see consumers/errors.py)."""
    await resolve(codec, data)
    return codec.decode(data)


async def decode_event(codec: Codec, data: bytes, *, max_bytes: int) -> Decoded:
    """A platform event as the mapper (live or replaying) accepts it: within the size
    limit, decodable, and passing the field checks; BadInput with the reason if not."""
    if len(data) > max_bytes:
        raise Oversized(f"{len(data)} bytes > limit {max_bytes}")
    decoded = await decode(codec, data)
    validate_event(decoded.type_name, decoded.record)
    return decoded
