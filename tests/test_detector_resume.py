"""kill -9 in the middle of detector training (anomalib Engine), then a rerun: training continues from its last
epoch-start checkpoint and the detector folder ends byte-identical to an uninterrupted run's. Every run is its own
process, as a rerun after a crash is. The uninterrupted run uses another storage root (``clean`` sorts before the
dataset folder, ``killed`` after it), so the result must not depend on where storage lives either."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd

from ops import generation
from ops.ingest import ingest_category
from ops.splits import make_split
from ops.storage import Storage
from tests.fixtures.layouts import build_mvtec

REPO = Path(__file__).resolve().parents[1]
# 9 training rows at batch 4: 3 steps an epoch, 4 epochs; the kill comes once the state after epoch 1 is saved
# 64 px crops of the 96 px images: training draws from the global generator, so its seeding is under test too
CFG = {"detectors": ["segmenter"], "steps": {"segmenter": 12}, "val_every": 4, "image_size": 96, "batch_size": 4,
       "options": {"segmenter": {"train_crop": 64}}}
KILL_AFTER_EPOCH = 1
NEVER = 99  # no such epoch: the child runs to the end

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import pandas as pd
    from ops.detection import anomalib_models as am
    from ops.detection.stage import train_detectors
    from ops.storage import Storage

    split_path, synth_path, root, kill_after, cfg = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), eval(sys.argv[5])
    save, seed = am.ResumePoint.on_train_epoch_start, am.EpochSeeds.on_train_epoch_start
    epochs = []

    def dying(self, trainer, module):  # SIGKILL (no cleanup, no finally) once the state after epoch kill_after is saved
        save(self, trainer, module)
        if trainer.current_epoch == kill_after + 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def counting(self, trainer, module):
        epochs.append(trainer.current_epoch)
        seed(self, trainer, module)

    am.ResumePoint.on_train_epoch_start, am.EpochSeeds.on_train_epoch_start = dying, counting
    df = train_detectors(Storage(root), "widget", "perlin", pd.read_parquet(split_path), pd.read_parquet(synth_path),
                         None, cfg)
    df.drop(columns="seconds").to_parquet(os.path.join(root, "detectors.parquet"))
    print(json.dumps(epochs))
""")


def _inputs(tmp: Path, storage: Storage):
    root = build_mvtec(tmp / "data", "widget", n_train=4, defects={"scratch": 3, "hole": 3})
    split = make_split(ingest_category(root, "widget").rows)
    adapters = generation.fit_adapter(storage, "widget", "perlin", split, None, None)
    synth = generation.synthesize_partition(storage, "widget", "perlin", split, adapters, None, 8, 0, None)
    return split, synth


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _train(tmp: Path, storage: Storage, kill_after: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ANOMALY_FORGE_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-c", CHILD, str(tmp / "split.parquet"), str(tmp / "synth.parquet"),
                           str(storage.root), str(kill_after), repr(CFG)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_detector_training_resumes_after_kill_9_and_ends_equal_to_an_uninterrupted_run(tmp_path):
    killed, clean = Storage(tmp_path / "killed"), Storage(tmp_path / "clean")
    split, synth = _inputs(tmp_path, killed)
    _inputs(tmp_path / "again", clean)
    split.to_parquet(tmp_path / "split.parquet")
    synth.to_parquet(tmp_path / "synth.parquet")

    child = _train(tmp_path, killed, KILL_AFTER_EPOCH)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    folder = Path(killed.path("detectors/widget/perlin/segmenter"))
    assert len(list((folder / "resume").glob("*/last.ckpt"))) == 1 and not (folder / "config.json").exists()

    rerun, uninterrupted = _train(tmp_path, killed, NEVER), _train(tmp_path, clean, NEVER)
    assert rerun.returncode == 0 and uninterrupted.returncode == 0, (rerun.stderr + uninterrupted.stderr)[-3000:]
    assert json.loads(rerun.stdout.strip().splitlines()[-1]) == [2, 3]  # continued, did not start over
    assert json.loads(uninterrupted.stdout.strip().splitlines()[-1]) == [0, 1, 2, 3]
    assert not (folder / "resume").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(Path(killed.root) / "detectors.parquet"),
                                  pd.read_parquet(Path(clean.root) / "detectors.parquet"))
    assert _files(folder) == _files(Path(clean.path("detectors/widget/perlin/segmenter")))
