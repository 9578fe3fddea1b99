"""Name -> factory registries for targets, attacks, defenses and datasets (timm-style ``register``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from redteam.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._summaries: dict[str, str] = {}

    def register(self, name: str, summary: str = "") -> Callable[[T], T]:
        """Decorator: ``@TARGETS.register("facenet", "InceptionResNetV1 ...")``."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = entry
            doc = summary or (getattr(entry, "__doc__", None) or "").strip().splitlines()[:1]
            self._summaries[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return entry

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def summary(self, name: str) -> str:
        return self._summaries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class RuleTable(dict[str, T]):
    """Op name -> conversion rule, filled by the ``register(*names)`` decorator (the model converters' op tables)."""

    def register(self, *names: str) -> Callable[[T], T]:
        def add(rule: T) -> T:
            for name in names:
                self[name] = rule
            return rule

        return add
