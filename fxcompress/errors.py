"""Errors a user can act on.

Every error the command line prints without a traceback derives from
FxcError; `exit_code` is what the CLI returns (2 bad input, 1 run failure).
"""
from __future__ import annotations

import difflib
from typing import Iterable, Optional


class FxcError(Exception):
    exit_code = 1


class BadInput(FxcError):
    """The user's input (policy, model file, shapes, flags) is wrong."""

    exit_code = 2


class RunFailure(FxcError):
    """The input was fine but the run failed (a pass broke the graph, ...)."""

    exit_code = 1


class PolicyError(BadInput):
    def __init__(self, message: str, file: Optional[str] = None, line: Optional[int] = None,
                 key: Optional[str] = None, suggestion: Optional[str] = None):
        self.file, self.line, self.key, self.suggestion = file, line, key, suggestion
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        elif line:
            where = f"line {line}: "
        text = where + (f"{key}: " if key else "") + message
        if suggestion:
            text += f" (did you mean '{suggestion}'?)"
        super().__init__(text)


class TraceError(BadInput):
    pass


class ShapeError(BadInput):
    pass


def closest(word: str, choices: Iterable[str]) -> Optional[str]:
    """The closest valid name, for 'did you mean' hints."""
    choices = list(choices)
    hits = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if hits:
        return hits[0]
    lower = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.5)
    return lower[hits[0]] if hits else None
