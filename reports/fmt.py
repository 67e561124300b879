"""Number formatting and markdown pieces shared by every section.

Diff-friendly by construction: every number goes through one of these formatters (fixed
significant digits or decimals, thousands separators), tables are GitHub markdown through
tabulate with number parsing off (so tabulate never re-rounds what was formatted), and nothing
here reads the clock.
"""
from __future__ import annotations

import math

from tabulate import tabulate


def is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sig(x, digits: int = 4) -> str:
    """Significant digits: KL, losses, ratios spanning decades."""
    return format(x, f".{digits}g") if is_num(x) else "n/a"


def fixed(x, decimals: int = 2) -> str:
    """Fixed decimals with thousands separators: perplexities, milliseconds."""
    return format(x, f",.{decimals}f") if is_num(x) else "n/a"


def count(x) -> str:
    """Integers (bytes, tokens, parameters) with thousands separators."""
    return format(int(x), ",") if is_num(x) else "n/a"


def mb(nbytes) -> str:
    return format(nbytes / 1e6, ",.3f") if is_num(nbytes) else "n/a"


def pct(x, decimals: int = 1) -> str:
    return format(100 * x, f".{decimals}f") + "%" if is_num(x) else "n/a"


def table(rows, headers, align=None) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                    colalign=align)


def missing(rel: str, producer: str, what: str = "") -> str:
    """The one line a section shows instead of failing when its artifact is absent."""
    return f"_Not available: `{rel}` is missing{(' (' + what + ')') if what else ''}; `{producer}` writes it._"


def code(*commands: str) -> str:
    """The commands that reproduce a figure or table, as a shell block."""
    cmds = [c for c in commands if c]
    return "```\n" + "\n".join(cmds) + "\n```" if cmds else ""


def shell_join(argv) -> str:
    import shlex
    return " ".join(shlex.quote(str(a)) for a in argv)
