"""AnoGen (Few-Shot Anomaly-Driven Generation, papers/anogen.md) as the ``anogen`` generation method.

Stage 1, ``fit`` (``ops.methods.anogen.embedding``): per defect type of the category, ONE new token embedding
(the text encoder's input width: 768 on SD 1.5) trained with the mask-guided loss L'_LDM on that type's 1-3
support anomalies, the base model frozen; saved as a diffusers textual-inversion file plus the prompt it must be
used with; resumable through the toolkit's checkpointed loop.
Stage 2, ``synthesize`` (``ops.methods.anogen.sampling``): a box from the target sampler's box mode on a normal
image, that image's q-sampled latent kept outside the box at every DDIM step, the learned token's prompt (with
classifier-free guidance) inside; the decoded image is pasted onto the normal image inside the box only.
Stage 3 (weakly supervised detector) lives in ``ops.detection``: the segmenter's ``weak_tau`` loss on the box
labels of ``anogen`` partitions, with a τ = 1 (plain box supervision) row and a Perlin + AnoGen mix row; DRAEM,
when configured, is trained with the same rule (``SyntheticDraem(weak_tau=...)``).

Choices where the paper is vague (more in the two modules):
- Boxes: ``target_mode = "box"`` whatever the pipeline's ``target_mode`` setting (AnoGen is defined on boxes);
  at least ``min_inside`` = 75 % of the box on the product foreground (textures: the whole image). Box height
  and width are independent fractions of the image side drawn from ``box_size``; per-category overrides in
  ``box_sizes``. Default (0.1, 0.15): the hazelnut "hole" range of the authors' released box table
  (github.com/gaobb/AnoGen, utils_scripts/mvtec_range.json: height and width in [0.1, 0.15] of the side). That
  table is per defect type and allows rotated boxes for some types; here boxes are axis-aligned, per category.
- Prompt: the learned token alone (``"{token}"``), as the authors' sampling script (prompt "*"); a template with
  ``{category}`` / ``{defect_type}`` words can be set instead.
- Masks: the row's mask is the box, the weak label the paper trains with. The refined-masks stage also records
  the difference-refined mask of every row (and its ``final`` rule for ``anogen`` is the box, ``target``); set
  the refine option ``final={"anogen": "diff"}`` to train detectors on the refined masks instead.
- Presets: ``paper`` = 6000 Adam steps at lr 0.005 (the paper's), batch 1, 50 DDIM steps (eta 0) and
  classifier-free guidance 10 (the authors' sampling script: ``--scale 10.0 --ddim_steps 50 --ddim_eta 0``).
  ``demo`` = 12 steps at lr 0.02 (a larger lr so the few CPU steps move the row visibly), 10 DDIM steps and
  guidance 1 (CFG off: it doubles the UNet work on 2 CPU cores). ``forge-base`` = the same but 8 DDIM steps (the
  demo's budget): on forge-base (brick, 8 images) 40 steps with guidance 3 took 3x the time for no gain in
  defect likeness (bench/bench_defect_likeness.py). Explicit options override the preset; without one, the
  loaded backbone's own preset is used if the method has one, else ``demo`` (``ops.methods.base.MethodConfig``).
- Adapter folder: ``<adapter>/<defect_type>/`` per type (files in ``embedding``); folders of types no longer
  in the support set are removed, so the folder mirrors the adapter row.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch

from ops.methods.anogen.embedding import FitSettings, fit_token, load_token, read_info
from ops.methods.base import (Method, MethodConfig, Progress, fit_each_type, loss_summary, no_progress,
                              support_by_type)
from ops.storage import check_name
from ops.types import Adapter, Sample, Synthetic, SynthesisJob

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    # measured on forge-base (brick, 8 images): 40 steps + guidance 3 took 3x the time for no gain in defect
    # likeness over the demo values, so forge-base keeps them (docs/forge_base.md)
    "forge-base": dict(train_steps=12, steps=8, guidance=1.0),
    "paper": dict(train_steps=6000, lr=5e-3, batch_size=1, ckpt_every=500, steps=50, guidance=10.0),
}


@dataclass
class AnoGenConfig(MethodConfig):
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    preset: str = "demo"
    prompt: str = "{token}"  # {token} = the learned placeholder; {category}, {defect_type} may be added
    init_word: str = "defect"
    # stage 1: embedding
    train_steps: int = 12
    lr: float = 2e-2
    batch_size: int = 1
    seed: int = 0
    ckpt_every: int = 0
    masked: bool = True  # False: the paper's "w/o mask" ablation (plain textual inversion)
    # stage 2: generation
    steps: int = 10
    guidance: float = 1.0
    batch: int = 8  # jobs per UNet call
    box_size: tuple[float, float] = (0.1, 0.15)
    box_sizes: dict[str, list[float]] = field(default_factory=dict)  # category -> (lo, hi)
    min_inside: float = 0.75


    def __post_init__(self) -> None:
        self.box_size = tuple(float(v) for v in self.box_size)
        for name, rng in {"box_size": self.box_size, **{f"box_sizes[{k!r}]": v for k, v in self.box_sizes.items()}}.items():
            if len(rng) != 2 or not 0.0 < float(rng[0]) <= float(rng[1]) <= 1.0:
                raise ValueError(f"AnoGenConfig.{name}={rng}: need two fractions 0 < lo <= hi <= 1 of the image side")
        if self.train_steps < 0 or self.steps < 1 or self.batch_size < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError("AnoGenConfig: need train_steps >= 0, steps >= 1, batch_size >= 1, batch >= 1, lr > 0")
        if self.guidance < 1.0 or not 0.0 < self.min_inside <= 1.0:
            raise ValueError(f"AnoGenConfig: need guidance >= 1 (1 = no CFG) and 0 < min_inside <= 1, got "
                             f"{self.guidance}, {self.min_inside}")
        if "{token}" not in self.prompt:
            raise ValueError(f"AnoGenConfig.prompt {self.prompt!r} must contain {{token}} (the learned embedding)")
        try:
            self.prompt.format(category="c", defect_type="d", token="t")
        except (KeyError, IndexError) as e:
            raise ValueError(f"AnoGenConfig.prompt {self.prompt!r} may only use {{category}}, {{defect_type}} and "
                             f"{{token}}") from e

    def fit_settings(self) -> FitSettings:
        return FitSettings(prompt=self.prompt, init_word=self.init_word, steps=self.train_steps, lr=self.lr,
                           batch_size=self.batch_size, seed=self.seed, ckpt_every=self.ckpt_every)


class AnoGen(Method):
    """AnoGen: mask-guided token embedding per defect type, box-blended sampling, weakly supervised detectors."""

    name = "anogen"
    config_cls = AnoGenConfig
    needs_backbone = True
    needs_reference = False
    target_mode = "box"

    def target_options(self, cfg: AnoGenConfig, category: str) -> dict[str, Any]:
        lo, hi = cfg.box_sizes.get(category, cfg.box_size)
        return {"box_size": (float(lo), float(hi)), "min_inside": cfg.min_inside}

    # ------------------------------------------------------------------ stage 1
    def fit(self, backbone: Any, support: Sequence[Sample], cfg: AnoGenConfig, out_dir: Path,
            progress: Progress = no_progress) -> Adapter:
        category, by_type = support_by_type("AnoGen", support)
        out_dir = Path(out_dir)

        def fit_type(dt: str, samples: list[Sample], dt_dir: Path) -> dict[str, Any]:
            res = fit_token(backbone, category, dt, sorted(samples, key=lambda s: s.image_id), cfg.fit_settings(),
                            dt_dir, progress, masked=cfg.masked)
            return {"token": res.info["token"], "prompt": res.info["prompt"], "file": res.info["file"],
                    "settings_hash": res.info["settings_hash"], "steps": res.info["steps"],
                    **loss_summary(res.info["losses"]), "skipped": res.skipped}

        types = fit_each_type(f"anogen {category}: embeddings", by_type, out_dir, progress, fit_type)
        if out_dir.is_dir():
            for p in out_dir.iterdir():
                if p.is_dir() and p.name not in types:
                    shutil.rmtree(p)
        meta = {"trained": True, "defect_types": types, "preset": cfg.preset, "model_id": backbone.model_id,
                "masked": cfg.masked, "init_word": cfg.init_word}
        return Adapter(method=self.name, category=category, path=out_dir, meta=meta)

    # ------------------------------------------------------------------ stage 2
    def synthesize(self, backbone: Any, adapter: Adapter, jobs: Sequence[SynthesisJob], cfg: AnoGenConfig,
                   progress: Progress = no_progress) -> Iterator[Synthetic]:
        from ops.methods.anogen.sampling import generate

        if adapter.path is None:
            raise ValueError(f"AnoGen adapter of category {adapter.category!r} has no folder; materialize "
                             f"anomaly_adapters for method 'anogen' first")
        groups: dict[str, list[SynthesisJob]] = {}
        for job in jobs:
            groups.setdefault(job.defect_type, []).append(job)
        uncond = backbone.null_embedding() if cfg.guidance != 1.0 else None
        done = 0
        for dt, dt_jobs in sorted(groups.items()):
            dt_dir = Path(adapter.path) / check_name(dt, "defect type")
            info = read_info(dt_dir)
            if info.get("model_id") != backbone.model_id or info.get("dim") != \
                    backbone.text_encoder.get_input_embeddings().weight.shape[1]:
                raise ValueError(f"{dt_dir / 'token.json'}: embedding trained on backbone {info.get('model_id')!r} "
                                 f"but synthesis runs on {backbone.model_id!r}; rerun anomaly_adapters with this "
                                 f"backbone")
            load_token(backbone, dt_dir, info)
            with torch.no_grad():
                cond = backbone.encode_prompt([info["prompt"]])
            for start in range(0, len(dt_jobs), cfg.batch):
                chunk = dt_jobs[start:start + cfg.batch]
                t0 = time.perf_counter()
                gen = generate(backbone, cond, uncond, [j.normal.image for j in chunk],
                               [j.target_mask for j in chunk], [j.seed for j in chunk], cfg.steps, cfg.guidance)
                seconds = (time.perf_counter() - t0) / len(chunk)
                for i, job in enumerate(chunk):
                    params = {"prompt": info["prompt"], "token": info["token"], "steps": cfg.steps,
                              "guidance": cfg.guidance, "seed": job.seed, "preset": cfg.preset,
                              "embedding_hash": info["settings_hash"], "scheduler": "ddim eta=0",
                              "normal_latent": "q-sample of z0 with the job's noise (not inverted)",
                              "mask": "box (weak label); refined masks: refined_masks stage",
                              "composite": "decoded inside the box, normal pixels outside"}
                    yield Synthetic(job=job, image=np.ascontiguousarray(gen.images[i]), mask=job.target_mask.copy(),
                                    params=params, seconds=seconds)
                    done += 1
                    progress(f"anogen {adapter.category}: synthesis", done, len(jobs))
