"""The authorisation request: its fields, and the checks that turn a JSON body into one.

Validation runs before any feature fetch or model call, so a malformed request costs a few
microseconds and never reaches the model. Every refusal names the field it is about.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime

CHANNELS = ("pos", "online", "atm")
#: Transactions stamped outside these years are refused (a wrong unit, ms instead of s).
MIN_TS = 946684800.0  # 2000-01-01T00:00:00Z
MAX_TS = 4102444800.0  # 2100-01-01T00:00:00Z
MAX_AMOUNT = 1_000_000.0
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_UPPER2 = re.compile(r"[A-Z]{2}")
_UPPER3 = re.compile(r"[A-Z]{3}")
FIELDS = ("card_id", "merchant_id", "mcc", "amount", "currency", "country", "channel",
          "timestamp")


class NotJSON(ValueError):
    """The body is not a JSON object (answered with 400)."""


class InvalidField(ValueError):
    """One field is missing or wrong (answered with 422 naming the field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Transaction:
    """A card authorisation as the service sees it (timestamp in Unix seconds, UTC)."""

    card_id: str
    merchant_id: str
    mcc: int
    amount: float
    currency: str
    country: str
    channel: str
    timestamp: float

    def to_json(self) -> dict:
        """The request body that describes this transaction (the simulator's output)."""
        return {f: getattr(self, f) for f in FIELDS}


def parse_body(body: bytes) -> Transaction:
    """Decode and validate a request body; raises NotJSON or InvalidField."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotJSON(f"body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise NotJSON("body must be a JSON object")
    return from_mapping(obj)


def from_mapping(obj: dict) -> Transaction:
    """Validate a decoded object field by field, in a fixed order (the first error wins)."""
    return Transaction(
        card_id=_ident(obj, "card_id"),
        merchant_id=_ident(obj, "merchant_id"),
        mcc=_mcc(obj),
        amount=_amount(obj),
        currency=_code(obj, "currency", _UPPER3, "an ISO 4217 code such as EUR"),
        country=_code(obj, "country", _UPPER2, "an ISO 3166 alpha-2 code such as FR"),
        channel=_channel(obj),
        timestamp=_timestamp(obj),
    )


def _get(obj: dict, name: str):
    if name not in obj or obj[name] is None:
        raise InvalidField(name, "is required")
    return obj[name]


def _ident(obj: dict, name: str) -> str:
    v = _get(obj, name)
    if not isinstance(v, str) or not _ID.fullmatch(v):
        raise InvalidField(name, "must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    return v


def _mcc(obj: dict) -> int:
    v = _get(obj, "mcc")
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) == 4:
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 9999:
        raise InvalidField("mcc", "must be a 4-digit merchant category code")
    return v


def _amount(obj: dict) -> float:
    v = _get(obj, "amount")
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidField("amount", "must be a number")
    v = float(v)
    if not math.isfinite(v) or not 0 < v <= MAX_AMOUNT:
        raise InvalidField("amount", f"must be > 0 and <= {MAX_AMOUNT:g}")
    return v


def _code(obj: dict, name: str, pattern: re.Pattern, what: str) -> str:
    v = _get(obj, name)
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise InvalidField(name, f"must be {what}")
    return v


def _channel(obj: dict) -> str:
    v = _get(obj, "channel")
    if v not in CHANNELS:
        raise InvalidField("channel", f"must be one of {', '.join(CHANNELS)}")
    return v


def _timestamp(obj: dict) -> float:
    """Unix seconds (a number) or an ISO 8601 string with a UTC offset."""
    v = _get(obj, "timestamp")
    if isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise InvalidField("timestamp", "must be Unix seconds or ISO 8601") from None
        if dt.tzinfo is None:
            raise InvalidField("timestamp", "an ISO 8601 timestamp needs a UTC offset")
        v = dt.timestamp()
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidField("timestamp", "must be Unix seconds or ISO 8601")
    v = float(v)
    if not MIN_TS <= v < MAX_TS:
        raise InvalidField("timestamp", "must be Unix seconds between 2000 and 2100")
    return v
