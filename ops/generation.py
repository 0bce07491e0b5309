"""Generation stage: fit a method's adapter per category, plan seeded synthesis jobs, write images + manifest.

Choices the contracts leave open:

- Job seeds: job i of (seed, category, method) gets the first 63 bits of
  ``SeedSequence([seed, key(category), key(method), i])`` where ``key`` is the first 64 bits of the text's
  SHA-256, so seeds are stable across processes and Python versions (no ``hash()``) and a job's seed does
  not depend on n. Planning draws from ``SeedSequence(job_seed, spawn_key=(0,))``; methods draw from the job
  seed itself, so planning and method randomness are independent streams.
- Job i gets the defect type ``sorted(support types)[i % k]``; its normal image is drawn uniformly from the
  ``train_good`` rows (sorted by image_id), its reference uniformly from the support rows of that type. A
  method without a reference still gets its target mask from a support mask drawn the same way.
- Jobs are planned and synthesized in chunks of ``chunk_size`` (one job's plan depends only on its index), so
  memory stays bounded for large n and results do not depend on the chunk size. Loaded normal images and
  their foreground masks are cached (bounded LRU) because many jobs share them.
- Output layout under ``images/synthetic_anomalies/<category>/<method>/``: ``images/<type>/<i:05d>.png``,
  ``masks/<type>/<i:05d>_mask.png`` (anomalib's Folder pairs masks whose stem contains the image stem),
  ``targets/<type>/<i:05d>_target.png``, ``extras/<name>/<type>/<i:05d>.png`` (float maps in [0, 1] as
  16-bit PNG). After a successful run every other file under that folder is deleted (stale files of a run
  with a larger n, temp files of a crashed one), so the folder mirrors the manifest exactly.
- Every column of a rerun with the same inputs is identical except ``seconds`` (a measured timing).
- Crash safety (kill -9 included): after each image's files are written, its manifest row is appended to a
  journal (``<base>/.journal-<fingerprint>.jsonl``, flushed and fsynced). A rerun with the same fingerprint
  (category, method, seed, config, target options, adapter, split rows) takes every journalled job whose image
  still has the journalled sha256 and synthesizes only the rest; a torn last line is ignored. Jobs are
  deterministic per seed, so the final files equal an uninterrupted run's. The journal goes with the stale-file
  sweep at the end.
- Adapter fitting holds the lock of ``adapters/<category>/<method>`` (``ops.locks``): two runs of one partition
  never train the same adapter at once; the second resumes from (and so reuses) the first's final checkpoint.
- Image-level-only categories (no real masks, ``ops.image_level``): only methods with ``needs_masks = False``
  run (others are refused with the reason), on box targets, without a support set, under defect type "anomaly".
- The method's own mask is the row's mask; an empty one is an error, not a silent row without a defect.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from ops.image_level import MASK_FREE_TYPE, is_image_level, plan, skip_reason
from ops.locks import storage_lock
from ops.manifest import dumps, to_table
from ops.masks.targets import foreground_mask, sample_target_mask
from ops.methods.base import Progress, check_results
from ops.methods.registry import available_methods, get_method
from ops.progress import progress_bar
from ops.samples import encode_png, load_sample
from ops.storage import Storage, check_name, sha256_bytes
from ops.types import Adapter, Sample, SynthesisJob

SYNTHETIC_SCHEMA = pa.schema([
    ("category", pa.string()), ("method", pa.string()), ("defect_type", pa.string()), ("index", pa.int64()),
    ("seed", pa.int64()), ("image_path", pa.string()), ("mask_path", pa.string()), ("target_path", pa.string()),
    ("extras_json", pa.string()), ("normal_id", pa.string()), ("normal_path", pa.string()),
    ("normal_dataset_root", pa.string()), ("reference_id", pa.string()), ("support_ids", pa.list_(pa.string())),
    ("target_params_json", pa.string()), ("params_json", pa.string()), ("config_json", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("mask_area", pa.int64()),
    ("seconds", pa.float64()),
])

ADAPTER_SCHEMA = pa.schema([
    ("category", pa.string()), ("method", pa.string()), ("adapter_path", pa.string()),
    ("support_ids", pa.list_(pa.string())), ("n_support", pa.int64()), ("meta_json", pa.string()),
    ("config_json", pa.string()), ("seconds", pa.float64()),
])

SPLIT_COLUMNS = ("image_id", "category", "defect_type", "dataset_root", "image_path", "mask_path", "role")
SYNTHETIC_DIR = "images/synthetic_anomalies"


def fit_adapter(storage: Storage, category: str, method_name: str, split_df: pd.DataFrame, backbone: Any,
                cfg: dict | None, progress: Progress | None = None) -> pd.DataFrame:
    """Fit ``method_name`` on the category's support set; one ADAPTER_SCHEMA row."""
    check_name(category, "category")
    method = get_method(method_name)
    config = method.config(cfg, getattr(backbone, "model_id", None))
    mask_free = _mask_free(split_df, category, method_name)
    support_rows = _rows(split_df, category, "support") if mask_free else _support_rows(split_df, category)
    support = [load_sample(row) for row in support_rows.to_dict("records")]
    rel = f"adapters/{category}/{method_name}"
    start = time.perf_counter()
    # two runs of one partition take turns; the second's fit finds the first's finished checkpoints and
    # returns without training (Method.fit is idempotent). On a remote root the method writes into a local
    # copy of the folder, uploaded when fit returns (Storage.workdir).
    with storage_lock(storage, rel), storage.workdir(rel) as out_dir, \
            _progress(progress, f"fit {category}/{method_name}", None) as report:
        adapter = method.fit(backbone, support, config, out_dir=out_dir, progress=report)
        adapter_path = None
        if adapter.path is not None:
            sub = Path(adapter.path).relative_to(out_dir).as_posix()
            adapter_path = rel if sub == "." else f"{rel}/{sub}"
    df = pd.DataFrame([{
        "category": category, "method": method_name,
        "adapter_path": adapter_path,
        "support_ids": sorted(s.image_id for s in support), "n_support": len(support),
        "meta_json": dumps(adapter.meta), "config_json": dumps(asdict(config)),
        "seconds": time.perf_counter() - start,
    }])
    to_table(df, ADAPTER_SCHEMA, "anomaly_adapters")
    return df


