"""Shared fixtures. Session fixtures return shared objects: copy DataFrames before changing them."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

# tqdm bars only clutter captured test output.
os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")

# torch-fidelity installs a regular top-level package "tests" into site-packages, and a regular package wins
# over this folder (a namespace package without __init__.py) wherever it sits on sys.path; without this,
# `from tests.fixtures import ...` fails. An empty tests/__init__.py would make this a no-op.
_HERE = Path(__file__).resolve().parent
if str(_HERE) not in list(getattr(sys.modules.get("tests"), "__path__", [])):
    _pkg = types.ModuleType("tests")
    _pkg.__path__ = [str(_HERE)]
    sys.modules["tests"] = _pkg


