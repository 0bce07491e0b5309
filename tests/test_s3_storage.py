"""The storage layer against a real S3 server (SeaweedFS on loopback, tests/s3_server.py): round trips, folders,
the content-hash cache under concurrent readers, and ingest from an s3:// dataset root."""
from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from ops.cache import ContentCache, upath
from ops.manifest import read_manifest, write_manifest
from ops.storage import Storage


def _sha(data: bytes) -> str:  # compared as hashes: pytest's diff of two 1 MB byte strings takes minutes
    return hashlib.sha256(data).hexdigest()


def _fs():
    return upath("s3://forge").fs


def test_bytes_and_manifests_round_trip_through_the_bucket(s3_server, storage_cache):
    storage = Storage(s3_server.url("rt"))
    assert not storage.is_local
    storage.write_bytes("images/a/0.png", b"\x89PNG one")
    assert storage.read_bytes("images/a/0.png") == b"\x89PNG one"
    assert _fs().cat_file("forge/rt/images/a/0.png") == b"\x89PNG one"  # really in the bucket, at that key
    df = pd.DataFrame({"image_path": ["images/a/0.png"], "n": [3]})
    path = storage.manifest_path("synthetic_anomalies", "brick|perlin")
    write_manifest(path, df, pa.schema([("image_path", pa.string()), ("n", pa.int64())]))
    assert _fs().exists("forge/rt/manifests/synthetic_anomalies/brick|perlin.parquet")
    pd.testing.assert_frame_equal(read_manifest(path), df)
    assert storage.list_files("images") == ["images/a/0.png"]
    storage.remove("images/a/0.png")
    assert storage.list_files("images") == []


def test_workdir_uploads_changes_and_removes_deleted_files(s3_server, storage_cache):
    storage = Storage(s3_server.url("wd"))
    with storage.workdir("adapters/brick/x") as d:
        assert isinstance(d, Path) and not str(d).startswith("s3:")
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "step-1.bin").write_bytes(b"ckpt")
        (d / "lora.safetensors").write_bytes(b"weights v1")
    assert storage.list_files("adapters/brick/x") == ["adapters/brick/x/checkpoints/step-1.bin",
                                                      "adapters/brick/x/lora.safetensors"]
    with storage.workdir("adapters/brick/x") as d:  # seeded with what the bucket holds (resumable fits)
        assert (d / "lora.safetensors").read_bytes() == b"weights v1"
        (d / "lora.safetensors").write_bytes(b"weights v2")
        (d / "checkpoints" / "step-1.bin").unlink()
    assert storage.list_files("adapters/brick/x") == ["adapters/brick/x/lora.safetensors"]
    assert storage.read_bytes("adapters/brick/x/lora.safetensors") == b"weights v2"
    mirror = storage.local_tree("adapters/brick/x")
    assert (mirror / "lora.safetensors").read_bytes() == b"weights v2"
    with pytest.raises(RuntimeError), storage.workdir("adapters/brick/x") as d:  # a failed fit uploads nothing
        (d / "lora.safetensors").write_bytes(b"half written")
        raise RuntimeError("training crashed")
    assert storage.read_bytes("adapters/brick/x/lora.safetensors") == b"weights v2"


def test_cache_concurrent_readers_share_one_entry_and_a_changed_object_gets_a_new_one(s3_server, tmp_path,
                                                                                    monkeypatch):
    data = os.urandom(1 << 20)
    _fs().pipe_file("forge/cache/big.bin", data)
    url, root = "s3://forge/cache/big.bin", tmp_path / "c"
    downloads = []
    store = ContentCache._put_blob

    def slow_store(self, payload, suffix):  # widens the window in which a second reader would download again
        downloads.append(len(payload))
        time.sleep(0.3)
        return store(self, payload, suffix)

    monkeypatch.setattr(ContentCache, "_put_blob", slow_store)
    start = threading.Barrier(4)

    def read(_):  # separate ContentCache objects, as separate runs have; flock is per open file, threads included
        start.wait()
        path = ContentCache(root).file(url)
        return str(path), hashlib.sha256(path.read_bytes()).hexdigest()

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(read, range(4)))
    assert len(set(got)) == 1 and got[0][1] == hashlib.sha256(data).hexdigest()
    assert len(downloads) == 1  # the others waited on the lock and found the entry
    root = str(root)
    cache = ContentCache(Path(root))
    blobs = sorted(p for p in (Path(root) / "blobs").rglob("*") if p.is_file())
    assert len(blobs) == 1 and blobs[0].name == f"{hashlib.sha256(data).hexdigest()}.bin"
    assert len([p for p in (Path(root) / "index").rglob("*") if p.is_file()]) == 1

    _fs().pipe_file("forge/cache/big.bin", data[::-1])  # same key and size, other content
    fresh = cache.file(url)
    assert _sha(fresh.read_bytes()) == _sha(data[::-1]) and str(fresh) != got[0][0]
    assert _sha(Path(got[0][0]).read_bytes()) == _sha(data)  # the old entry stays (a running reader may hold it)
    assert len([p for p in (Path(root) / "index").rglob("*") if p.is_file()]) == 2

    for p in (Path(root) / "blobs").rglob("*"):  # eviction: everything is older than keep_seconds=0
        os.utime(p, (1, 1))
    assert cache.prune(0, keep_seconds=0) >= 2 * len(data)
    assert not [p for p in (Path(root) / "blobs").rglob("*") if p.is_file()]
    assert _sha(cache.file(url).read_bytes()) == _sha(data[::-1])  # a pruned entry is fetched again


def test_ingest_reads_an_s3_dataset_root(s3_server, storage_cache, demo_root, demo_raw):
    from ops.ingest import discover_categories, ingest_category
    from ops.samples import load_sample

    fs = _fs()
    for f in sorted(p for p in (demo_root / "brick").rglob("*") if p.is_file()):
        fs.pipe_file(f"forge/datasets/mvtec/{f.relative_to(demo_root).as_posix()}", f.read_bytes())
    root = s3_server.url("datasets/mvtec")
    assert discover_categories(root) == [("brick", "mvtec")]
    rows = ingest_category(root, "brick").rows
    local = demo_raw["brick"]
    assert set(rows["dataset_root"]) == {root}  # recorded as the URL: any machine can read the rows again
    cols = [c for c in local.columns if c != "dataset_root"]
    pd.testing.assert_frame_equal(rows[cols], local[cols])
    defect = rows[rows["defect_type"] != "good"].iloc[0]
    sample = load_sample(defect)
    assert sample.source == f"{root}/{defect['image_path']}" and sample.mask.any()
    assert (storage_cache / "trees").is_dir()  # read through the local mirror, not from the test's own folder


def test_lock_on_an_s3_folder_serialises_writers_on_one_machine(s3_server, storage_cache):
    from ops.locks import storage_lock

    storage = Storage(s3_server.url("locks"))
    inside, overlaps = [], []

    def writer(i):
        with storage_lock(storage, "adapters/brick/anogen"):
            inside.append(i)
            overlaps.append(len(inside))
            time.sleep(0.2)
            inside.remove(i)

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(writer, range(3)))
    assert overlaps == [1, 1, 1]
    assert not storage.list_files("adapters")  # the lock lives in the local cache, not in the bucket


def test_dataset_roots_from_the_environment_keep_urls_whole(monkeypatch):
    from resources.settings import ForgeSettings

    monkeypatch.setenv("ANOMALY_FORGE_DATASETS", "/data/mvtec:s3://forge/datasets:/data/own")
    assert ForgeSettings.from_env().dataset_roots == ["/data/mvtec", "s3://forge/datasets", "/data/own"]
