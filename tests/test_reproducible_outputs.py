"""Byte reproducibility and permissions. The slow pair: the same lineage (perlin on a tiny fixture, every stage)
run twice into two storage roots gives byte-identical files (timing columns aside), all readable by other users
(0644 / 0755 under umask 022); the fast tests pin the pieces (safetensors headers, umask modes)."""
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

METHODS = ["perlin"]
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


def test_canonical_safetensors_is_independent_of_the_metadata_order():
    import json
    import struct

    import torch
    from safetensors.torch import load, save

    from ops.atomic import canonical_safetensors
    from ops.diffusion.lora import _sorted_adapter_metadata

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}

    def with_order(keys):
        data = save(tensors, metadata={"format": "pt"})
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        header["__metadata__"] = {k: {"format": "pt", "z": "1", "lora_adapter_metadata": json.dumps(
            {"unet.target_modules": keys, "unet.r": 4})}[k] for k in keys}
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + data[8 + n:]

    one = with_order(["format", "z", "lora_adapter_metadata"])
    two = with_order(["lora_adapter_metadata", "z", "format"])
    assert one != two
    assert canonical_safetensors(one, _sorted_adapter_metadata) == canonical_safetensors(two, _sorted_adapter_metadata)
    loaded = load(canonical_safetensors(one, _sorted_adapter_metadata))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    from ops.atomic import write_bytes_atomic

    old = os.umask(umask)
    try:
        write_bytes_atomic(tmp_path / "sub" / "f.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "sub" / "f.bin").stat().st_mode & 0o777 == mode


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


@pytest.mark.slow
def test_two_runs_give_identical_files(two_runs):
    a, b = map(_files, two_runs)
    assert sorted(a) == sorted(b)
    kinds = {Path(rel).suffix for rel in a}
    assert {".parquet", ".png", ".ckpt", ".json", ".pt"} <= kinds  # the lineage really wrote every kind of file
    differ = [rel for rel in a if _content(a[rel]) != _content(b[rel])]
    assert not differ, f"files that differ between two identical runs: {differ}"


@pytest.mark.slow
def test_outputs_are_readable_by_other_users(two_runs):
    storage = two_runs[0]
    wrong = [f"{p.relative_to(storage)} {oct(p.stat().st_mode & 0o777)}" for p in storage.rglob("*")
             if p.name != ".lock" and p.stat().st_mode & 0o777 != (0o755 if p.is_dir() else 0o644)]
    assert not wrong, wrong
