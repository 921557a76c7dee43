"""Upstream TLS per channel: a private CA, a client certificate, verification never off."""

from __future__ import annotations

import os
import ssl
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from channel import Channel
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from proxy import Proxy, check_invariants
from upstream import FakeUpstream

from condaproxy.conda.paths import Request, parse_path
from condaproxy.config.load import load_config
from condaproxy.config.model import ChannelConfig, Config
from condaproxy.config.tls import TlsIdentity, TlsSetupError, build_context
from condaproxy.errors import ConfigError, UpstreamUnavailable
from condaproxy.upstream.client import Upstream

CH = "/testchan"


@dataclass(frozen=True)
class Pki:
    """A test CA with a server certificate (127.0.0.1, localhost) and a client certificate."""

    ca: trustme.CA
    server: trustme.LeafCert
    ca_file: Path
    cert_file: Path
    key_file: Path
    both_file: Path  # client certificate and key in one PEM
    other_ca_file: Path  # a CA that signed nothing here
    other_key_file: Path  # a key that matches no certificate here

    def server_context(self, *, require_client_cert: bool = True) -> ssl.SSLContext:
        """A server context; with require_client_cert, clients without a certificate are refused."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(ctx)
        self.ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        return ctx


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates and keys on disk, made once per session."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("condaproxy@example.test")
    ca.cert_pem.write_to_path(d / "ca.pem")
    client.cert_chain_pems[0].write_to_path(d / "client.pem")
    client.private_key_pem.write_to_path(d / "client.key")
    client.private_key_and_cert_chain_pem.write_to_path(d / "client-both.pem")
    other = trustme.CA()
    other.cert_pem.write_to_path(d / "other-ca.pem")
    other.issue_cert("x@example.test").private_key_pem.write_to_path(d / "other.key")
    return Pki(
        ca,
        server,
        d / "ca.pem",
        d / "client.pem",
        d / "client.key",
        d / "client-both.pem",
        d / "other-ca.pem",
        d / "other.key",
    )


@pytest.fixture
async def https_upstream(channel: Channel, pki: Pki) -> AsyncIterator[FakeUpstream]:
    """The test channel over https, refusing clients without a certificate from the test CA."""
    server = FakeUpstream()
    server.mount("testchan", channel.path)
    await server.start(ssl_context=pki.server_context())
    try:
        yield server
    finally:
        await server.close()


def ini_config(tmp_path: Path, channels: dict[str, dict[str, str]]) -> Config:
    """A proxy config file with only the given [channel:NAME] sections served, loaded."""
    lines = [
        "[lazy]",
        "streamer_interface = 127.0.0.1",
        "[cache]",
        f"directory = {tmp_path / 'cache'}",
        "[upstream]",
        "allow_unlisted = no",
        "connect_timeout = 5",
        "read_timeout = 5",
    ]
    for name, keys in channels.items():
        lines.append(f"[channel:{name}]")
        lines += [f"{key} = {value}" for key, value in keys.items()]
    path = tmp_path / "proxy.ini"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


def certified_config(tmp_path: Path, upstream: FakeUpstream, pki: Pki) -> Config:
    """testchan from the https upstream, trusting the test CA and presenting its client certificate."""
    keys = {"ca_bundle": pki.ca_file, "client_cert": pki.cert_file, "client_key": pki.key_file}
    return ini_config(
        tmp_path, {"testchan": {"url": f"{upstream.url}/testchan", **{k: str(v) for k, v in keys.items()}}}
    )


async def started(config: Config) -> Proxy:
    return await Proxy(config).start()


# --- end to end ---------------------------------------------------------------------


async def test_ca_bundle_and_client_certificate_serve_and_cache(
    tmp_path: Path, https_upstream: FakeUpstream, channel: Channel, pki: Pki
) -> None:
    config = certified_config(tmp_path, https_upstream, pki)
    proxy = await started(config)
    try:
        pkg = channel.by_name("cp-app")
        first = await proxy.get(f"{CH}/{pkg.url_path}")
        assert first.status == 200 and first.error is None
        assert first.body == pkg.read_bytes()
        await proxy.idle()
        again = await proxy.get(f"{CH}/{pkg.url_path}")
        assert again.xcache == "HIT" and again.body == pkg.read_bytes()
        assert https_upstream.count(f"{CH}/{pkg.url_path}") == 1
        assert ("testchan", "noarch", pkg.filename) in check_invariants(config.cache.directory)
        parsed = parse_path(f"{CH}/{pkg.url_path}")
        assert isinstance(parsed, Request)
        unit = await proxy.services.catalog.get(parsed.key)
        assert unit is not None and unit.upstream_url == f"{https_upstream.url}/testchan/{pkg.url_path}"
    finally:
        await proxy.close()


async def test_key_inside_the_certificate_file_works(
    tmp_path: Path, https_upstream: FakeUpstream, pki: Pki
) -> None:
    config = ini_config(
        tmp_path,
        {
            "testchan": {
                "url": f"{https_upstream.url}/testchan",
                "ca_bundle": str(pki.ca_file),
                "client_cert": str(pki.both_file),
            }
        },
    )
    proxy = await started(config)
    try:
        assert (await proxy.get(f"{CH}/noarch/repodata.json")).status == 200
    finally:
        await proxy.close()


async def test_without_client_certificate_is_502_with_a_reason(
    tmp_path: Path, https_upstream: FakeUpstream, pki: Pki
) -> None:
    config = ini_config(
        tmp_path,
        {
            "testchan": {
                "url": f"{https_upstream.url}/testchan",
                "ca_bundle": str(pki.ca_file),
            }
        },
    )
    proxy = await started(config)
    try:
        resp = await proxy.get(f"{CH}/noarch/repodata.json")
        assert resp.status == 502
        assert "client certificate" in resp.body.decode(), resp.body
        await proxy.idle()
        assert check_invariants(config.cache.directory) == []
    finally:
        await proxy.close()


@pytest.mark.parametrize("trust", ["other CA", "system CAs"])
async def test_untrusted_upstream_is_502_never_unverified(
    tmp_path: Path, https_upstream: FakeUpstream, pki: Pki, trust: str
) -> None:
    keys = {
        "url": f"{https_upstream.url}/testchan",
        "client_cert": str(pki.cert_file),
        "client_key": str(pki.key_file),
    }
    if trust == "other CA":
        keys["ca_bundle"] = str(pki.other_ca_file)
    proxy = await started(ini_config(tmp_path, {"testchan": keys}))
    try:
        resp = await proxy.get(f"{CH}/noarch/repodata.json")
        assert resp.status == 502
        assert "certificate verify failed" in resp.body.decode()
        # The handshake failed, so no request, and no body, ever went to the upstream.
        assert https_upstream.requests == []
    finally:
        await proxy.close()


async def test_one_session_per_tls_identity_all_closed(
    tmp_path: Path, https_upstream: FakeUpstream, upstream: FakeUpstream, pki: Pki
) -> None:
    tls = {"ca_bundle": pki.ca_file, "client_cert": pki.cert_file, "client_key": pki.key_file}
    url = f"{https_upstream.url}/testchan"
    a = ChannelConfig("a", url, 5.0, 5.0, **tls)
    b = ChannelConfig("b", url, 5.0, 5.0, **tls)
    no_cert = ChannelConfig("c", url, 5.0, 5.0, ca_bundle=pki.ca_file)
    plain = ChannelConfig("d", f"{upstream.url}/testchan", 5.0, 5.0)
    up = Upstream()
    try:
        for ch in (a, b, plain):
            resp, _ = await up.open(ch, "noarch/repodata.json")
            resp.release()
        with pytest.raises(UpstreamUnavailable):
            await up.open(no_cert, "noarch/repodata.json")
        assert up.pools == {
            (TlsIdentity(), False),
            (a.tls, False),
            (no_cert.tls, False),
        }
    finally:
        await up.close()
    assert up.pools == frozenset()
    await up.close()  # safe twice
    with pytest.raises(UpstreamUnavailable, match="shutting down"):
        await up.open(a, "noarch/repodata.json")


def test_contexts_always_verify(pki: Pki) -> None:
    for identity in (
        TlsIdentity(),
        TlsIdentity(pki.ca_file),
        TlsIdentity(pki.ca_file, pki.cert_file, pki.key_file),
    ):
        ctx = build_context(identity)
        assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname


# --- configuration -----------------------------------------------------------------


def _encrypted_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return path


def tls_error(tmp_path: Path, keys: str, url: str = "https://conda.example/x") -> ConfigError:
    path = tmp_path / "proxy.ini"
    path.write_text(f"[channel:x]\nurl = {url}\n" + textwrap.dedent(keys))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: [channel:x] ")
    assert "\n" not in str(info.value)
    return info.value


def test_tls_files_are_checked_at_load(tmp_path: Path, pki: Pki) -> None:
    error = tls_error(tmp_path, f"client_key = {pki.key_file}\n")
    assert (error.key, error.message) == ("client_key", "given without client_cert")

    error = tls_error(tmp_path, f"ca_bundle = {tmp_path / 'absent.pem'}\n")
    assert error.key == "ca_bundle" and "no such file" in error.message

    error = tls_error(tmp_path, f"ca_bundle = {tmp_path}\n")
    assert error.key == "ca_bundle" and "not a regular file" in error.message

    error = tls_error(tmp_path, f"ca_bundle = {pki.key_file}\n")
    assert error.key == "ca_bundle" and "no usable CA certificate" in error.message

    error = tls_error(tmp_path, f"client_cert = {pki.cert_file}\n")
    assert error.key == "client_cert" and "no PEM private key" in error.message
    assert "client_key" in error.message

    error = tls_error(tmp_path, f"client_cert = {pki.key_file}\nclient_key = {pki.key_file}\n")
    assert error.key == "client_cert" and "no PEM certificate" in error.message

    error = tls_error(tmp_path, f"client_cert = {pki.cert_file}\nclient_key = {pki.other_key_file}\n")
    assert error.key == "client_key" and "does not match" in error.message

    encrypted = _encrypted_key(tmp_path / "enc.key")
    error = tls_error(tmp_path, f"client_cert = {pki.cert_file}\nclient_key = {encrypted}\n")
    assert error.key == "client_key" and "encrypted private keys are not supported" in error.message

    error = tls_error(tmp_path, f"ca_bundle = {pki.ca_file}\n", url="http://conda.example/x")
    assert error.key == "ca_bundle" and "https URLs only" in error.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_tls_file(tmp_path: Path, pki: Pki) -> None:
    locked = tmp_path / "locked.pem"
    locked.write_bytes(pki.ca_file.read_bytes())
    locked.chmod(0)
    error = tls_error(tmp_path, f"ca_bundle = {locked}\n")
    assert "not readable" in error.message


def test_verification_cannot_be_switched_off(tmp_path: Path) -> None:
    for key in ("verify", "verify_ssl", "insecure", "ssl"):
        error = tls_error(tmp_path, f"{key} = no\n")
        assert error.key == key and "unknown key" in error.message


def test_tls_paths_are_relative_to_the_config_file(tmp_path: Path, pki: Pki) -> None:
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    for f in (pki.ca_file, pki.cert_file, pki.key_file):
        (etc / "tls" / f.name).write_bytes(f.read_bytes())
    path = etc / "proxy.ini"
    path.write_text(
        "[channel:x]\nurl = https://a.example/x https://b.example/x\n"
        "ca_bundle = tls/ca.pem\nclient_cert = tls/client.pem\nclient_key = tls/client.key\n"
    )
    ch = load_config(path).channels["x"]
    assert ch.tls == TlsIdentity(etc / "tls/ca.pem", etc / "tls/client.pem", etc / "tls/client.key")


def test_build_context_names_the_setting_at_fault(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(TlsSetupError) as info:
        build_context(TlsIdentity(None, pki.cert_file, pki.other_key_file))
    assert info.value.key == "client_key"


async def test_real_client_installs_through_a_client_certificate_upstream(
    tmp_path: Path, https_upstream: FakeUpstream, channel: Channel, pki: Pki
) -> None:
    from test_rattler_client import solve_and_install

    config = certified_config(tmp_path, https_upstream, pki)
    proxy = await started(config)
    try:
        # The client speaks plain http to the proxy and needs no certificate of its own.
        names = await solve_and_install(
            f"{proxy.url}{CH}", tmp_path / "env", tmp_path / "client", sharded=True
        )
        assert any(n.startswith("cp-extra-") for n in names)
        await proxy.idle()
        assert set(names) <= {f for _, _, f in check_invariants(config.cache.directory)}
    finally:
        await proxy.close()
