"""Method registry: name -> "module:Class", imported lazily so that listing methods never loads torch models.

Only implemented methods are listed; the Dagster ``method`` partition dimension is built from this list.
"""
from __future__ import annotations

import importlib

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


def available_methods() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> Method:
    try:
        target = _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown generation method {name!r}; available: {', '.join(_METHODS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()
