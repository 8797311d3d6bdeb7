"""Who may use the admin endpoints, and what `POST /admin/stall` accepts.

Only a client on this machine: the peer address must be loopback (127.0.0.0/8, ::1, or
::ffff:127.x) and the request must carry no proxy header (Forwarded, X-Forwarded-For,
X-Real-IP). The second rule matters behind a local reverse proxy: every request through
nginx on 127.0.0.1 comes from a loopback peer, including those from the internet.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping

PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def is_local_client(client: tuple | None, headers: Mapping[str, str]) -> bool:
    """True for a direct (not proxied) request from a loopback address."""
    if not client or not isinstance(client[0], str):
        return False
    try:
        ip = ipaddress.ip_address(client[0].split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback and not any(h in headers for h in PROXY_HEADERS)


def parse_stall(body: bytes) -> tuple[float, float, str]:
    """(share, ms, mode) from `{"share": 0.01, "ms": 200, "mode": "abandon"}`.

    Raises ValueError with a message that names the field.
    """
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("body must be JSON: {\"share\": 0.01, \"ms\": 200}") from None
    if not isinstance(obj, dict):
        raise ValueError("body must be a JSON object")
    values = []
    for name in ("share", "ms"):
        v = obj.get(name)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{name}: must be a number")
        values.append(float(v))
    mode = obj.get("mode", "abandon")
    if not isinstance(mode, str):
        raise ValueError("mode: must be a string")
    return values[0], values[1], mode
