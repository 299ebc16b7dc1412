"""Name -> object registries. An unknown name raises an error listing the registered names."""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A small named registry: ``reg.register("name")(obj)`` or ``reg.add("name", obj)``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def add(self, name: str, obj: T, *, aliases: tuple = (), overwrite: bool = False) -> T:
        for key in (name, *aliases):
            key = key.lower()
            if key in self._items and not overwrite:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
        return obj

    def register(self, name: str, *, aliases: tuple = (), overwrite: bool = False) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            return self.add(name, obj, aliases=aliases, overwrite=overwrite)

        return deco

    def get(self, name: str) -> T:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        try:
            return self._items[name.lower()]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def names(self) -> list:
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
