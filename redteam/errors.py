"""Errors a user can act on. The CLI prints them as one line and exits non-zero; anything else is a bug."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RedteamError(Exception):
    """A problem with the user's input, environment or data, explained in one line."""

    exit_code = 2


class UnknownNameError(RedteamError):
    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known) or 'none'}.")


class MissingWeightsError(RedteamError):
    pass


class DataError(RedteamError):
    pass
