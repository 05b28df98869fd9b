"""Kafka clients as every role and tool makes them: where the cluster is and how to log in
(`KafkaConnection`), producer and consumer settings, partition lookup.

Every client in cachesync is built here, from one `KafkaConnection`: the home cluster
(`KAFKA_BOOTSTRAP_SERVERS`) or the cluster a region's sinks read
(`KAFKA_BOOTSTRAP_SERVERS_<REGION>`, fed by MirrorMaker 2), with the security settings
(`KAFKA_SECURITY_PROTOCOL`, `KAFKA_SASL_*`, `KAFKA_SSL_*`) turned into aiokafka's options
in `KafkaConnection.client_options` alone. A bare broker list, as tests and benchmarks
pass, is a PLAINTEXT cluster.

Producers are idempotent with acks=all (a retried send is never a duplicate), and
consumers never auto-commit: the commit-after-effect loop (`loop.py`) owns commits.

A login the cluster refuses (a wrong password, an unknown mechanism, a certificate it
does not trust or that does not trust it) is mapped here, once, to a `ConfigError`
naming the variables (`check_login`): aiokafka would log it and retry for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner
from murmurhash2 import murmurhash2 as _murmurhash2
from pydantic import SecretStr

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.settings import Settings

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"

_SASL_REFUSED = (SaslAuthenticationFailed, UnsupportedSaslMechanismError, IllegalSaslStateError)


@dataclass(frozen=True)
class KafkaConnection:
    """One cluster's address and how to log in to it: what every Kafka client is built from.

    >>> KafkaConnection("127.0.0.1:19092").client_options()
    {'bootstrap_servers': '127.0.0.1:19092', 'security_protocol': 'PLAINTEXT'}
    """

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = field(default=None, repr=False)
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = field(default=None, repr=False)
    # Which variable set bootstrap_servers, for messages: KAFKA_BOOTSTRAP_SERVERS[_<REGION>].
    bootstrap_variable: str = "KAFKA_BOOTSTRAP_SERVERS"

    @classmethod
    def of(cls, settings: Settings, region: str | None = None) -> KafkaConnection:
        """The home cluster (`region` None: the mapper, the tools), or the cluster `region`'s
        sinks read. Every cluster is reached with the same security settings."""
        return cls(
            bootstrap_servers=settings.kafka_bootstrap_for(region),
            security_protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_username=settings.kafka_sasl_username,
            sasl_password=settings.kafka_sasl_password,
            ssl_cafile=settings.kafka_ssl_cafile,
            ssl_certfile=settings.kafka_ssl_certfile,
            ssl_keyfile=settings.kafka_ssl_keyfile,
            ssl_key_password=settings.kafka_ssl_key_password,
            bootstrap_variable=settings.kafka_bootstrap_variable(region),
        )

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    def client_options(self) -> dict[str, Any]:
        """The keyword arguments every aiokafka client (producer, consumer, admin) takes for
        this cluster: the address, the protocol, the TLS context and the SASL login."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.uses_tls:
            options["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        return options

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the brokers against KAFKA_SSL_CAFILE (the system's CAs when unset, as a
        managed cluster needs) and presents the client certificate when one is set."""
        try:
            context: ssl.SSLContext = create_ssl_context(
                cafile=self.ssl_cafile,
                certfile=self.ssl_certfile,
                keyfile=self.ssl_keyfile,
                password=(
                    self.ssl_key_password.get_secret_value() if self.ssl_key_password else None
                ),
            )
        except (ssl.SSLError, OSError) as exc:
            files = "KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE / KAFKA_SSL_KEY_PASSWORD"
            if self.ssl_cafile is not None and not _loads_as_ca(self.ssl_cafile):
                files = f"KAFKA_SSL_CAFILE={self.ssl_cafile}"
            raise ConfigError(f"{files}: cannot be used for TLS ({exc})") from None
        return context


Cluster: TypeAlias = KafkaConnection | str


def regional_clusters(settings: Settings) -> dict[str, KafkaConnection]:
    """The regions whose sinks read a cluster of their own (KAFKA_BOOTSTRAP_SERVERS_<REGION>
    names one other than home's), each with it; in production, every region but home."""
    home = settings.kafka_bootstrap_for(None)
    return {
        region: KafkaConnection.of(settings, region)
        for region in settings.topology.regions
        if settings.kafka_bootstrap_for(region) != home
    }


def connection(cluster: Cluster) -> KafkaConnection:
    """A bare broker list is a PLAINTEXT cluster (tests, benchmarks)."""
    return cluster if isinstance(cluster, KafkaConnection) else KafkaConnection(cluster)


def _loads_as_ca(path: Path) -> bool:
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError):
        return False
    return True


async def check_login(cluster: Cluster, *, timeout_s: float = 10.0) -> None:
    """Log in to one broker of the cluster, so that a wrong password or certificate stops a
    start with one line (a ConfigError naming the variables) instead of clients retrying
    a login that can never succeed. A broker that does not answer is left to the caller's
    reachability check and the clients' own retries; PLAINTEXT has no login to check."""
    kafka = connection(cluster)
    if kafka.security_protocol == "PLAINTEXT":
        return
    options = kafka.client_options()
    del options["bootstrap_servers"]
    for address in kafka.bootstrap_servers.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host,
                    int(port),
                    client_id="cachesync-login",
                    request_timeout_ms=int(timeout_s * 1000),
                    **options,
                ),
                timeout_s,
            )
        except _SASL_REFUSED as exc:
            raise ConfigError(
                f"KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD / KAFKA_SASL_MECHANISM: "
                f"{address} refused the login ({kafka.sasl_mechanism} as "
                f"{kafka.sasl_username!r}): {_broker_message(exc)}"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise ConfigError(
                f"KAFKA_SSL_CAFILE={kafka.ssl_cafile or '(system CAs)'}: the certificate of "
                f"{address} is not trusted ({exc.verify_message})"
            ) from None
        except ssl.SSLError as exc:
            raise ConfigError(
                f"KAFKA_SECURITY_PROTOCOL={kafka.security_protocol} / KAFKA_SSL_CERTFILE: the "
                f"TLS handshake with {address} failed ({exc.reason or exc})"
            ) from None
        except KafkaConnectionError:
            # It took the connection, then closed it before answering: it speaks another
            # protocol on this port, or wants a client certificate it did not get.
            cert = "" if kafka.ssl_certfile or not kafka.uses_tls else " / KAFKA_SSL_CERTFILE"
            raise ConfigError(
                f"KAFKA_SECURITY_PROTOCOL={kafka.security_protocol}{cert}: {address} closed "
                "the connection during the login (another protocol on this port, or a client "
                "certificate required?)"
            ) from None
        except (KafkaError, OSError, TimeoutError):
            continue  # this broker does not answer: try the next, then let the clients wait

        else:
            with contextlib.suppress(Exception):
                conn.close()
            return


def _broker_message(exc: KafkaError) -> str:
    """The broker's own words (aiokafka puts them in the error's args)."""
    return " ".join(str(a) for a in exc.args if a) or type(exc).__name__


# The seed Kafka's murmur2 starts from.
_KAFKA_SEED = 0x9747B28C


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2): MurmurHash2 with
    Kafka's seed, in C. aiokafka's is pure Python, some 6 us for an event id against
    0.5, and every sink hashes the event id of every command it audits."""
    return int(_murmurhash2(data, _KAFKA_SEED))


class Murmur2Partitioner:
    """The default partitioner's choice: murmur2 of the key, as every Kafka client makes
    it, so that other producers agree on where a key lands. (It was memoized per key while
    the hash was pure Python; in C the hash costs about what the lookup did.)"""

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(DefaultPartitioner()(key, all_partitions, available))
        return all_partitions[(murmur2(key) & 0x7FFFFFFF) % len(all_partitions)]


def make_producer(cluster: Cluster, *, client_id: str, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        **connection(cluster).client_options(),
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_batch_size": 256 * 1024,
        "max_request_size": 2 * 1024 * 1024,
        "partitioner": Murmur2Partitioner(),
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(
    cluster: Cluster, *topics: str, group_id: str | None, client_id: str, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer in `group_id`, or (None) one that assigns partitions itself and commits nothing."""
    options: dict[str, Any] = {
        **connection(cluster).client_options(),
        "group_id": group_id,
        "client_id": client_id,
        "enable_auto_commit": False,
        # A new group starts at the beginning: losing events is worse than re-purging.
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 2 * 1024 * 1024,
        # What one fetch may bring in all (aiokafka's default is 50 MiB): with a backlog,
        # every partition's 2 MiB came at once, so memory grew with the backlog (a Redis
        # sink's peak: 88 MB at a 10,000-event backlog, 104 at 100,000; 89-90 at both with
        # this). 8 MiB is still some forty batches ahead of the handler; a message larger
        # than this still comes, alone.
        "fetch_max_bytes": 8 * 1024 * 1024,
        "fetch_max_wait_ms": 100,
        "session_timeout_ms": 15000,
        "heartbeat_interval_ms": 3000,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def make_admin(cluster: Cluster, *, client_id: str, **overrides: Any) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        **{**connection(cluster).client_options(), "client_id": client_id, **overrides}
    )


async def partitions_of(cluster: Cluster, topics: list[str]) -> list[TopicPartition]:
    """Every partition of the given topics, from the cluster's metadata."""
    admin = make_admin(cluster, client_id="cachesync-meta")
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return sorted(
        (TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]),
        key=lambda tp: (tp.topic, tp.partition),
    )
