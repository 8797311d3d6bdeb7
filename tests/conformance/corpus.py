"""Loader for the conformance corpus: one raw request per `.http` file, its verdict beside it.

File format (cases/<valid|invalid>/<name>.http), ASCII only, so every byte is visible:
  - real newlines are ignored (they only make the file readable); bytes are written as
    escapes: \\r \\n \\t \\0 \\\\ and \\xHH;
  - ${N*c} repeats the one character (or one escape) c N times, for oversize cases.

Expectation (<name>.expect), `key: value` lines, `#` comments:
  invalid: status (what the server answers), close (always yes), why, limits (optional
           `name=value` parser/server settings, e.g. `max_request_line=64`).
  valid:   statuses (one per pipelined request, as answered by the test app), requests
           (count, default 1), method/path/raw_path/query/version/body (first request as
           parsed, escapes allowed), headers (its header names in order, space-separated),
           keep_alive (yes/no), echo (body of the first response: /echo sends the request
           body back, /names the header names), header_<name> (a field of the first
           response, e.g. header_allow), close, limits.
  both:    rfc (the section the case checks; every case written since the corpus began
           names one), why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

CASES_DIR = Path(__file__).parent / "cases"

_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[rnt0\\])")
_REPEAT = re.compile(r"\$\{(\d+)\*(\\x[0-9a-fA-F]{2}|\\[rnt0\\]|[^}\\])\}")
_SIMPLE = {"r": "\r", "n": "\n", "t": "\t", "0": "\0", "\\": "\\"}


def unescape(text: str) -> bytes:
    """Turn corpus text (escapes, repeats, cosmetic newlines) into the raw bytes."""
    if not text.isascii():
        raise ValueError("corpus files are ASCII; write other bytes as \\xHH")
    text = text.replace("\n", "")
    text = _REPEAT.sub(lambda m: m.group(2) * int(m.group(1)), text)

    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        return chr(int(e[1:], 16)) if e[0] == "x" else _SIMPLE[e]

    return _ESCAPE.sub(one, text).encode("latin-1")


@dataclass
class Case:
    """One corpus entry: raw bytes plus what must happen to them."""

    name: str
    kind: str  # "valid" | "invalid"
    raw: bytes
    expect: dict[str, str]
    limits: dict[str, int] = field(default_factory=dict)

    @property
    def status(self) -> int:
        return int(self.expect["status"])

    @property
    def statuses(self) -> list[int]:
        return [int(s) for s in self.expect.get("statuses", "200").split()]

    def text(self, key: str) -> bytes | None:
        """An escaped expectation value (body, echo) as bytes, or None if absent."""
        value = self.expect.get(key)
        return None if value is None else unescape(value)

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


def _read_expect(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text("ascii").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"{path}: not `key: value`: {line!r}")
        out[key.strip()] = value.strip()
    return out


def load_cases(kind: str | None = None) -> list[Case]:
    """Every case (or those of one kind), sorted by name; checks each has its .expect."""
    cases = []
    kinds = [kind] if kind else ["invalid", "valid"]
    for k in kinds:
        for http in sorted((CASES_DIR / k).glob("*.http")):
            expect_path = http.with_suffix(".expect")
            if not expect_path.exists():
                raise FileNotFoundError(f"{http} has no {expect_path.name}")
            expect = _read_expect(expect_path)
            limits = {}
            for item in expect.get("limits", "").split():
                name, _, value = item.partition("=")
                limits[name] = int(value)
            cases.append(Case(http.stem, k, unescape(http.read_text("ascii")), expect, limits))
    return cases