def job_seed(seed: int, category: str, method: str, index: int) -> int:
    if not isinstance(seed, (int, np.integer)) or seed < 0 or index < 0:
        raise ValueError(f"seed and job index must be non-negative integers, got seed={seed!r} index={index!r}")
    words = np.random.SeedSequence([int(seed), _text_key(category), _text_key(method), int(index)])
    return int(words.generate_state(1, np.uint64)[0] >> np.uint64(1))


def _text_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class PlannedJob:
    job: SynthesisJob
    target_params: dict
    normal_row: dict


class JobPlanner:
    """Plans job i of a (category, method, seed) independently of every other job (module doc)."""

    def __init__(self, split_df: pd.DataFrame, category: str, method: str, seed: int, target_mode: str = "affine",
                 needs_reference: bool = True, target_options: dict | None = None, cache_size: int = 64,
                 mask_free: bool = False):
        self.category, self.method, self.seed = category, method, seed
        self.target_mode, self.needs_reference = ("box", False) if mask_free else (target_mode, needs_reference)
        self.mask_free = mask_free
        self.target_options = dict(target_options or {})
        self.texture = bool(self.target_options.pop("texture", False))
        support = _rows(split_df, category, "support") if mask_free else _support_rows(split_df, category)
        self.support = {row["image_id"]: load_sample(row) for row in support.to_dict("records")}
        self.support_ids = tuple(sorted(self.support))
        self.by_type = {t: sorted(g["image_id"]) for t, g in support.groupby("defect_type")}
        self.types = [MASK_FREE_TYPE] if mask_free else sorted(self.by_type)
        for t in self.types:
            check_name(t, "defect type")
        normals = _rows(split_df, category, "train_good")
        if normals.empty:
            raise ValueError(f"split for category {category!r} has no role=='train_good' rows: targets and "
                             f"syntheses need normal images (the dataset's train/good folder)")
        self.normals = normals.sort_values("image_id").to_dict("records")
        self._cache: OrderedDict[str, tuple[Sample, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size

    def _normal(self, row: dict) -> tuple[Sample, np.ndarray]:
        key = row["image_id"]
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        sample = load_sample(row)
        fg = np.ones(sample.image.shape[:2], dtype=bool) if self.texture else foreground_mask(sample.image)
        self._cache[key] = (sample, fg)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return sample, fg

    def plan(self, index: int) -> PlannedJob:
        seed = job_seed(self.seed, self.category, self.method, index)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
        defect_type = self.types[index % len(self.types)]
        normal_row = self.normals[int(rng.integers(len(self.normals)))]
        normal, fg = self._normal(normal_row)
        ref = None
        if not self.mask_free:
            candidates = self.by_type[defect_type]
            ref = self.support[candidates[int(rng.integers(len(candidates)))]]
        try:
            target = sample_target_mask(ref.mask if ref is not None else None, normal.image, rng, self.target_mode,
                                        foreground=fg, **self.target_options)
        except ValueError as e:
            source = ref.source if ref is not None else "(none: image-level labels)"
            raise ValueError(f"{self.category}/{self.method} job {index}: target mask from support image "
                             f"{source} onto normal image {normal.source}: {e}") from e
        job = SynthesisJob(index=index, seed=seed, category=self.category, defect_type=defect_type, normal=normal,
                           target_mask=target.mask, reference=ref if self.needs_reference else None,
                           support_ids=self.support_ids)
        params = dict(target.params, source_id=ref.image_id if ref is not None else None)
        return PlannedJob(job, params, normal_row)


def plan_jobs(split_df: pd.DataFrame, category: str, method: str, n: int, seed: int, target_mode: str = "affine",
              needs_reference: bool = True, target_options: dict | None = None) -> list[SynthesisJob]:
    planner = JobPlanner(split_df, category, method, seed, target_mode, needs_reference, target_options)
    return [planner.plan(i).job for i in range(n)]


def synthesize_partition(storage: Storage, category: str, method_name: str, split_df: pd.DataFrame,
                         adapter_df: pd.DataFrame, backbone: Any, n: int, seed: int, cfg: dict | None,
                         progress: Progress | None = None, *, target_mode: str = "affine",
                         target_options: dict | None = None, chunk_size: int = 32) -> pd.DataFrame:
    """Synthesize n images of ``category`` with ``method_name``; SYNTHETIC_SCHEMA rows (module doc)."""
    check_name(category, "category")
    check_name(method_name, "method")
    if n < 0 or chunk_size < 1:
        raise ValueError(f"n must be >= 0 and chunk_size >= 1, got n={n} chunk_size={chunk_size}")
    method = get_method(method_name)
    config = method.config(cfg, getattr(backbone, "model_id", None))
    config_json = dumps(asdict(config))
    # a method defined on its own kind of target (AnoGen: boxes) overrides the pipeline's mode; caller options win
    target_mode = method.target_mode or target_mode
    target_options = {**method.target_options(config, category), **(target_options or {})}
    mask_free = _mask_free(split_df, category, method_name)
    target_mode = "box" if mask_free else target_mode
    planner = JobPlanner(split_df, category, method_name, seed, target_mode, method.needs_reference, target_options,
                         mask_free=mask_free)
    adapter = _adapter(storage, adapter_df, category, method_name, planner.support_ids)
    base = f"{SYNTHETIC_DIR}/{category}/{method_name}"
    fingerprint = _fingerprint(category, method_name, seed, config_json, target_mode, target_options, adapter,
                               split_df)
    journal = Journal(storage, f"{base}/.journal-{fingerprint}.jsonl")
    rows, written = [], set()
    with _progress(progress, f"synthesize {category}/{method_name}", n) as report:
        for start in range(0, n, chunk_size):
            done = {i: journal.rows[i] for i in range(start, min(n, start + chunk_size)) if i in journal.rows}
            planned = {i: planner.plan(i) for i in range(start, min(n, start + chunk_size)) if i not in done}
            jobs = [p.job for p in planned.values()]
            results = check_results(jobs, method.synthesize(backbone, adapter, jobs, config)) if jobs else ()
            for row in [*done.values(), *(_journalled(journal, storage, base, r, planned[r.job.index], method_name,
                                                      config_json) for r in results)]:
                rows.append(row)
                written.update([row["image_path"], row["mask_path"], row["target_path"],
                                *json.loads(row["extras_json"]).values()])
                report(f"synthesize {category}/{method_name}", len(rows), n)
    journal.close()
    _remove_stale(storage, base, written)
    df = pd.DataFrame(rows, columns=SYNTHETIC_SCHEMA.names).sort_values("index", ignore_index=True)
    to_table(df, SYNTHETIC_SCHEMA, "synthetic_anomalies")
    return df


class Journal:
    """Rows of finished jobs, one JSON line each (module doc: crash safety). Local roots only: on an object
    store appends are not possible, so there a crashed partition starts over."""

    def __init__(self, storage: Storage, rel: str):
        self.rows: dict[int, dict] = {}
        self._file = None
        if not storage.is_local:
            return
        path = Path(storage.path(rel))
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # the line a kill cut short
                    continue
                if _files_intact(storage, row):
                    self.rows[int(row["index"])] = row
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")

    def add(self, row: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(row, sort_keys=True) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _files_intact(storage: Storage, row: dict) -> bool:
    paths = [row["mask_path"], row["target_path"], *json.loads(row["extras_json"]).values()]
    image = Path(storage.path(row["image_path"]))
    return (image.is_file() and sha256_bytes(image.read_bytes()) == row["sha256"]
            and all(Path(storage.path(p)).is_file() for p in paths))


def _journalled(journal: Journal, storage: Storage, base: str, result, planned: PlannedJob, method: str,
                config_json: str) -> dict:
    row = _write_result(storage, base, result, planned)
    row.update(method=method, config_json=config_json)
    journal.add(row)
    return row


def _fingerprint(category: str, method: str, seed: int, config_json: str, target_mode: str,
                 target_options: dict | None, adapter: Adapter, split_df: pd.DataFrame) -> str:
    rows = _rows(split_df, category, "support"), _rows(split_df, category, "train_good")
    inputs = sorted(f"{r['image_id']}:{r.get('sha256', '')}:{r['mask_path']}" for df in rows
                    for r in df.to_dict("records"))
    return sha256_bytes(dumps({"category": category, "method": method, "seed": seed, "config": config_json,
                               "target_mode": target_mode, "target_options": target_options or {},
                               "adapter": [str(adapter.path), adapter.meta], "inputs": inputs}).encode())[:16]


def _write_result(storage: Storage, base: str, result, planned: PlannedJob) -> dict:
    job = result.job
    if not result.mask.any():
        raise RuntimeError(f"{job.category} job {job.index} ({job.defect_type}): the method returned an empty mask; "
                           f"a synthetic anomaly needs a defect region")
    stem, dt = f"{job.index:05d}", job.defect_type
    image_png = encode_png(result.image)
    paths = {"image_path": storage.write_bytes(f"{base}/images/{dt}/{stem}.png", image_png),
             "mask_path": storage.write_bytes(f"{base}/masks/{dt}/{stem}_mask.png", encode_png(result.mask)),
             "target_path": storage.write_bytes(f"{base}/targets/{dt}/{stem}_target.png", encode_png(job.target_mask))}
    extras = {}
    for name in sorted(result.extras):
        check_name(name, "extra map name")
        extras[name] = storage.write_bytes(f"{base}/extras/{name}/{dt}/{stem}.png",
                                           encode_png(_to_uint16(result.extras[name], name, job)))
    h, w = result.image.shape[:2]
    return dict(paths, category=job.category, defect_type=dt, index=job.index, seed=job.seed,
                extras_json=dumps(extras), normal_id=job.normal.image_id,
                normal_path=str(planned.normal_row["image_path"]),
                normal_dataset_root=str(planned.normal_row["dataset_root"]),
                reference_id=job.reference.image_id if job.reference is not None else None,
                support_ids=list(job.support_ids), target_params_json=dumps(planned.target_params),
                params_json=dumps(result.params), width=w, height=h, sha256=sha256_bytes(image_png),
                mask_area=int(result.mask.sum()), seconds=float(result.seconds))


def _to_uint16(values: np.ndarray, name: str, job: SynthesisJob) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != job.target_mask.shape or not np.isfinite(arr).all():
        raise RuntimeError(f"job {job.index}: extra map {name!r} must be a finite HxW map {job.target_mask.shape}, "
                           f"got shape {arr.shape}")
    return np.rint(np.clip(arr, 0.0, 1.0) * 65535).astype(np.uint16)


def _remove_stale(storage: Storage, base: str, keep: set[str]) -> None:
    if not storage.is_local:  # an object store has no folders to prune
        for rel in storage.list_files(base):
            if rel not in keep:
                storage.remove(rel)
        return
    root = storage.path(base)
    if not root.exists():
        return
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_dir():
            if storage.is_local and not any(p.iterdir()):
                p.rmdir()
        elif storage.rel(p) not in keep:
            p.unlink()


def _adapter(storage: Storage, adapter_df: pd.DataFrame | None, category: str, method: str,
             support_ids: Sequence[str]) -> Adapter:
    if adapter_df is None:
        raise ValueError(f"no adapter table given for {category}/{method}: run fit_adapter (asset "
                         f"anomaly_adapters) first")
    hit = adapter_df[(adapter_df["category"] == category) & (adapter_df["method"] == method)]
    if len(hit) != 1:
        raise ValueError(f"adapter table has {len(hit)} rows for {category}/{method}, expected 1: materialize "
                         f"anomaly_adapters for this partition")
    row = hit.iloc[0]
    if sorted(row["support_ids"]) != sorted(support_ids):
        raise ValueError(f"adapter {category}/{method} was fitted on support images {sorted(row['support_ids'])} "
                         f"but the split now has {sorted(support_ids)}: re-materialize anomaly_adapters")
    path = row["adapter_path"]
    # methods read adapter files with local-file APIs (safetensors, diffusers): a cached mirror on remote roots
    return Adapter(method=method, category=category, path=storage.local_tree(path) if isinstance(path, str) else None,
                   meta=json.loads(row["meta_json"]))


def _mask_free(split_df: pd.DataFrame, category: str, method: str) -> bool:
    """True on an image-level-only category (``ops.image_level``); a method that needs masks is refused there."""
    if not is_image_level(_rows(split_df, category, "holdout"), category):
        return False
    reason = skip_reason(method)
    if reason is not None:
        raise ValueError(f"category {category!r} has image-level labels only (no ground_truth/ masks): {reason}; "
                         f"run a mask-free method there ({', '.join(plan(available_methods())[0]) or 'none'})")
    return True


def _rows(split_df: pd.DataFrame, category: str, role: str) -> pd.DataFrame:
    missing = [c for c in SPLIT_COLUMNS if c not in split_df.columns]
    if missing:
        raise ValueError(f"split table lacks columns {missing}: pass the few_shot_splits manifest "
                         f"(ops.splits.make_split)")
    return split_df[(split_df["category"] == category) & (split_df["role"] == role)]


def _support_rows(split_df: pd.DataFrame, category: str) -> pd.DataFrame:
    support = _rows(split_df, category, "support")
    if support.empty:
        raise ValueError(f"split for category {category!r} has no role=='support' rows: the category needs real "
                         f"defect images with masks (check the dataset and make_split)")
    return support.sort_values("image_id")


@contextmanager
def _progress(progress: Progress | None, desc: str, total: int | None) -> Iterator[Progress]:
    if progress is not None:
        yield progress
        return
    with progress_bar(desc, total) as bar:
        def report(_desc: str, done: int, _total: int) -> None:
            bar.update(done - bar.n)

        yield report
