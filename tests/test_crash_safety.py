"""kill -9 in the middle of synthetic generation, then a rerun: it continues from the last completed image and the
final files equal an uninterrupted run's; two runs of one partition never train the same adapter at once."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from ops import generation
from ops.ingest import ingest_category
from ops.splits import make_split
from ops.storage import Storage
from ops.types import Adapter
from tests.fixtures.layouts import build_mvtec

REPO = Path(__file__).resolve().parents[1]
N, CHUNK, KILL_AFTER = 10, 4, 6

CHILD = textwrap.dedent("""
    import os, signal, sys
    import pandas as pd
    from ops import generation
    from ops.storage import Storage

    split_path, storage_root, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real = generation.get_method

    class Dying:  # the real method, killed (SIGKILL: no cleanup, no finally) before result number kill_after + 1
        def __init__(self, name):
            self.m = real(name)
            self.done = 0

        def __getattr__(self, name):
            return getattr(self.m, name)

        def synthesize(self, *args, **kwargs):
            for result in self.m.synthesize(*args, **kwargs):
                if self.done == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                self.done += 1
                yield result

    generation.get_method = Dying
    split = pd.read_parquet(split_path)
    storage = Storage(storage_root)
    adapters = generation.fit_adapter(storage, "widget", "perlin", split, None, None)
    generation.synthesize_partition(storage, "widget", "perlin", split, adapters, None, %d, 0, None, chunk_size=%d)
""" % (N, CHUNK))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    root = build_mvtec(tmp / "data", "widget", n_train=4, defects={"scratch": 3, "hole": 3})
    df = make_split(ingest_category(root, "widget").rows)
    df.to_parquet(tmp / "split.parquet")
    return df, tmp / "split.parquet"


def _synthesize(storage, split_df, calls=None):
    if calls is not None:
        real = generation.get_method

        class Counting:
            def __init__(self, name):
                self.m = real(name)

            def __getattr__(self, name):
                return getattr(self.m, name)

            def synthesize(self, backbone, adapter, jobs, cfg):
                calls.extend(j.index for j in jobs)
                return self.m.synthesize(backbone, adapter, jobs, cfg)

        generation.get_method = Counting
    try:
        adapters = generation.fit_adapter(storage, "widget", "perlin", split_df, None, None)
        return generation.synthesize_partition(storage, "widget", "perlin", split_df, adapters, None, N, 0, None,
                                               chunk_size=CHUNK)
    finally:
        if calls is not None:
            generation.get_method = real


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_generation_resumes_after_kill_9_and_ends_equal_to_an_uninterrupted_run(split, tmp_path):
    split_df, split_path = split
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ANOMALY_FORGE_NO_PROGRESS": "1"}
    killed = subprocess.run([sys.executable, "-c", CHILD, str(split_path), str(tmp_path / "killed"), str(KILL_AFTER)],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    journals = list((tmp_path / "killed").rglob(".journal-*.jsonl"))
    assert len(journals) == 1 and len(journals[0].read_text().splitlines()) == KILL_AFTER

    calls: list[int] = []
    resumed = _synthesize(Storage(tmp_path / "killed"), split_df, calls)
    assert sorted(calls) == list(range(KILL_AFTER, N))  # only the jobs the killed run had not finished
    clean = _synthesize(Storage(tmp_path / "clean"), split_df)
    pd.testing.assert_frame_equal(resumed.drop(columns="seconds"), clean.drop(columns="seconds"))
    assert _files(tmp_path / "killed") == _files(tmp_path / "clean")  # journal swept, every image identical
    assert not list((tmp_path / "killed").rglob(".journal-*"))


def test_a_journal_of_other_settings_or_a_changed_image_is_not_reused(split, tmp_path):
    split_df, _ = split
    storage = Storage(tmp_path / "s")
    first = _synthesize(storage, split_df)
    expected = _files(tmp_path / "s")
    base = Path(storage.path(f"{generation.SYNTHETIC_DIR}/widget/perlin"))
    other = base / ".journal-0123456789abcdef.jsonl"  # another fingerprint: ignored, then swept
    other.write_text(first.drop(columns="seconds").head(1).to_json(orient="records", lines=True))
    # this run's journal claims jobs 0 and 1, but job 0's image was overwritten since; the last line is torn
    name = generation._fingerprint("widget", "perlin", 0, first["config_json"].iloc[0], "affine", None,
                                   Adapter("perlin", "widget", None, {"trained": False}), split_df)
    (base / f".journal-{name}.jsonl").write_text(first.head(2).to_json(orient="records", lines=True) + '{"torn')
    (tmp_path / "s" / first["image_path"].iloc[0]).write_bytes(b"not the image")
    calls: list[int] = []
    _synthesize(storage, split_df, calls)
    assert calls == [0] + list(range(2, N))
    assert _files(tmp_path / "s") == expected


def test_two_runs_of_one_partition_never_fit_the_same_adapter_at_once(split, tmp_path, monkeypatch):
    split_df, _ = split
    active, trained, reused = [], [], []
    real = generation.get_method

    class Slow:
        def __init__(self, name):
            self.m = real(name)

        def __getattr__(self, name):
            return getattr(self.m, name)

        def fit(self, backbone, support, cfg, out_dir, progress):
            active.append(1)
            assert len(active) == 1, "two fits of one adapter ran at the same time"
            done = Path(out_dir) / "adapter.bin"
            if done.exists():
                reused.append(1)
            else:
                time.sleep(0.5)  # without the lock the other run gets here too and trains again
                done.write_bytes(b"weights")
                trained.append(1)
            active.pop()
            return Adapter("perlin", "widget", done, {"trained": True})

    monkeypatch.setattr(generation, "get_method", Slow)
    storage = Storage(tmp_path / "s")
    errors = []

    def run():
        try:
            generation.fit_adapter(storage, "widget", "perlin", split_df, None, None)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert (len(trained), len(reused)) == (1, 1)


def test_quality_summary_written_last_holds_every_partition_present(tmp_path, monkeypatch):
    """Two partitions finish together: the summary run whose input was loaded before the second partition's
    manifest existed must not write a summary without it (it rebuilds from what exists at write time)."""
    import dagster as dg

    from assets.partitions import category_method_partitions
    from assets.quality import quality_summary
    from ops.metrics.quality import ALL, SUMMARY_COLS
    from resources.settings import ForgeSettings
    from resources.storage import ParquetIOManager, StorageResource

    storage = Storage(tmp_path / "s")

    def manifest(method):
        row = {c: 0.5 for c in SUMMARY_COLS} | {"category": "widget", "method": method, "defect_type": ALL,
                                                 "n_generated": 4, "n_real": 4, "sources_json": "{}"}
        path = storage.manifest_path("quality_metrics", f"widget|{method}")
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([row]).to_parquet(path)

    manifest("cutpaste")
    manifest("perlin")
    stale = pd.read_parquet(storage.manifest_path("quality_metrics", "widget|cutpaste"))
    monkeypatch.setattr(ParquetIOManager, "load_input", lambda self, context: stale)  # loaded before perlin's
    root = str(storage.root)
    resources = {"storage": StorageResource(root=root), "io_manager": ParquetIOManager(root=root),
                 "settings": ForgeSettings(dataset_roots=[root])}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("category", ["widget"])
        upstream = dg.AssetSpec("quality_metrics", partitions_def=category_method_partitions)
        assert dg.materialize([upstream, quality_summary], instance=instance, resources=resources).success
    summary = pd.read_parquet(storage.manifest_path("quality_summary", None))
    assert set(summary.loc[summary["category"] == "widget", "method"]) == {"cutpaste", "perlin"}
