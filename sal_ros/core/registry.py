"""One shape for every plug-in family (frame sources, mask sources, score sources, teachers, backbones): a name ->
plug-in mapping in registration order, filled by ``register`` where each plug-in is defined or wired, read by
``lookup``, whose error names the family and every known name."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


class Registry(dict):
    """Plug-ins of one ``family`` by name. A dict (iterate, ``in``, ``values()``), so listings read as any mapping;
    ``register`` refuses a name twice, ``lookup`` raises ``error`` for a name nobody registered."""

    def __init__(self, family: str, error: type[Exception] = ValueError) -> None:
        super().__init__()
        self.family = family
        self.error = error

    def register(self, name: str, plugin: T) -> T:
        if name in self:
            raise ValueError(f"{self.family} {name!r} is registered already")
        self[name] = plugin
        return plugin

    def registers(self, name: str) -> Callable[[T], T]:
        """``@REGISTRY.registers("name")`` above a class or factory."""
        return lambda plugin: self.register(name, plugin)

    def lookup(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise self.error(f"unknown {self.family} {name!r}; known: {', '.join(self)}") from None
