"""Trusted proxy headers: who the client really is, and whether it spoke https.

`X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded` (RFC 7239) are honoured only when the
peer that connected to us is in `forwarded_allow_ips` (default 127.0.0.1; '*' trusts every
peer; entries may be networks such as 10.0.0.0/8), as gunicorn and uvicorn do. Anyone else
could send them to spoof their address or scheme.

The client address is found the way uvicorn does it: walk the list from the right (the hop
nearest to us) and take the first address that is not itself a trusted proxy; a client can
prepend anything it likes, but it cannot remove what our own proxies appended. Runs on worker
threads (building the WSGI environ), never on the conductor.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_SCHEMES = frozenset({"http", "https"})


class ForwardedPolicy:
    """Which peers may speak for the client, and what their headers say."""

    __slots__ = ("trust_all", "_hosts", "_networks")

    def __init__(self, allow_ips: Iterable[str]) -> None:
        hosts: set[str] = set()
        networks: list[Network] = []
        trust_all = False
        for raw in allow_ips:
            entry = raw.strip()
            if not entry:
                continue
            if entry == "*":
                trust_all = True
            elif "/" in entry:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ValueError(f"forwarded_allow_ips: invalid network {entry!r}") from None
            else:
                hosts.add(_bare(entry))
        self.trust_all = trust_all
        self._hosts = frozenset(hosts)
        self._networks = tuple(networks)

    def trusts(self, host: str) -> bool:
        """True when `host` (an address as text) is a trusted proxy.

        Unix-socket peers ("unix" or "") are trusted: only local processes allowed by the
        socket file's permissions can connect, which is how gunicorn treats them too.
        """
        return host in ("unix", "") or self._trusted_hop(host)

    def _trusted_hop(self, host: str) -> bool:
        if self.trust_all or host in self._hosts:
            return True
        if self._networks:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                return False
            return any(ip in net for net in self._networks)
        return False

    def resolve(
        self,
        peer: str,
        forwarded: str | None,
        x_forwarded_for: str | None,
        x_forwarded_proto: str | None,
    ) -> tuple[str | None, int | None, str | None]:
        """(client address, client port, scheme) the headers establish; None where they don't.

        Nothing is taken from the headers unless `peer` is trusted. `Forwarded` wins over
        the X-Forwarded-* pair when both are present (make your proxy strip the one it
        does not set).
        """
        if not self.trusts(peer):
            return None, None, None
        if forwarded:
            hops, proto = parse_forwarded(forwarded)
            host, port = self._client_from(hops)
            return host, port, _scheme(proto)
        host = port = None
        if x_forwarded_for:
            hops = [_split_host_port(h.strip()) for h in x_forwarded_for.split(",")]
            host, port = self._client_from(hops)
        scheme = None
        if x_forwarded_proto:
            scheme = _scheme(x_forwarded_proto.rsplit(",", 1)[-1])
        return host, port, scheme

    def _client_from(self, hops: list[tuple[str, int | None]]) -> tuple[str | None, int | None]:
        """The rightmost hop that is not a trusted proxy (or the leftmost if all are)."""
        if not hops:
            return None, None
        chosen = hops[0]
        for hop in reversed(hops):
            if not self._trusted_hop(hop[0]):
                chosen = hop
                break
        host, port = chosen
        if not _is_ip(host):
            return None, None  # "unknown", an obfuscated name, garbage: keep the peer
        return host, port


def parse_forwarded(value: str) -> tuple[list[tuple[str, int | None]], str | None]:
    """The `for=` hops (left to right) and the last `proto=` of an RFC 7239 header."""
    hops: list[tuple[str, int | None]] = []
    proto = None
    for element in _split_quoted(value, ","):
        for pair in _split_quoted(element, ";"):
            key, sep, val = pair.partition("=")
            if not sep:
                continue
            key = key.strip().lower()
            val = val.strip()
            if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
                val = val[1:-1].replace('\\"', '"')
            if key == "for":
                hops.append(_split_host_port(val))
            elif key == "proto":
                proto = val
    return hops, proto


def _split_quoted(value: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes (a quoted IPv6 `for=` contains ':' and may
    contain anything else)."""
    parts = []
    start = 0
    quoted = False
    for i, ch in enumerate(value):
        if ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return [p for p in parts if p.strip()]


def _split_host_port(value: str) -> tuple[str, int | None]:
    """'1.2.3.4', '1.2.3.4:80', '[::1]:80', '::1' -> (host, port or None)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    return host, int(port) if port.isdigit() and port.isascii() and len(port) <= 5 else None


def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _scheme(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    return v if v in _SCHEMES else None
