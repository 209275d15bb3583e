"""Exit 0 when the installed Transformer Engine is inside the range megatron-core declares for it (its `dev`
extra), 1 otherwise (none installed, or outside): the image build keeps the base image's TE when it fits,
and builds the pinned TE_VERSION from source only when it does not (docs/container.md)."""

from __future__ import annotations

import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version


def declared_range(requires: list[str]) -> str:
    """megatron-core's Transformer Engine specifier, e.g. '<2.12,>=2.9'."""
    for r in requires:
        req = Requirement(r)
        if req.name == "transformer-engine":
            return str(req.specifier)
    raise SystemExit("megatron-core declares no transformer-engine requirement")


def in_range(version: str | None, spec: str) -> bool:
    """Whether `version` (a local suffix such as NGC's '+40c69e75' ignored) satisfies `spec`."""
    from packaging.specifiers import SpecifierSet

    if not version:
        return False
    try:
        public = Version(version).public
    except InvalidVersion:
        return False
    return SpecifierSet(spec).contains(public, prereleases=True)


def installed_version() -> str | None:
    for name in ("transformer-engine", "transformer_engine"):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def main() -> int:
    spec = declared_range(md.requires("megatron-core") or [])
    version = installed_version()
    ok = in_range(version, spec)
    print(f"Transformer Engine {version or '(none)'}: {'inside' if ok else 'outside'} megatron-core's {spec}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
