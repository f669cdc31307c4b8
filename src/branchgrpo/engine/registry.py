"""One registry helper for every "pick a function by name" choice (kernels, plans, advantage
rules, pruning, losses, rewards). Values are looked up by name, and an unknown name is an
error that lists the valid names and suggests the nearest one."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with helpful errors.

    >>> r = Registry[int]("number"); r.register("one")(1); r.get("one")
    1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            near = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {sorted(self._items)}.{hint}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
