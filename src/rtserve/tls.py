"""TLS settings made into an SSLContext (checked at start, rebuilt on SIGHUP), the kind of a
TLS error, and what a handler learns about a TLS connection.

`build_context` runs on the main thread before serving: a missing, unreadable or malformed
file, or a key that does not match its certificate, stops the start with a `TLSFileError`
that names the setting and the file (the CLI exits 3, as for an application it cannot
import). `TLSContexts.reload` runs on the conductor (SIGHUP in a single process) and swaps
in a new context for the connections accepted from then on; connections already open
keep the context they were accepted with. `connection_facts` and `error_kind` run on the
conductor, once per finished handshake and once per TLS error. The non-blocking handshake
and the encrypted reads and writes are tlsio.py's.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .config import Config, ConfigError

log = logging.getLogger("rtserve.error")

ALPN = ["http/1.1"]
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
VERIFY_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                "required": ssl.CERT_REQUIRED}
# rtserve_tls_errors_total{reason=...}: a fixed set, so a client can't grow the series.
ERROR_KINDS = ("http_request", "eof", "client_certificate", "version", "cipher", "alert",
               "protocol")


class TLSFileError(ConfigError):
    """A TLS file is missing, unreadable, malformed, or its key does not match."""


def requested(cfg: Config) -> bool:
    """Does this configuration ask for TLS (a certfile, or any other TLS setting, which
    `build_context` then refuses without one)?"""
    return bool(cfg.certfile or cfg.keyfile or cfg.keyfile_password
                or cfg.keyfile_password_file or cfg.ca_certs or cfg.client_cert != "none")


# ---- building the context (main thread; the conductor on reload) ---------------------------


def build_context(cfg: Config) -> ssl.SSLContext:
    """A server SSLContext from the TLS settings; raises ConfigError / TLSFileError."""
    _check_combination(cfg)
    certfile, keyfile, ca_certs = cfg.certfile, cfg.keyfile, cfg.ca_certs
    for name in ("certfile", "keyfile", "ca_certs", "keyfile_password_file"):
        path = getattr(cfg, name)
        if path:
            _check_readable(name, path)
    password = _password(cfg)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSIONS[cfg.tls_min_version]
    # Renegotiation (TLS 1.2) is refused: it would let a client make the conductor run a
    # new handshake mid-request. Compression stays off (CRIME); OpenSSL's defaults do the
    # rest (no SSLv3, server cipher preference, fresh ECDH keys).
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    if cfg.ssl_ciphers:
        try:
            ctx.set_ciphers(cfg.ssl_ciphers)
        except ssl.SSLError:
            raise ConfigError(
                f"invalid value for ssl_ciphers: {cfg.ssl_ciphers!r} (no cipher matches)"
            ) from None
    _load_certificate(ctx, certfile, keyfile, password)
    if ca_certs:
        try:
            ctx.load_verify_locations(cafile=ca_certs)
        except ssl.SSLError as exc:
            raise TLSFileError(
                f"ca_certs {ca_certs}: no PEM CA certificate could be read from it "
                f"({_why(exc)})"
            ) from None
    ctx.verify_mode = VERIFY_MODES[cfg.client_cert]
    ctx.set_alpn_protocols(ALPN)
    return ctx


def _check_combination(cfg: Config) -> None:
    if not cfg.certfile:
        for name in ("keyfile", "keyfile_password", "keyfile_password_file", "ca_certs"):
            if getattr(cfg, name):
                raise ConfigError(f"{name} is set but certfile is not (TLS needs a certfile)")
        if cfg.client_cert != "none":
            raise ConfigError("client_cert needs TLS: set certfile (and ca_certs)")
        return
    if cfg.keyfile_password and cfg.keyfile_password_file:
        raise ConfigError("set keyfile_password or keyfile_password_file, not both")
    if cfg.client_cert != "none" and not cfg.ca_certs:
        raise ConfigError(
            f"client_cert={cfg.client_cert} needs ca_certs (the CAs client certificates "
            "must chain to)"
        )
    if cfg.ca_certs and cfg.client_cert == "none":
        raise ConfigError(
            "ca_certs is set but client_cert is none: no client certificate would be asked "
            "for (set --client-cert optional or required)"
        )


def _check_readable(name: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise TLSFileError(f"{name} {path}: no such file") from None
    except IsADirectoryError:
        raise TLSFileError(f"{name} {path}: is a directory, not a file") from None
    except OSError as exc:
        raise TLSFileError(f"{name} {path}: cannot be read ({exc.strerror})") from None


def _password(cfg: Config) -> bytes:
    if cfg.keyfile_password_file:
        with open(cfg.keyfile_password_file, "rb") as f:
            return f.readline().rstrip(b"\r\n")
    return cfg.keyfile_password.encode("utf-8")


def _load_certificate(ctx: ssl.SSLContext, certfile: str, keyfile: str, password: bytes) -> None:
    # The certificates first, on their own, so an error names the right file.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=certfile)
    except ssl.SSLError as exc:
        raise TLSFileError(
            f"certfile {certfile}: no PEM certificate could be read from it ({_why(exc)})"
        ) from None
    key_setting, key_path = ("keyfile", keyfile) if keyfile else ("certfile", certfile)
    try:
        # A password callable, always: without one OpenSSL would prompt on the terminal
        # for an encrypted key, and a server must not wait on a prompt.
        ctx.load_cert_chain(certfile, keyfile or None, password=lambda: password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSFileError(
                f"{key_setting} {key_path}: the private key does not match the certificate "
                f"in certfile {certfile}"
            ) from None
        encrypted = _looks_encrypted(key_path)
        hint = (" or the password (keyfile_password / keyfile_password_file) is wrong"
                if encrypted else "")
        raise TLSFileError(
            f"{key_setting} {key_path}: no usable PEM private key in it{hint} ({_why(exc)})"
        ) from None


def _looks_encrypted(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return b"ENCRYPTED" in head


def _why(exc: ssl.SSLError) -> str:
    return exc.reason or (str(exc.args[1]) if len(exc.args) > 1 else str(exc))


class TLSContexts:
    """The SSLContext new connections are wrapped with; replaced whole on reload."""

    __slots__ = ("cfg", "context", "reloads")

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.context = build_context(cfg)
        self.reloads = 0

    def reload(self) -> bool:
        """Read the files again (SIGHUP). On an error the context in use stays."""
        try:
            context = build_context(self.cfg)
        except (ConfigError, OSError) as exc:
            log.error("TLS reload failed, still serving the certificates loaded before: %s",
                      exc)
            return False
        self.context = context
        self.reloads += 1
        log.info("TLS certificates reloaded from %s (new connections use them)",
                 self.cfg.certfile)
        return True


# ---- errors (conductor) ---------------------------------------------------------------------

_VERSION = frozenset({"UNSUPPORTED_PROTOCOL", "WRONG_SSL_VERSION", "VERSION_TOO_LOW",
                      "NO_PROTOCOLS_AVAILABLE", "TLSV1_ALERT_PROTOCOL_VERSION"})
_CLIENT_CERT = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED",
                          "NO_CERTIFICATE_RETURNED", "TLSV13_ALERT_CERTIFICATE_REQUIRED"})
_CIPHER = frozenset({"NO_SHARED_CIPHER", "NO_CIPHERS_AVAILABLE", "NO_SHARED_GROUPS",
                     "NO_SUITABLE_SIGNATURE_ALGORITHM"})


def error_kind(exc: OSError) -> str:
    """The `reason` label of rtserve_tls_errors_total for an error on a TLS connection."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "client_certificate"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
        return "eof"
    if not isinstance(exc, ssl.SSLError):
        return "eof"  # a reset or a broken pipe mid-handshake
    reason = exc.reason or ""
    if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
        return "http_request"
    if reason == "UNEXPECTED_EOF_WHILE_READING":
        return "eof"
    if reason in _CLIENT_CERT:
        return "client_certificate"
    if reason in _VERSION:
        return "version"
    if reason in _CIPHER:
        return "cipher"
    if reason.startswith(("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")):
        return "alert"  # the client refused us (most often: our certificate)
    return "protocol"


