"""Method registry: name -> "module:Class", imported lazily so that listing methods never loads torch models.

Only implemented methods are listed; the Dagster ``method`` partition dimension is built from this list.

Third-party methods: an installed distribution registers a method without editing this file through the
entry-point group ``anomaly_forge.methods`` (``ENTRY_POINT_GROUP``), e.g. in its pyproject.toml::

    [project.entry-points."anomaly_forge.methods"]
    smudge = "my_package.smudge:Smudge"       # a subclass of ops.methods.base.Method

Choices: entry points are read once per process (``importlib.metadata``; ``refresh_methods()`` re-reads them)
and listed after the built-in methods, sorted by name; the class is imported only when the method is used. A
name that clashes with a built-in method or with another distribution's entry point is an error naming both
sources (silently preferring one would make results depend on install order), as is a name that is not a safe
partition key. A loaded object that is not a ``Method`` subclass with that ``name`` is an error naming the
distribution.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re

from ops.methods.base import Method

_METHODS: dict[str, str] = {
    "cutpaste": "ops.methods.cutpaste:CutPaste",
    "perlin": "ops.methods.perlin:Perlin",
    "apo": "ops.methods.apo:APO",
    "o2mag": "ops.methods.o2mag:O2MAG",
    "anogen": "ops.methods.anogen:AnoGen",
    "bgdisentangle": "ops.methods.bgdisentangle:BgDisentangle",
    "cadiff": "ops.methods.cadiff:CADiff",
}

BASELINES = ("cutpaste", "perlin")


ENTRY_POINT_GROUP = "anomaly_forge.methods"


@functools.lru_cache(maxsize=1)
def _plugins() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {ep.name!r} of distribution {ep.dist.name if ep.dist else '?'} ({ep.value})"
        if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", ep.name):
            raise ValueError(f"{where}: method names must be lower-case letters, digits and '_' (a partition key)")
        if ep.name in _METHODS:
            raise ValueError(f"{where} clashes with the built-in method {ep.name!r} ({_METHODS[ep.name]}); rename "
                             f"the entry point in that distribution")
        if ep.name in found and found[ep.name].value != ep.value:
            other = found[ep.name]
            raise ValueError(f"{where} clashes with {other.value} of distribution "
                             f"{other.dist.name if other.dist else '?'}; uninstall or rename one")
        found[ep.name] = ep
    return dict(sorted(found.items()))


def refresh_methods() -> None:
    """Re-read the installed entry points (after installing a method package in a running process)."""
    _plugins.cache_clear()


def available_methods() -> list[str]:
    return list(_METHODS) + list(_plugins())


def get_method(name: str) -> Method:
    if name in _METHODS:
        module, cls = _METHODS[name].split(":")
        return getattr(importlib.import_module(module), cls)()
    plugins = _plugins()
    if name not in plugins:
        raise KeyError(f"unknown generation method {name!r}; available: {', '.join(available_methods())}")
    ep = plugins[name]
    dist = ep.dist.name if ep.dist else "?"
    try:
        cls = ep.load()
    except Exception as e:
        raise ImportError(f"method {name!r} of distribution {dist} ({ep.value}) failed to import: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Method)) or getattr(cls, "name", None) != name:
        raise TypeError(f"method {name!r} of distribution {dist} ({ep.value}) must be a subclass of "
                        f"ops.methods.base.Method with name = {name!r}")
    return cls()
