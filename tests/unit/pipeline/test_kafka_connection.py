"""Kafka security settings, the one place that turns them into client options, and the rule
that every Kafka client is built there."""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path

import pytest

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.pipeline.kafka import KafkaConnection, regional_clusters
from cachesync.consumers.settings import load_settings

REPO = Path(__file__).resolve().parents[3]
SECRET = "s3cret-not-to-print"


@pytest.fixture(autouse=True)
def _clean_kafka_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KAFKA_"):
            monkeypatch.delenv(name)


@pytest.fixture
def cafile() -> Path:
    """A PEM file of CAs that loads (certifi's bundle, which httpx brings)."""
    import certifi

    return Path(certifi.where())


def test_sasl_ssl_settings_become_client_options(
    monkeypatch: pytest.MonkeyPatch, cafile: Path
) -> None:
    """SASL_SSL with SCRAM: protocol, mechanism, user, the password's value and a TLS
    context that verifies against the CA file; the password never in a repr."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "b-1.example:9096,b-2.example:9096")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "cachesync")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(cafile))
    settings = load_settings()
    kafka = KafkaConnection.of(settings)
    options = kafka.client_options()
    assert options["bootstrap_servers"] == "b-1.example:9096,b-2.example:9096"
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "cachesync"
    assert options["sasl_plain_password"] == SECRET
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert SECRET not in repr(settings) and SECRET not in repr(kafka)


def test_plaintext_has_no_tls_and_no_login() -> None:
    options = KafkaConnection.of(load_settings()).client_options()
    assert options == {"bootstrap_servers": "127.0.0.1:19092", "security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN"},
            "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD must be set when "
            "KAFKA_SECURITY_PROTOCOL=SASL_SSL",
        ),
        (
            {"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": SECRET},
            "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD set, but KAFKA_SECURITY_PROTOCOL=PLAINTEXT "
            "has no SASL login",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI"},
            "KAFKA_SASL_MECHANISM: Input should be 'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512'",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "TLS"},
            "KAFKA_SECURITY_PROTOCOL: Input should be 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or "
            "'SASL_SSL'",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
            "KAFKA_SSL_CAFILE: Path does not point to a file",
        ),
        (
            {"KAFKA_BOOTSTRAP_SERVERS_EU_WEST": "eu-west-kafka"},
            "KAFKA_BOOTSTRAP_SERVERS_EU_WEST: expected host:port",
        ),
    ],
)
def test_a_wrong_security_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and SECRET not in str(caught.value)


def test_tls_files_need_a_tls_protocol_and_a_key_needs_its_certificate(
    monkeypatch: pytest.MonkeyPatch, cafile: Path
) -> None:
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(cafile))
    with pytest.raises(ConfigError, match="KAFKA_SSL_CAFILE set, but KAFKA_SECURITY_PROTOCOL"):
        load_settings()
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KAFKA_SSL_KEYFILE", str(cafile))
    with pytest.raises(ConfigError, match="KAFKA_SSL_KEYFILE / KAFKA_SSL_KEY_PASSWORD need"):
        load_settings()


def test_a_ca_file_that_is_not_pem_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KAFKA_SSL_CAFILE", str(bad))
    kafka = KafkaConnection.of(load_settings())
    with pytest.raises(ConfigError, match=f"KAFKA_SSL_CAFILE={re.escape(str(bad))}: cannot be"):
        kafka.client_options()


def test_a_region_reads_its_own_cluster_when_it_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """KAFKA_BOOTSTRAP_SERVERS_EU_WEST moves eu-west's sinks; the other regions stay home."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "home:9092")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS_EU_WEST", "eu-west:9092")
    settings = load_settings()
    assert KafkaConnection.of(settings).bootstrap_servers == "home:9092"
    assert KafkaConnection.of(settings, "us-east").bootstrap_servers == "home:9092"
    eu = KafkaConnection.of(settings, "eu-west")
    assert eu.bootstrap_servers == "eu-west:9092"
    assert eu.bootstrap_variable == "KAFKA_BOOTSTRAP_SERVERS_EU_WEST"
    assert list(regional_clusters(settings)) == ["eu-west"]


# What may build a Kafka client outside pipeline/kafka.py: nothing in the package.
CLIENT_CONSTRUCTION = re.compile(
    r"\b(AIOKafkaConsumer|AIOKafkaProducer|AIOKafkaAdminClient|AIOKafkaClient)\("
    r"(?!\s*\*\*(kafka\.client_options|options))"
)


def test_every_kafka_client_is_built_from_the_connection_settings() -> None:
    """Outside pipeline/kafka.py, a client is made from `KafkaConnection.client_options()`
    (so it logs in like every other), and nothing passes the bare home address to one."""
    offenders = []
    for path in [
        *REPO.joinpath("consumers").rglob("*.py"),
        *REPO.joinpath("topology").rglob("*.py"),
    ]:
        if path == REPO / "consumers/pipeline/kafka.py":
            continue
        text = path.read_text()
        for match in CLIENT_CONSTRUCTION.finditer(text):
            offenders.append(f"{path.relative_to(REPO)}: {match.group(0).strip()}")
        for line in text.splitlines():
            if "settings.kafka_bootstrap_servers," in line or "kafka_bootstrap_servers)" in line:
                offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert not offenders, offenders
