"""Plain-text tables a person can read in a terminal."""
from __future__ import annotations

from typing import Any, List, Sequence

MAX_CELL = 80


def _cell(v: Any) -> str:
    if isinstance(v, float):
        text = f"{v:.4g}"
    else:
        text = "-" if v is None else str(v)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def format_table(headers: Sequence[str], rows: List[Sequence[Any]]) -> str:
    cells = [[_cell(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)
