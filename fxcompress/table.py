"""Plain-text tables a person can read in a terminal."""
from __future__ import annotations

from typing import Any, List, Sequence


def _cell(v: Any) -> List[str]:
    """A cell's lines: nothing is cut (a plan's second treatment must show);
    a cell holding newlines spans several lines of its row."""
    if isinstance(v, float):
        text = f"{v:.4g}"
    else:
        text = "-" if v is None else str(v)
    return text.split("\n")


def format_table(headers: Sequence[str], rows: List[Sequence[Any]]) -> str:
    cells = [[_cell(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max([widths[i]] + [len(part) for part in c])
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(headers), "  ".join("-" * w for w in widths)]
    for r in cells:
        for k in range(max(len(c) for c in r)):
            out.append(line([c[k] if k < len(c) else "" for c in r]))
    return "\n".join(out)
