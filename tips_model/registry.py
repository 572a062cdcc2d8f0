"""Name -> builder registries for encoders and objectives (timm-style).

Every model that can be named in a config (production or tiny test variant) goes through
the same door: ``register`` at definition time, ``get`` / ``build`` by name, ``names`` to
list. Lookups of an unknown name raise ``KeyError`` listing what is registered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """A named table of builders."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator: register ``fn`` under ``name`` (default: the function's name)."""

        def deco(fn: F) -> F:
            key = name or fn.__name__
            if key in self._entries:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


VISION = Registry("vision encoder")
TEXT = Registry("text encoder")
OBJECTIVES = Registry("objective")
