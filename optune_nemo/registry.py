"""One small registry for every plugin family: losses, selection strategies, reward types, generation
engines, built-in tasks, metric sinks.

A family is a `Registry(key, ...)`: `key` is the config key that names a member (every error names it and
the allowed names). A member is registered one of two ways:

  - `@family.register("name")` on a class or function in the member's own module. The family's `package`
    is then given: its modules are imported on the first look-up, so that a new member is one file.
  - `family.register_path("name", "module:attribute")` in the family's package face, for a member whose
    module imports an optional backend when it is imported (tensorrt_llm, wandb, mlflow): checking a name
    never imports that backend; the first `get` does.

Where a family allows it (`outside`, e.g. "module:Class"), a member kept outside the package is named by
import path, `module:attribute`, in the config value itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from optune_nemo.errors import ConfigError

T = TypeVar("T")


def import_attribute(path: str, *, key: str):
    """The attribute `module:attribute` names; ConfigError naming `key` when it cannot be imported."""
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {path!r} ({e})") from None


def _module_of(member) -> str:
    return member.partition(":")[0] if isinstance(member, str) else getattr(member, "__module__", "")


class Registry(Generic[T]):
    """The members of one plugin family by name.

    key      the config key naming a member (e.g. `loss.name`), named by every error
    package  the package whose modules register themselves, imported on the first look-up; None when the
             package face registers every member
    outside  how the config names a member kept outside the package (`module:Class`, `module:attribute`),
             or None when the family has none (a name with `:` is then an unknown name)
    sort     list the names sorted (True), or (False) in the order of the package's modules that define
             them, and in registration order for the members the package face registers (where that order
             is what a user reads: the reward types' listing, the order the sinks open in)
    """

    def __init__(self, key: str, package: str | None = None, *, outside: str | None = None, sort: bool = True):
        self.key, self.package, self.outside, self.sort = key, package, outside, sort
        self._members: dict[str, T | str] = {}
        self._loaded = package is None

    def register(self, name: str):
        """Decorator: `@family.register("name")` on a class or function."""
        def decorate(obj: T) -> T:
            self._add(name, obj)
            return obj
        return decorate

    def register_path(self, name: str, path: str) -> None:
        """`name` is the attribute `module:attribute` names, imported on the first `get(name)`."""
        self._add(name, path)

    def _add(self, name: str, member) -> None:
        if name in self._members and self._members[name] is not member:
            raise ValueError(f"{self.key}: {name!r} is registered twice")
        self._members[name] = member

    def _load(self) -> None:
        if not self._loaded:
            pkg = importlib.import_module(self.package)
            modules = sorted(f"{self.package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__))
            for module in modules:
                importlib.import_module(module)
            # whichever module something else imported first, the listing follows the package's modules
            rank = {module: i for i, module in enumerate(modules)}
            in_order = sorted(self._members.items(), key=lambda item: rank.get(_module_of(item[1]), len(rank)))
            self._members, self._loaded = dict(in_order), True

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(sorted(self._members)) if self.sort else tuple(self._members)

    def _is_outside(self, name: str) -> bool:
        return self.outside is not None and ":" in name

    def check(self, name: str) -> None:
        """ConfigError naming the key and the allowed names unless `name` is a member, or (where the family
        allows it) an import path, which is not imported here: `get` imports it."""
        if self._is_outside(name):
            return
        self._load()
        if name not in self._members:
            raise ConfigError(f"{self.key}: must be one of {', '.join(self.names())} (got {name!r})")

    def get(self, name: str) -> T:
        """The member `name` names: a registered name or (where the family allows it) `module:attribute`;
        ConfigError naming the key and the allowed names otherwise."""
        if self._is_outside(name):
            return import_attribute(name, key=self.key)
        self._load()
        if name not in self._members:
            also = f" or {self.outside}" if self.outside else ""
            raise ConfigError(f"{self.key}: must be one of {', '.join(self.names())}{also} (got {name!r})")
        member = self._members[name]
        if isinstance(member, str):
            member = self._members[name] = import_attribute(member, key=self.key)
        return member
