"""Registries of interpreters and attacks, filled from Python entry points.

Built-ins and third-party packages register the same way: a distribution declares
``[project.entry-points."underfire.interpreters"] NAME = "module:Class"`` (or
``"underfire.attacks"``) and NAME is usable everywhere a built-in is. underfire's own entry points
are loaded first; a plugin that fails to import, is not a subclass of the expected base class, or
reuses a name already taken, is skipped with a one-line warning naming it, so a broken plugin never
breaks the built-ins.

Entry points are read once per registry object, on first use (nothing is imported at
``import underfire``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, Generic, TypeVar

from .errors import InputError

T = TypeVar("T")

#: The distribution whose entry points are the built-ins.
BUILTIN_DISTRIBUTION = "underfire"


class PluginWarning(UserWarning):
    """A plugin could not be registered (it is skipped; the built-ins still work)."""


class Registry(Generic[T]):
    """Name → class for one entry-point group: the built-ins first, then plugins, each part in
    the order of ``order`` (a sort key on the classes; entry points themselves have none)."""

    def __init__(self, group: str, base: type[T], kind: str, order: Callable[[type[T]], Any] | None = None) -> None:
        self.group = group
        self.base = base
        self.kind = kind  # "interpreter" / "attack", for messages
        self.order = order or (lambda cls: getattr(cls, "name", ""))
        self._classes: dict[str, type[T]] | None = None
        self._builtin: set[str] = set()

    # ------------------------------------------------------------------ reading
    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; one-line ``InputError`` naming the choices otherwise."""
        classes = self._load()
        if not isinstance(name, str) or name not in classes:
            raise InputError(f"unknown {self.kind} {name!r}; choose one of {', '.join(classes)}")
        return classes[name]

    def names(self) -> list[str]:
        """Registered names: the built-ins, then plugins, each in ``order``."""
        return list(self._load())

    def is_builtin(self, name: str) -> bool:
        self._load()
        return name in self._builtin

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def items(self) -> list[tuple[str, type[T]]]:
        return list(self._load().items())

    def refresh(self) -> None:
        """Forget what was loaded (a package installed since is then seen)."""
        self._classes = None
        self._builtin = set()

    # ------------------------------------------------------------------ loading
    def _load(self) -> dict[str, type[T]]:
        if self._classes is not None:
            return self._classes
        points = list(metadata.entry_points(group=self.group))
        builtin = [p for p in points if _distribution(p) == BUILTIN_DISTRIBUTION]
        plugins = sorted(
            (p for p in points if _distribution(p) != BUILTIN_DISTRIBUTION), key=lambda p: (p.name, p.value)
        )
        if not builtin:
            raise InputError(
                f"underfire's own {self.kind}s are not registered (no {self.group!r} entry points): "
                "install the package (pip install -e .) instead of running it from the source tree"
            )
        classes: dict[str, type[T]] = {}
        for point in builtin:
            # a built-in that does not load is a bug in underfire: let it raise
            classes[point.name] = self._checked(point, point.load())
            self._builtin.add(point.name)
        for point in plugins:
            where = f"{self.kind} plugin {point.name!r} ({point.value}, from {_distribution(point) or 'an unknown package'})"
            if point.name in classes:
                owner = "a built-in" if point.name in self._builtin else "another plugin"
                _warn(f"{where} skipped: the name is already taken by {owner}")
                continue
            try:
                loaded = point.load()
                classes[point.name] = self._checked(point, loaded)
            except Exception as error:  # noqa: BLE001 - any failure of foreign code is reported, not raised
                _warn(
                    f"{where} skipped: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(
                        ": "
                    )
                )
        ordered = sorted(classes.items(), key=lambda item: (item[0] not in self._builtin, self.order(item[1]), item[0]))
        self._classes = dict(ordered)
        return self._classes

    def _checked(self, point: metadata.EntryPoint, loaded: object) -> type[T]:
        if not isinstance(loaded, type) or not issubclass(loaded, self.base):
            raise TypeError(f"{point.value} is not a subclass of underfire.{self.base.__name__}")
        if getattr(loaded, "name", None) != point.name:
            raise TypeError(
                f"its class declares name {getattr(loaded, 'name', None)!r}, the entry point {point.name!r}"
            )
        return loaded


def _distribution(point: metadata.EntryPoint) -> str | None:
    dist = getattr(point, "dist", None)
    return None if dist is None else dist.name


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)
