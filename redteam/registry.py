"""Name -> factory registries for targets, attacks and defenses (timm-style ``register``), filled by discovery.

A registry with a ``package`` imports every module of that package the first time it is asked for a name, so a new
file in ``redteam/attacks/`` registers itself with no edit anywhere else. With a ``group``, it also loads the
installed distributions' entry points of that group (``redteam.targets``, ``redteam.attacks``,
``redteam.defenses``): a user's package adds plugins without touching redteam. An entry point names a module (its
decorators register what it defines) or a class (registered under the entry point's name if it is not already).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, cast

from redteam.errors import RedteamError, UnknownNameError

T = TypeVar("T")


class PluginError(RedteamError):
    """A plugin that cannot be loaded or registered."""


class Registry(Generic[T]):
    """``kind`` names what it holds in messages; ``check(name, entry)`` raises ``TypeError`` for an entry that
    cannot work (a plugin author's mistake, reported when it registers)."""

    def __init__(
        self,
        kind: str,
        package: str | None = None,
        group: str | None = None,
        check: Callable[[str, Any], None] | None = None,
    ):
        self.kind, self.package, self.group, self.check = kind, package, group, check
        self._entries: dict[str, T] = {}
        self._summaries: dict[str, str] = {}
        self._schemes: dict[str, tuple[Callable[[str], T], str]] = {}
        self._chain: tuple[Callable[[list[str]], T], str] | None = None
        self._discovered = package is None and group is None

    def register(self, name: str, summary: str = "") -> Callable[[T], T]:
        """Decorator: ``@TARGETS.register("facenet", "InceptionResNetV1 ...")``."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise PluginError(f"{self.kind} {name!r} is registered twice.")
            if self.check is not None:
                try:
                    self.check(name, entry)
                except TypeError as error:
                    raise PluginError(str(error)) from None
            self._entries[name] = entry
            doc = (getattr(entry, "__doc__", None) or "").strip().splitlines()[:1]
            self._summaries[name] = summary or (doc[0] if doc else "")
            return entry

        return add

    def register_scheme(self, scheme: str, summary: str) -> Callable[[Callable[[str], T]], Callable[[str], T]]:
        """Decorator for a factory of entries named ``scheme:argument`` (e.g. ``remote:api.yaml``): ``get`` calls
        it with the argument, once per name."""

        def add(factory: Callable[[str], T]) -> Callable[[str], T]:
            if scheme in self._schemes:
                raise PluginError(f"{self.kind} scheme {scheme!r} is registered twice.")
            self._schemes[scheme] = (factory, summary)
            return factory

        return add

    def register_chain(self, summary: str) -> Callable[[Callable[[list[str]], T]], Callable[[list[str]], T]]:
        """Decorator for a factory of entries named by joining other names with ``+`` (``mtcnn+arcface``): ``get``
        calls it with the parts, once per name."""

        def add(factory: Callable[[list[str]], T]) -> Callable[[list[str]], T]:
            if self._chain is not None:
                raise PluginError(f"{self.kind} chains are registered twice.")
            self._chain = (factory, summary)
            return factory

        return add

    def chain_summary(self) -> str | None:
        """What a ``+`` chain of names makes (None when this registry makes none)."""
        self._discover()
        return self._chain[1] if self._chain else None

    def schemes(self) -> dict[str, str]:
        """Each scheme and what it makes."""
        self._discover()
        return {scheme: summary for scheme, (_, summary) in self._schemes.items()}

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True  # before importing: the modules' own decorators call back into this registry
        if self.package is not None:
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__, f"{self.package}."):
                importlib.import_module(module.name)
        if self.group is not None:
            for entry_point in importlib.metadata.entry_points(group=self.group):
                self._load(entry_point)

    def _load(self, entry_point: importlib.metadata.EntryPoint) -> None:
        where = f"{self.group} entry point {entry_point.name!r} ({entry_point.value})"
        try:
            loaded = entry_point.load()
        except Exception as error:  # a broken third-party plugin: say which, in one line
            raise PluginError(f"{where} failed to load: {type(error).__name__}: {error}") from None
        if isinstance(loaded, type) and loaded not in self._entries.values():
            # A plugin's class is taken to be what this registry holds (``check``, where given, vets it).
            self.register(entry_point.name)(cast(T, loaded))

    def get(self, name: str) -> T:
        self._discover()
        if name in self._entries:
            return self._entries[name]
        scheme, separator, argument = name.partition(":")
        if separator and scheme in self._schemes:
            factory, _ = self._schemes[scheme]
            entry = factory(argument)  # raises a one-line error for a bad argument
            self.register(name)(entry)
            return entry
        if "+" in name and self._chain is not None:
            entry = self._chain[0](name.split("+"))  # raises a one-line error for a part that does not fit
            self.register(name)(entry)
            return entry
        raise UnknownNameError(self.kind, name, [*self._entries, *(f"{s}:" for s in self._schemes)])

    def summary(self, name: str) -> str:
        self._discover()
        return self._summaries[name]

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._entries[name]) for name in self.names()]

    def __contains__(self, name: str) -> bool:
        self._discover()
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