# ---- what handlers see (conductor, once per handshake) -------------------------------------


class TLSInfo:
    """One TLS connection's facts: `fields` for native handlers (`request.tls`), `environ`
    for WSGI (Apache mod_ssl's names). Shared by every request on the connection."""

    __slots__ = ("fields", "environ")

    def __init__(self, fields: Mapping[str, Any], environ: dict[str, str]) -> None:
        self.fields = fields
        self.environ = environ


def connection_facts(sock: ssl.SSLSocket) -> TLSInfo:
    """Version, cipher, ALPN and the client certificate of a finished handshake."""
    version = sock.version() or ""
    cipher_info = sock.cipher()
    cipher, bits = (cipher_info[0], cipher_info[2]) if cipher_info else ("", 0)
    fields: dict[str, Any] = {
        "version": version,
        "cipher": cipher,
        "cipher_bits": bits,
        "alpn": sock.selected_alpn_protocol(),
        "client_verify": "NONE",
        "client_subject": None,
        "client_issuer": None,
        "client_serial": None,
        "client_not_before": None,
        "client_not_after": None,
        "client_cert": None,
    }
    environ = {
        "SSL_PROTOCOL": version,
        "SSL_CIPHER": cipher,
        "SSL_CIPHER_USEKEYSIZE": str(bits),
        "SSL_CLIENT_VERIFY": "NONE",
    }
    cert = sock.getpeercert()  # only a certificate that verified (client_cert optional/required)
    if cert:
        subject = format_dn(cert.get("subject", ()))
        issuer = format_dn(cert.get("issuer", ()))
        serial = str(cert.get("serialNumber", ""))
        not_before = str(cert.get("notBefore", ""))
        not_after = str(cert.get("notAfter", ""))
        fields.update(client_verify="SUCCESS", client_subject=subject, client_issuer=issuer,
                      client_serial=serial, client_not_before=not_before,
                      client_not_after=not_after, client_cert=cert)
        environ.update(
            SSL_CLIENT_VERIFY="SUCCESS",
            SSL_CLIENT_S_DN=subject,
            SSL_CLIENT_I_DN=issuer,
            SSL_CLIENT_S_DN_CN=_first(cert.get("subject", ()), "commonName"),
            SSL_CLIENT_M_SERIAL=serial,
            SSL_CLIENT_V_START=not_before,
            SSL_CLIENT_V_END=not_after,
        )
        der = sock.getpeercert(binary_form=True)
        if der:
            environ["SSL_CLIENT_CERT"] = ssl.DER_cert_to_PEM_cert(der)
    return TLSInfo(MappingProxyType(fields), environ)


# Attribute names as RFC 4514 (and mod_ssl's RFC 2253 strings) abbreviate them.
_SHORT = {
    "commonName": "CN", "countryName": "C", "localityName": "L",
    "stateOrProvinceName": "ST", "organizationName": "O", "organizationalUnitName": "OU",
    "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID",
}
_ESCAPED = frozenset(',+"\\<>;')


def format_dn(rdns: Any) -> str:
    """A distinguished name as RFC 4514 writes it, most specific first: `CN=client,O=Acme`.

    `rdns` is the `subject`/`issuer` of `SSLSocket.getpeercert()`: a tuple of RDNs in
    certificate order, each a tuple of (attribute, value) pairs.
    """
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{_SHORT.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def _escape(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in _ESCAPED or (ch == "#" and i == 0) or (
            ch == " " and (i == 0 or i == len(value) - 1)
        ):
            out.append("\\" + ch)
        elif ch == "\0":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def _first(rdns: Any, name: str) -> str:
    for rdn in rdns:
        for k, v in rdn:
            if k == name:
                return str(v)
    return ""
