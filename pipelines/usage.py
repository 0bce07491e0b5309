"""Checks of the command-line arguments, done before any work: every user error becomes one :class:`UsageError`
line that names the bad value and the fix (``anomaly-forge`` prints it and exits with status 2).

Choices:
- Validation runs before anything is written or launched (no dataset built, no Dagster run started), so a typo
  never leaves half a lineage behind or costs an ingest re-run.
- Problems of the environment the user can fix (no permission, read-only or full file system) are user errors
  too: one line naming the file. Everything else is a bug and keeps its traceback.
- ``--settings`` is checked to the last nested key (``ForgeSettings.check_options``): unknown names at any level
  are errors listing the known ones.
"""
from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

# errno values that mean "the user's machine refuses", not "the program is wrong"
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


class UsageError(Exception):
    """A user error: the message is one line naming the bad value and the fix."""


def csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def methods(text: str | None, option: str = "--methods") -> list[str] | None:
    """The listed methods (None: all registered), each one registered."""
    from ops.methods.registry import available_methods

    names = csv(text)
    if text is not None and not names:
        raise UsageError(f"{option} is empty; give comma-separated method names from {', '.join(available_methods())}")
    unknown = [m for m in names or [] if m not in available_methods()]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown} in {option}; known: {', '.join(available_methods())} "
                         f"(anomaly-forge list-methods)")
    return names


def demo_categories(text: str | None) -> list[str] | None:
    from ops.demo_data import CATEGORIES

    names = csv(text)
    if text is not None and not names:
        raise UsageError(f"--categories is empty; choose from {', '.join(sorted(CATEGORIES))}")
    unknown = [c for c in names or [] if c not in CATEGORIES]
    if unknown:
        raise UsageError(f"unknown demo category {unknown} in --categories; choose from "
                         f"{', '.join(sorted(CATEGORIES))}")
    return names


def at_least(value: int, minimum: int, option: str, why: str = "") -> int:
    if value < minimum:
        raise UsageError(f"{option} {value}: it must be >= {minimum}{f' ({why})' if why else ''}")
    return value


def category_name(name: str) -> str:
    from ops.storage import check_name

    try:
        return check_name(name, "category")
    except ValueError as e:
        raise UsageError(str(e)) from None


def folder(path: str, option: str) -> Any:
    """A local dataset folder, resolved; a URL (s3://...) as given (find_categories reports what it holds)."""
    from ops.cache import is_remote

    if is_remote(path):
        return path.rstrip("/")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"{option} {path}: {'not a folder' if p.exists() else 'no such folder'}; give the dataset "
                         f"root that contains the category folder")
    return p.resolve()


def settings_json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--settings is not valid JSON ({e}); e.g. --settings "
                         f"'{{\"detection_options\": {{\"detectors\": [\"segmenter\"]}}}}'") from None
    if not isinstance(value, dict):
        raise UsageError("--settings must be a JSON object of ForgeSettings fields, e.g. '{\"seed\": 1}'")
    return value


def settings(values: dict[str, Any], option: str = "--settings", **fixed: Any) -> Any:
    """``ForgeSettings`` from the environment + ``values`` + ``fixed``, checked to the last nested option."""
    from resources.settings import ForgeSettings

    clash = sorted(set(values) & set(fixed))
    if clash:
        raise UsageError(f"{option} sets {clash}, which this command sets itself; use the command's own options")
    try:
        return ForgeSettings.from_env(**values, **fixed).check_options()
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{option}: {_one_line(e)}") from None


def environment_error(e: OSError) -> str | None:
    """One line for an OSError the user can fix (permissions, read-only or full disk); None for anything else."""
    if e.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f" {e.filename}" if e.filename else ""
    fix = {errno.ENOSPC: "free space or point the output elsewhere",
           errno.EDQUOT: "free space or point the output elsewhere",
           errno.EROFS: "the file system is read-only; point the output at a writable folder"}.get(
        e.errno, "check the file's owner and permissions, or point the output at a folder you can write")
    return f"cannot access{where}: {e.strerror}; {fix}"


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split())

