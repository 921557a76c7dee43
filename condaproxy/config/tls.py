"""Client TLS towards upstreams: one SSLContext per identity (trusted CAs, client certificate).

Verification is always on: an identity can only narrow what is trusted (its own CA bundle) or
add a client certificate, never switch checking off.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


class TlsSetupError(Exception):
    """A CA bundle, certificate or key cannot be used; key names the setting at fault."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """What a connection trusts and presents; channels with equal identities share a session."""

    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def is_default(self) -> bool:
        """The system's CAs and no client certificate."""
        return self.ca_bundle is None and self.client_cert is None


def _refuse_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal, which a service cannot answer.
    raise TlsSetupError("client_key", "encrypted private keys are not supported")


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsSetupError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def build_context(identity: TlsIdentity) -> ssl.SSLContext:
    """A verifying client context for identity; blocking file I/O, so call it off the loop."""
    try:
        # cafile given: only that bundle is trusted (as curl's --cacert), not the system's CAs too.
        ctx = ssl.create_default_context(cafile=str(identity.ca_bundle) if identity.ca_bundle else None)
    except (ssl.SSLError, OSError) as exc:
        message = f"no usable CA certificate in {identity.ca_bundle}: {_why(exc)}"
        raise TlsSetupError("ca_bundle", message) from None
    if identity.client_cert is not None:
        _load_client_cert(ctx, identity.client_cert, identity.client_key)
    # create_default_context() already sets these; asserted so no later change can relax them.
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    # OpenSSL's own errors for these cases say little more than "PEM lib": check the PEM first.
    if b"-----BEGIN CERTIFICATE-----" not in _read("client_cert", cert):
        raise TlsSetupError("client_cert", f"no PEM certificate in {cert}")
    key_key, key_file = ("client_key", key) if key is not None else ("client_cert", cert)
    if b"PRIVATE KEY-----" not in _read(key_key, key_file):
        hint = "" if key is not None else " (give the key file as client_key)"
        raise TlsSetupError(key_key, f"no PEM private key in {key_file}{hint}")
    try:
        ctx.load_cert_chain(cert, key, password=_refuse_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsSetupError(key_key, f"the private key in {key_file} does not match {cert}") from None
        raise TlsSetupError(key_key, f"cannot load {cert} with {key_file}: {_why(exc)}") from None
    except OSError as exc:
        raise TlsSetupError(key_key, f"cannot read {key_file}: {exc.strerror or exc}") from None


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason.lower().replace("_", " ")
    return getattr(exc, "strerror", None) or str(exc)
