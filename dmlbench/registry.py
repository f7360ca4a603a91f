"""One tiny registry used for methods, datasets and backbones (timm's ``register_model`` idea).

Entries register themselves at their definition site with ``@REGISTRY.register("name")``; the
package ``__init__`` imports the modules, which fills the registry. Unknown and duplicate names
fail loudly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from dmlbench.errors import UnknownNameError, close_matches

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → object mapping with loud failures.

    Example:
        >>> R: Registry[int] = Registry("number")
        >>> _ = R.register("one")(1)
        >>> R.get("one")
        1
        >>> R.get("two")
        Traceback (most recent call last):
        ...
        dmlbench.errors.UnknownNameError: unknown number 'two'; valid numbers: one.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        valid = self.names()
        hint = close_matches(name, valid)
        did = f" (did you mean {', '.join(hint)}?)" if hint else ""
        return f"unknown {self.kind} {name!r}{did}; valid {self.kind}s: {', '.join(valid)}."

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
