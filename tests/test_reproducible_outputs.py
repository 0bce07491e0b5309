"""The same lineage run twice into two storage roots gives byte-identical files (timing columns aside), all
readable by other users (0644 / 0755 under umask 022)."""
import hashlib
import os
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from ops.manifest import TIMING_COLUMNS
from pipelines.definitions import build_definitions
from pipelines.demo import run_lineage
from tests.fixtures.layouts import build_mvtec

METHODS = ["cutpaste", "perlin"]
CHEAP = {"detection_options": {"detectors": ["segmenter"], "steps": {"segmenter": 4}, "val_every": 2,
                               "image_size": 32},
         "quality_options": {"ic_size": 32, "kid_subsets": 2, "kid_subset_size": 2, "is_splits": 1}}


def _run(root: Path, storage: Path) -> None:
    defs = build_definitions(storage_root=str(storage), dataset_roots=[str(root)], n_per_partition=4, **CHEAP)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("category", ["widget"])
        steps = run_lineage(defs, instance, ["widget"], METHODS, echo=lambda _l: None, log_level="CRITICAL")
    assert all(s.status == "ok" for s in steps), [(s.job, s.partition, s.error) for s in steps if s.status != "ok"]


def _files(storage: Path) -> dict[str, Path]:
    return {p.relative_to(storage).as_posix(): p for p in sorted(storage.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def _content(path: Path) -> object:
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
        return df.drop(columns=[c for c in TIMING_COLUMNS if c in df.columns]).to_json(orient="split")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro")
    root = build_mvtec(tmp / "data", "widget", n_train=4, n_test_good=2, defects={"scratch": 3, "hole": 3})
    old = os.umask(0o022)
    try:
        _run(root, tmp / "a")
        _run(root, tmp / "b")
    finally:
        os.umask(old)
    return tmp / "a", tmp / "b"


def test_two_runs_give_identical_files(two_runs):
    a, b = map(_files, two_runs)
    assert sorted(a) == sorted(b)
    kinds = {Path(rel).suffix for rel in a}
    assert {".parquet", ".png", ".ckpt", ".json", ".pt"} <= kinds  # the lineage really wrote every kind of file
    differ = [rel for rel in a if _content(a[rel]) != _content(b[rel])]
    assert not differ, f"files that differ between two identical runs: {differ}"


def test_outputs_are_readable_by_other_users(two_runs):
    storage = two_runs[0]
    wrong = [f"{p.relative_to(storage)} {oct(p.stat().st_mode & 0o777)}" for p in storage.rglob("*")
             if p.name != ".lock" and p.stat().st_mode & 0o777 != (0o755 if p.is_dir() else 0o644)]
    assert not wrong, wrong
