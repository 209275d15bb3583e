"""One small registry for every plugin family (selection strategies first; losses, rewards, engines, tasks
and metric sinks move onto it as they are touched).

A family is a `Registry(key, package)`: `key` is the config key that names a member (for one-line errors),
`package` the package whose modules are imported on the first look-up so that each member is one file that
registers itself with `@family.register("name")`. A member kept outside the package is named by import
path, `module:attribute`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from optune_nemo.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, key: str, package: str):
        self.key, self.package = key, package
        self._members: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str):
        """Decorator: `@family.register("name")` on a class or function."""
        def decorate(obj: T) -> T:
            if name in self._members and self._members[name] is not obj:
                raise ValueError(f"{self.key}: {name!r} is registered twice")
            self._members[name] = obj
            return obj
        return decorate

    def _load(self) -> None:
        if not self._loaded:
            pkg = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{self.package}.{module.name}")
            self._loaded = True

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(sorted(self._members))

    def get(self, name: str) -> T:
        """The member `name` names: a registered name or `module:attribute`; ConfigError naming the key and
        the allowed names otherwise."""
        if ":" in name:
            module, _, attr = name.partition(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"{self.key}: cannot import {name!r} ({e})") from None
        self._load()
        if name not in self._members:
            raise ConfigError(f"{self.key}: must be one of {', '.join(self.names())} or module:attribute "
                              f"(got {name!r})")
        return self._members[name]
