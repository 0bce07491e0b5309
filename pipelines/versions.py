"""Code versions of the assets, so that Dagster marks partitions *stale* when their code or settings change.

Dagster records, with every materialization, the asset's code version and the data versions of its inputs; a
partition is stale when either differs now. Assets that do not return a data version get a logical one computed
from their code version and their inputs' data versions, so a regeneration with the same code, settings and
inputs produces the same data version and leaves everything downstream up to date. ``raw_defect_sets`` returns
a content hash of the files it read (``assets.ingest``): re-ingesting an unchanged folder changes nothing
downstream, a replaced image makes the category's whole lineage stale.

Choices:
- An asset's code version is a hash of (a) the source of its compute function and of the module-level helpers
  it calls, (b) the source of every ``ops`` module reachable from the ``ops`` imports of those functions (the
  transitive closure, found by parsing, without importing torch; lazy ``"ops.x:Class"`` strings such as the
  method registry's count as imports), (c) the values of the ``ForgeSettings`` fields
  those functions read (``settings.<field>``; ``settings.method_config`` reads ``method_options``), and (d) the
  backbone model name when the function takes the ``backbone`` resource.
- It is one value per asset, not per partition: a change in one method's options or one method's package makes
  every method's partitions of that asset stale (the registry imports every method). Coarse, but never stale-free
  after a change that matters; per-partition precision would need per-partition code versions, which Dagster
  does not have.
- Settings changed per run in the launchpad are not seen (code versions are fixed when the definitions load);
  the environment and ``build_definitions`` overrides are.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import re
from pathlib import Path
from typing import Any, Iterable

import dagster as dg

ROOT = Path(__file__).resolve().parents[1]
_LAZY = re.compile(r"^ops(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?$")
_SETTINGS_ALIASES = {"method_config": "method_options", "active_methods": "methods"}


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_ops_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names of the ``ops`` modules that the statements in ``tree`` import (relative imports resolved)."""
    out: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _LAZY.match(node.value):
            out.add(node.value.split(":")[0])  # a lazy import target, e.g. the registry's "ops.methods.apo:APO"
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name == "ops" or a.name.startswith("ops."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if not (name == "ops" or name.startswith("ops.")):
                continue
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names if _module_path(f"{name}.{a.name}"))
    return out


def ops_closure(start: Iterable[str]) -> dict[str, Path]:
    """Every ``ops`` module reachable from ``start`` through imports (parents of a submodule included)."""
    todo = list(start)
    found: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in found)
        if name in found:
            continue
        path = _module_path(name)
        if path is None:
            continue
        found[name] = path
        todo.extend(m for m in _parsed(name, path)[1] if m not in found)
    return found


@functools.lru_cache(maxsize=None)
def _parsed(name: str, path: Path) -> tuple[bytes, frozenset[str]]:
    """(source key, imported ops modules) of one module file; parsed once per process."""
    tree = ast.parse(path.read_text())
    imports = frozenset(_imported_ops_modules(tree, name, path.name == "__init__.py"))
    return _source_key(tree), imports


def _function_nodes(fn: Any) -> tuple[list[ast.FunctionDef], ast.Module, str]:
    """The compute function's AST node and those of the module-level helpers it calls (transitively)."""
    module = inspect.getmodule(fn)
    tree = ast.parse(inspect.getsource(module))
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    todo, seen = [fn.__name__], {}
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen[name] = defs[name]
        # helpers only: a decorated function is another asset or check, referenced here as an input name
        todo.extend(n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name) and n.id in defs
                    and not defs[n.id].decorator_list)
    return [seen[k] for k in sorted(seen)], tree, module.__name__


def settings_fields(nodes: Iterable[ast.AST]) -> list[str]:
    """``ForgeSettings`` fields read as ``settings.<name>`` in ``nodes`` (methods mapped to the field they read)."""
    out = set()
    for root in nodes:
        for n in ast.walk(root):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "settings":
                out.add(_SETTINGS_ALIASES.get(n.attr, n.attr))
    return sorted(out)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _source_key(node: ast.AST) -> bytes:
    """The code, not its docstrings, comments or formatting: a docs edit must not cost a GPU regeneration."""
    return ast.dump(_strip_docstrings(node)).encode()


def code_version(fn: Any, settings: Any, backbone_model: str | None) -> str:
    nodes, tree, module = _function_nodes(fn)
    top_level_ops = {m for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                     for m in _imported_ops_modules(n, module, False)}
    inner_ops = {m for n in nodes for m in _imported_ops_modules(n, module, False)}
    h = hashlib.sha256()
    for node in nodes:
        h.update(_source_key(node))
    for name, path in sorted(ops_closure(top_level_ops | inner_ops).items()):
        h.update(name.encode())
        h.update(_parsed(name, path)[0])
    fields = {f: getattr(settings, f) for f in settings_fields(nodes) if hasattr(settings, f)}
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    if backbone_model is not None and "backbone" in inspect.signature(fn).parameters:
        h.update(f"backbone={backbone_model}".encode())
    return h.hexdigest()[:16]


def with_code_versions(assets: list[Any], settings: Any, backbone_model: str | None) -> list[Any]:
    """``assets`` with a code version (see the module docstring) on every single-asset definition."""
    out = []
    for a in assets:
        fn = getattr(getattr(a.op, "compute_fn", None), "decorated_fn", None) if a.is_executable else None
        if fn is None or len(a.keys) != 1:
            out.append(a)
            continue
        version = code_version(fn, settings, backbone_model)
        out.append(dg.map_asset_specs(lambda spec, v=version: spec.replace_attributes(code_version=v), [a])[0])
    return out
