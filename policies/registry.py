"""Name -> class registries for the three kinds of policy.

A registry maps a short name (the value of `OffloadConfig.prefetch`, `.eviction`, `.selection`) to a class.
Looking up an unknown name raises ValueError listing the registered ones.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._classes:
                raise ValueError(f"{self.kind} policy {name!r} is registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._classes)

    def check(self, name: object) -> str:
        if not isinstance(name, str) or name not in self._classes:
            raise ValueError(f"{self.kind}: unknown policy {name!r}; registered: {', '.join(self.names())}")
        return name

    def get(self, name: str) -> type[T]:
        return self._classes[self.check(name)]

    def create(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)


EVICTION: Registry = Registry("eviction")
PREFETCH: Registry = Registry("prefetch")
SELECTION: Registry = Registry("selection")
