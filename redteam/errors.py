"""Errors a user can act on. The CLI prints them as one line and exits non-zero; anything else is a bug."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RedteamError(Exception):
    """A problem with the user's input, environment or data, explained in one line."""

    exit_code = 2


#: More known names than this are summarised (a dataset's 629 identities), not listed.
LISTED_NAMES = 20


class UnknownNameError(RedteamError):
    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        if len(known) > LISTED_NAMES:
            listed = f"{len(known)} known, e.g. {', '.join(known[:5])}, ..."
        else:
            listed = f"Known: {', '.join(known) or 'none'}."
        super().__init__(f"unknown {kind} {name!r}.{hint} {listed}")


class MissingWeightsError(RedteamError):
    pass


class DataError(RedteamError):
    pass
