"""The bus's own connections: read from the Redis URL, opened and logged in by hand."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker_node.cluster.endpoint import RedisEndpoint
from broker_node.cluster.keys import RedisKeys
from broker_node.cluster.redis import RedisBus
from broker_node.errors import BackendUnavailable, ConfigurationError
from shared.ids import NodeId
from tests.support.redis_server import RedisServer


def test_tcp_url_with_user_password_and_db() -> None:
    endpoint = RedisEndpoint.from_url("redis://bus:p%40ss@redis.example:6380/2")
    assert (endpoint.host, endpoint.port, endpoint.path) == ("redis.example", 6380, None)
    assert (endpoint.username, endpoint.password, endpoint.db) == ("bus", "p@ss", 2)
    assert endpoint.tls is None
    assert endpoint.handshake() == [(b"AUTH", b"bus", b"p@ss"), (b"SELECT", b"2")]
    assert "p@ss" not in repr(endpoint)


def test_defaults_send_no_handshake() -> None:
    endpoint = RedisEndpoint.from_url("redis://redis")
    assert (endpoint.host, endpoint.port, endpoint.db) == ("redis", 6379, 0)
    assert endpoint.handshake() == []
    assert RedisEndpoint.from_url("redis://:secret@redis").handshake() == [(b"AUTH", b"secret")]


def test_unix_socket_url() -> None:
    endpoint = RedisEndpoint.from_url("unix://bus:pw@/run/redis.sock?db=3")
    assert (endpoint.path, endpoint.username, endpoint.password, endpoint.db) == (
        "/run/redis.sock",
        "bus",
        "pw",
        3,
    )


def test_tls_url_verifies_by_default_and_can_be_told_not_to() -> None:
    verified = RedisEndpoint.from_url("rediss://redis.example:6380")
    assert verified.tls is not None
    assert verified.tls.verify_mode == ssl.CERT_REQUIRED and verified.tls.check_hostname
    unverified = RedisEndpoint.from_url("rediss://redis.example?ssl_cert_reqs=none")
    assert unverified.tls is not None
    assert unverified.tls.verify_mode == ssl.CERT_NONE and not unverified.tls.check_hostname


def test_resp3_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        RedisEndpoint.from_url("redis://redis?protocol=3")


@pytest.mark.parametrize("url", ["http://redis", "rediss://redis?ssl_cert_reqs=maybe"])
def test_a_url_the_bus_cannot_use_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        RedisEndpoint.from_url(url)


def test_a_client_certificate_from_the_url_is_loaded(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bus")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "bus.crt", tmp_path / "bus.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    endpoint = RedisEndpoint.from_url(
        f"rediss://redis.example?ssl_certfile={cert_file}&ssl_keyfile={key_file}"
    )
    assert endpoint.tls is not None
    # A wrong key for the certificate is refused while loading: the pair was loaded.
    other = tmp_path / "other.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ssl.SSLError):
        RedisEndpoint.from_url(
            f"rediss://redis.example?ssl_certfile={cert_file}&ssl_keyfile={other}"
        )


@pytest.fixture(scope="module")
def acl_server() -> Iterator[tuple[RedisServer, Path]]:
    folder = Path(tempfile.mkdtemp(prefix="redis-sock-"))
    sock = folder / "redis.sock"
    server = RedisServer(
        password="default-pw",
        extra_args=[
            "--unixsocket", str(sock),
            "--unixsocketperm", "700",
            "--user", "bus", "on", ">bus-pw", "~*", "&*", "+@all",
        ],
    )  # fmt: skip
    with server:
        yield server, sock


async def _round_trip(url: str) -> bytes:
    bus = RedisBus(RedisEndpoint.from_url(url), RedisKeys("endpoint-test"), timeout=10)
    received: asyncio.Queue[bytes] = asyncio.Queue()
    results: asyncio.Queue[list[int] | BackendUnavailable] = asyncio.Queue()
    try:
        async with bus.subscribe(NodeId("n1"), received.put_nowait):
            bus.send([(NodeId("n1"), b"hello")], results.put_nowait)
            async with asyncio.timeout(10):
                assert await results.get() == [1]
                return await received.get()
    finally:
        await bus.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis://:default-pw@127.0.0.1:{port}/0",
        "redis://bus:bus-pw@127.0.0.1:{port}/3",
        "unix://bus:bus-pw@{sock}?db=5",
    ],
)
async def test_the_bus_logs_in_over_tcp_and_unix_sockets(
    acl_server: tuple[RedisServer, Path], url: str
) -> None:
    server, sock = acl_server
    assert await _round_trip(url.format(port=server.port, sock=sock)) == b"hello"


async def test_a_wrong_password_is_backend_unavailable_with_the_reason(
    acl_server: tuple[RedisServer, Path],
) -> None:
    server, _ = acl_server
    bus = RedisBus(
        RedisEndpoint.from_url(f"redis://bus:wrong@127.0.0.1:{server.port}/0"),
        RedisKeys("endpoint-test"),
        timeout=10,
    )
    try:
        with pytest.raises(BackendUnavailable, match="WRONGPASS"):
            async with bus.subscribe(NodeId("n1"), lambda payload: None):
                pass
    finally:
        await bus.aclose()
