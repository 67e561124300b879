"""Sizes and counts on the command line: parse "300MB", "278MiB", "2.5GB" or plain bytes and
token counts such as "2M"; print byte counts back.

Decimal units are powers of 1000 (1 MB = 10^6 bytes), binary units powers of 1024
(1 MiB = 2^20 bytes), as on disks and in `ls -h --si` vs `ls -h`. A fractional result
is rounded down: a budget is a ceiling, so 1.3 MiB admits 1,363,148 bytes, not 1,363,149.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from .errors import DfplanError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_COUNT_RE = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGbB]?)\s*$")
_MULT = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
_RE = re.compile(r"^\s*([+-]?[0-9][0-9_,]*(?:\.[0-9]*)?|[+-]?\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([A-Za-z]*)\s*$")


def parse_bytes(text) -> int:
    """"300MB" -> 300_000_000, "278MiB" -> 291_504_128, "2.5GB" -> 2_500_000_000, 12345 -> 12345.

    Raises DfplanError for anything unparseable, zero or negative.
    """
    if isinstance(text, bool):
        raise DfplanError(f"budget {text!r} is not a size; write e.g. 300MB, 278MiB, 2.5GB or a byte count")
    if isinstance(text, int):
        value = Decimal(text)
    else:
        s = str(text)
        m = _RE.match(s)
        unit = m.group(3).lower() if m else None
        if not m or unit not in _UNITS:
            raise DfplanError(f"cannot parse budget {s!r}; write e.g. 300MB, 278MiB, 2.5GB or a byte count "
                              f"(units: {', '.join(u.upper() for u in _UNITS if u and u != 'b')}, B)")
        try:
            value = Decimal(m.group(1).replace("_", "").replace(",", ""))
            if m.group(2):
                value = value.scaleb(int(m.group(2)))
        except InvalidOperation:
            raise DfplanError(f"cannot parse budget {s!r}; write e.g. 300MB") from None
        value *= _UNITS[unit]
    if not value.is_finite() or value <= 0:
        raise DfplanError(f"budget {text!r} must be a positive size, e.g. 300MB")
    n = int(value)                     # floor for positive values
    if n <= 0:
        raise DfplanError(f"budget {text!r} is less than one byte; write e.g. 300MB")
    return n


def format_bytes(n: int, exact: bool = True) -> str:
    """278000000 -> "278.00 MB (278,000,000 bytes)"; decimal units, matching how budgets are written."""
    n = int(n)
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= scale:
            short = f"{n / scale:.2f} {unit}"
            break
    else:
        short = f"{n} B"
        return short
    return f"{short} ({n:,} bytes)" if exact else short


def parse_count(text) -> int:
    """"2M" -> 2_000_000, "500k", "1.5e6", 12345; raises DfplanError for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _COUNT_RE.match(str(text))
    if not m:
        raise DfplanError(f"cannot parse token count {text!r}; write e.g. 2000000, 2M or 500k")
    return int(float(m.group(1).replace("_", "").replace(",", "")) * _MULT[m.group(2).lower()])


def parse_positive_ints(text: str) -> tuple[int, ...]:
    """"1,8,32" -> (1, 8, 32) (batch sizes and the like); raises DfplanError for anything else."""
    try:
        vals = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise DfplanError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise DfplanError(f"expected positive integers, got {text!r}")
    return vals
