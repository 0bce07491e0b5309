"""Few-shot splits of a raw manifest: which real defect images an adapter may see (support) and which are
held out for evaluation (DESIGN §4).

Roles: ``support`` / ``holdout`` for defect images, ``train_good`` for split "train" normal images,
``test_good`` for split "test" normal images (held out as well).

Protocols, with the choices made where the papers are vague:

- ``anomalydiffusion`` (default): per (category, defect type) the defect images are sorted by file name
  (the basename of ``image_path``; ``image_id`` breaks ties) and the first floor(n/3) are support. A type
  with n = 2 gets 1 support image instead of 0 (so that every type with a held-out image can be
  generated); a type with n = 1 is an error, since it cannot give both a support and a held-out image.
  ``seed`` has no effect and is recorded only.
- Image-level-only categories (layout ``mvtec-image-level``, no masks) get no support set under either protocol:
  every defect image is held out (``ops.image_level``).
- ``k_shot``: k support images per type drawn without replacement by ``numpy.random.default_rng`` seeded
  with (seed, crc32("<category>/<defect type>")), so one type's draw does not change when another type is
  added or removed. Every type needs at least k + 1 images. ``protocol`` records "k_shot"; k is the number
  of support rows per type.
"""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pyarrow as pa

from ops.image_level import is_image_level
from ops.ingest import RAW_SCHEMA

PROTOCOLS = ("anomalydiffusion", "k_shot")
ROLES = ("support", "holdout", "train_good", "test_good")

SPLIT_SCHEMA = pa.schema(list(RAW_SCHEMA) + [
    pa.field("role", pa.string()),
    pa.field("protocol", pa.string()),
    pa.field("split_seed", pa.int64()),
])


def make_split(raw_df: pd.DataFrame, protocol: str = "anomalydiffusion", k: int | None = None,
               seed: int = 0) -> pd.DataFrame:
    """Assign a role to every row of a raw manifest (one or several categories)."""
    missing = [c for c in RAW_SCHEMA.names if c not in raw_df.columns]
    if missing:
        raise ValueError(f"make_split needs a raw manifest (ops.ingest.RAW_SCHEMA); missing columns {missing}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown split protocol {protocol!r}; use one of {PROTOCOLS}")
    if protocol == "k_shot" and (not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1):
        raise ValueError(f"protocol 'k_shot' needs k = a positive integer, got {k!r}")
    df = raw_df[RAW_SCHEMA.names].reset_index(drop=True).copy()
    good = df["defect_type"] == "good"
    role = pd.Series(np.where(df["split"] == "train", "train_good", "test_good"), index=df.index, dtype=object)
    role[~good] = "holdout"
    for (category, defect_type), group in df[~good].groupby(["category", "defect_type"], sort=True):
        if is_image_level(group):
            continue  # nothing can learn from a defect without its region: all held out
        names = group["image_path"].map(lambda p: p.rsplit("/", 1)[-1])
        ordered = group.assign(_name=names).sort_values(["_name", "image_id"], kind="stable").index
        role[_support(ordered, protocol, k, seed, category, defect_type)] = "support"
    df["role"] = role.astype(str)
    df["protocol"] = protocol
    df["split_seed"] = np.int64(seed)
    df = df.sort_values(["category", "split", "defect_type", "image_id"], kind="stable", ignore_index=True)
    return pa.Table.from_pandas(df[SPLIT_SCHEMA.names], schema=SPLIT_SCHEMA, preserve_index=False).to_pandas()


def _support(ordered: pd.Index, protocol: str, k: int | None, seed: int, category: str, defect_type: str) -> list:
    n = len(ordered)
    where = f"category {category!r}, defect type {defect_type!r}"
    if protocol == "anomalydiffusion":
        if n < 2:
            raise ValueError(f"{where}: only {n} defect image; the few-shot split needs at least 2 (one support, "
                             f"one held out): add images of this type or remove its folder")
        return list(ordered[:max(1, n // 3)])
    if n < k + 1:
        raise ValueError(f"{where}: {n} defect images, k_shot with k={k} needs at least {k + 1} (k support + 1 "
                         f"held out): lower k or add images")
    rng = np.random.default_rng([seed, zlib.crc32(f"{category}/{defect_type}".encode())])
    return list(ordered[np.sort(rng.choice(n, size=k, replace=False))])


def check_no_leakage(split_df: pd.DataFrame) -> list[str]:
    """Problems that would let evaluation data reach training; an empty list means the split is clean."""
    missing = [c for c in SPLIT_SCHEMA.names if c not in split_df.columns]
    if missing:
        return [f"not a split manifest: missing columns {missing}"]
    problems: list[str] = []
    bad = sorted(set(split_df["role"]) - set(ROLES))
    if bad:
        problems.append(f"unknown roles {bad}; allowed: {list(ROLES)}")
    expected = np.where(split_df["defect_type"] == "good",
                        np.where(split_df["split"] == "train", "train_good", "test_good"), None)
    for row, exp in zip(split_df.itertuples(index=False), expected):
        if exp is not None and row.role != exp:
            problems.append(f"{row.category}/{row.image_id}: {row.split} good image has role {row.role!r}, "
                            f"expected {exp!r}")
        elif exp is None and row.role not in ("support", "holdout"):
            problems.append(f"{row.category}/{row.image_id}: defect image has role {row.role!r}, expected "
                            f"'support' or 'holdout'")
    for category, cat in split_df.groupby("category", sort=True):
        dup = cat["image_id"][cat["image_id"].duplicated()]
        problems += [f"{category}/{i}: image id appears more than once" for i in sorted(set(dup))]
        evaluation = cat[cat["role"].isin(["holdout", "test_good"])]
        for role in ("support", "train_good"):
            training = cat[cat["role"] == role]
            ids = sorted(set(training["image_id"]) & set(evaluation["image_id"]))
            problems += [f"{category}/{i}: {role} image id is also held out" for i in ids]
            shared = set(training["sha256"]) & set(evaluation["sha256"])
            for sha in sorted(shared):
                a = sorted(training.loc[training["sha256"] == sha, "image_id"])
                b = sorted(evaluation.loc[evaluation["sha256"] == sha, "image_id"])
                problems.append(f"{category}: {role} {a} and held-out {b} are the same file (sha256 {sha[:12]})")
    return problems
