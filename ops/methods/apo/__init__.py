"""APO (Anomaly-Preference Optimisation, papers/apo.md) as the ``apo`` generation method.

Training (``fit``): per defect type of the category, a LoRA on the UNet's attention projections
(``ops.diffusion.lora``) is trained with the CPO loss (``ops.methods.apo.loss``) under TACA's per-sample rank gate
(``ops.diffusion.taca``) by the toolkit's seeded, checkpointed loop (``ops.diffusion.training``). The reference
ε_ref is the same UNet with its LoRA disabled, so only the LoRA trains. Synthesis (``synthesize``): hierarchical
sampling with deviation-guided localization (``ops.methods.apo.sampling``).

Files per defect type under ``out_dir/<defect_type>/``: ``pytorch_lora_weights.safetensors`` (diffusers LoRA
format, ``pipe.load_lora_weights`` reads it), ``taca.json`` (the TACA schedule k_min/k_max/T the adapter must be
sampled with, the prompt, the config hash, the loss history; written last, so its presence marks a finished
adapter), ``run.json`` (the hash of the run the checkpoints belong to) and ``checkpoints/`` (resume state).

Choices where the paper is vague (see also the two helper modules):
- One adapter per defect type, conditioned on the prompt ``"a photo of a {category} with a {defect_type} defect"``
  (configurable); the reference and the policy see the same prompt during training.
- The whole support image is the positive sample (the paper trains on (x_i, c_i) without masks); latents are the
  VAE posterior means at ``backbone.resolution``. Each step draws ``batch_size`` support latents with
  replacement, t ~ U{0..T−1} and ε ~ N(0, I) from the training loop's seeded generator.
- Presets: ``demo`` (default: rank 4, TACA 1..4, 30 steps at lr 1e-3, 12 DDIM steps) keeps the CPU demo fast;
  ``paper`` (rank 32, TACA 8..32, 1000 steps at lr 1e-4, batch 4, 50 DDIM steps, s_text 7.5) follows common SD
  LoRA practice since the paper publishes no hyper-parameters; ``forge-base`` (the demo's backbone): LoRA on the
  attention + conv + feed-forward layers (``ops.diffusion.lora.LORA_LAYER_SETS``), 8 steps at lr 3e-3, 8 DDIM
  steps (its UNet costs ~4x tiny's per call). Explicit options override the preset; without one, the loaded
  backbone's own preset is used if the method has one, else ``demo`` (``ops.methods.base.MethodConfig``).
- β = 1000 in both presets: with λ' taken per unit of normalised time, β_t on SD's schedule is ≈ 3300–6000 for
  t in [150, 1000), the order of Diffusion-DPO's weight on SD 1.5 (½·5000 = 2500 with the same per-element mean).
- β_t at small t: ``small_t="clip"`` with ``t_small=50`` by default (β_t capped at its largest value over
  [50, T)); "skip" draws t from [t_small, T), "none" keeps the raw weight (``ops.methods.apo.loss``).
- Ablation switches (the paper's ablations, as config options): ``cpo=False`` trains the LoRA with the plain
  denoising MSE under the TACA gate ("w/o CPO"; no reference pass); ``taca=False`` trains and samples the LoRA at
  full rank at every t ("w/o TACA": k_min = k_max = rank, recorded in taca.json so sampling follows).
- ``branch_mode="batched"`` (default): the three predictions of a step are one UNet call (measured on the 2-core
  CPU with the tiny backbone: ~0.7x the time of three calls, see bench/bench_apo.py); "sequential" gives the same
  numbers up to float rounding (~1e-6 relative) and bit-identical CFG when s_align = 0.
- s_align = 1.5 by default (the paper reports a smooth trade-off curve, no default): > 1 pushes beyond the
  adapted model along the alignment direction.
- Placed generation (the pipeline's default, ``mode="placed"``): the normal image is DDIM-inverted with the
  reference model and the null prompt; sampling starts from the job's seeded noise inside the latent mask and
  the inverted z_T outside; after every step the latent outside the mask is replaced by the inverted trajectory
  at the same step (so it is identical to it), and the decoded image is composited onto the original normal
  image outside the generated latent cells. Mask = the target mask refined by the localization map
  (``ops.methods.apo.sampling.refine_target_mask``). Free generation (``mode="free"``, the paper's): seeded noise everywhere,
  mask = thresholded localization map.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch

from ops.atomic import write_bytes_atomic
from ops.diffusion import lora
from ops.diffusion.training import train
from ops.diffusion.vae import encode
from ops.methods.apo.loss import check_small_t, cpo_batch
from ops.methods.apo.sampling import LoRAGate, generate, refine_target_mask, threshold_map
from ops.methods.base import (Method, MethodConfig, Progress, backbone_identity, fit_each_type, loss_summary,
                              no_progress, read_adapter_record, render_prompt, support_by_type, training_digest)
from ops.storage import check_name
from ops.types import Adapter, Sample, Synthetic, SynthesisJob

ADAPTER_NAME = "apo"
FORMAT_VERSION = 1
TRAIN_FIELDS = ("prompt", "rank", "lora_layers", "k_min", "k_max", "beta", "small_t", "t_small", "cpo", "taca",
                "train_steps", "lr", "batch_size", "seed")

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    # forge-base (the demo's default backbone): its UNet costs ~4x tiny's per call, so fewer sampling steps keep
    # the demo inside its 10 minutes; the LoRA also covers the conv / projection / feed-forward layers, which a
    # small base needs to move towards the support images (docs/forge_base.md has the measurements)
    "forge-base": dict(lora_layers="attention+conv+ff", train_steps=8, lr=3e-3, steps=8),
    "paper": dict(rank=32, k_min=8, k_max=32, train_steps=1000, lr=1e-4, batch_size=4, ckpt_every=100, steps=50,
                  s_text=7.5),
}


@dataclass
class APOConfig(MethodConfig):
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    preset: str = "demo"
    prompt: str = "a photo of a {category} with a {defect_type} defect"
    # training
    rank: int = 4
    lora_layers: str = "attention"  # or "attention+conv+ff" (ops.diffusion.lora.LORA_LAYER_SETS)
    k_min: int = 1
    k_max: int = 4
    beta: float = 1000.0
    small_t: str = "clip"  # β_t treatment near t = 0: "clip" | "skip" | "none" (ops.methods.apo.loss)
    t_small: int = 50
    cpo: bool = True  # ablation: False = plain MSE LoRA (with TACA)
    taca: bool = True  # ablation: False = full rank at every t
    train_steps: int = 30
    lr: float = 1e-3
    batch_size: int = 2
    seed: int = 0
    ckpt_every: int = 10
    # sampling
    mode: str = "placed"
    steps: int = 12
    s_text: float = 5.0
    s_align: float = 1.5
    threshold: float = 0.5
    min_keep: float = 0.25
    smooth_sigma: float = 0.02
    branch_mode: str = "batched"  # the three predictions as one UNet call ("sequential": three calls)


    def __post_init__(self) -> None:
        if self.mode not in ("placed", "free"):
            raise ValueError(f"APOConfig.mode must be 'placed' or 'free', got {self.mode!r}")
        if self.branch_mode not in ("batched", "sequential", "auto"):
            raise ValueError(f"APOConfig.branch_mode must be batched, sequential or auto, got {self.branch_mode!r}")
        check_small_t(self.small_t, self.t_small)
        lora.lora_targets(self.lora_layers)
        if not 0 <= self.k_min <= self.k_max <= self.rank:
            raise ValueError(f"APOConfig: need 0 <= k_min <= k_max <= rank, got {self.k_min}, {self.k_max}, "
                             f"{self.rank}")
        if self.train_steps < 0 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.beta <= 0:
            raise ValueError("APOConfig: need train_steps >= 0, steps >= 1, batch_size >= 1, lr > 0, beta > 0")
        if not 0 <= self.threshold < 1 or not 0 <= self.min_keep <= 1:
            raise ValueError("APOConfig: threshold must lie in [0, 1) and min_keep in [0, 1]")
        try:
            self.prompt.format(category="c", defect_type="d")
        except (KeyError, IndexError) as e:
            raise ValueError(f"APOConfig.prompt {self.prompt!r} may only use {{category}} and {{defect_type}}") from e


def config_hash(cfg: APOConfig, backbone: Any, samples: Sequence[Sample]) -> str:
    """What makes two trainings the same: training options, the backbone, and the exact support pixels."""
    return training_digest([{f: getattr(cfg, f) for f in TRAIN_FIELDS}, backbone_identity(backbone, FORMAT_VERSION)],
                           samples, masks=False)


def rank_schedule(cfg: APOConfig) -> tuple[int, int]:
    """(k_min, k_max) the adapter is trained and sampled with: TACA's, or full rank without TACA."""
    return (cfg.k_min, cfg.k_max) if cfg.taca else (cfg.rank, cfg.rank)


class APO(Method):
    """APO: CPO preference training of a time-aware (TACA) LoRA, hierarchical 3-term guidance, deviation-guided masks."""

    name = "apo"
    config_cls = APOConfig
    needs_backbone = True
    needs_reference = False

    # ------------------------------------------------------------------ training
    def fit(self, backbone: Any, support: Sequence[Sample], cfg: APOConfig, out_dir: Path,
            progress: Progress = no_progress) -> Adapter:
        category, by_type = support_by_type("APO", support)
        out_dir = Path(out_dir)
        types = fit_each_type(f"apo {category}: adapters", by_type, out_dir, progress,
                              lambda dt, samples, dt_dir: self._fit_one(backbone, category, dt, samples, cfg, dt_dir,
                                                                        progress))
        meta = {"trained": True, "defect_types": types, "preset": cfg.preset,
                "training": {f: getattr(cfg, f) for f in TRAIN_FIELDS}}
        return Adapter(method=self.name, category=category, path=out_dir, meta=meta)

    def _fit_one(self, backbone: Any, category: str, dt: str, samples: list[Sample], cfg: APOConfig, dt_dir: Path,
                 progress: Progress) -> dict[str, Any]:
        digest = config_hash(cfg, backbone, samples)
        done = read_taca(dt_dir, missing_ok=True)
        if done is not None and done.get("config_hash") == digest and (dt_dir / lora.LORA_WEIGHT_NAME).is_file():
            return _summary(dt, done, skipped=True)
        run_file = dt_dir / "run.json"
        if run_file.is_file() and json.loads(run_file.read_text()).get("config_hash") != digest:
            # checkpoints of another configuration or support set must not be resumed into this run
            shutil.rmtree(dt_dir / "checkpoints", ignore_errors=True)
        (dt_dir / "taca.json").unlink(missing_ok=True)
        write_bytes_atomic(run_file, json.dumps({"config_hash": digest}).encode())

        unet, scheduler = backbone.unet, backbone.scheduler
        prompt = render_prompt(cfg, category, dt)
        latents = torch.cat([encode(backbone, s.image) for s in samples])  # each resized to the model's size
        with torch.no_grad():
            cond = backbone.encode_prompt([prompt])
        _check_no_other_adapters(unet)
        params = lora.add_lora(unet, rank=cfg.rank, target_modules=lora.lora_targets(cfg.lora_layers), seed=cfg.seed,
                                adapter_name=ADAPTER_NAME)
        k_min, k_max = rank_schedule(cfg)
        objective = "cpo" if cfg.cpo else "mse"
        try:
            def loss_fn(_step: int, rng: torch.Generator) -> torch.Tensor:
                return cpo_batch(unet, scheduler, latents, cond, rng, cfg.beta, k_min, k_max, cfg.batch_size,
                                 small_t=cfg.small_t, t_small=cfg.t_small, objective=objective)[0]

            result = train(params, loss_fn, cfg.train_steps, cfg.lr, ckpt_dir=dt_dir / "checkpoints",
                           ckpt_every=cfg.ckpt_every, seed=cfg.seed, progress=progress, frozen_modules=[unet],
                           desc=f"apo {category}/{dt}")
            weights = lora.save_lora(unet, dt_dir, adapter_name=ADAPTER_NAME)
        finally:
            lora.remove_lora(unet, ADAPTER_NAME)
        info = {"format": FORMAT_VERSION, "config_hash": digest, "prompt": prompt, "category": category,
                "defect_type": dt, "rank": cfg.rank, "k_min": k_min, "k_max": k_max, "taca": cfg.taca,
                "objective": objective, "small_t": cfg.small_t, "t_small": cfg.t_small,
                "T": int(scheduler.config.num_train_timesteps), "beta": cfg.beta, "train_steps": cfg.train_steps,
                "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "model_id": backbone.model_id,
                "resolution": backbone.resolution, "support_ids": sorted(s.image_id for s in samples),
                "losses": result.losses, "resumed_from": result.resumed_from,
                "weights": weights.name}
        write_bytes_atomic(dt_dir / "taca.json", json.dumps(info, indent=1).encode())
        return _summary(dt, info, skipped=False)


    # ------------------------------------------------------------------ synthesis
    def synthesize(self, backbone: Any, adapter: Adapter, jobs: Sequence[SynthesisJob], cfg: APOConfig,
                   progress: Progress = no_progress) -> Iterator[Synthetic]:
        if adapter.path is None:
            raise ValueError(f"APO adapter of category {adapter.category!r} has no folder; materialize "
                             f"anomaly_adapters for method 'apo' first")
        groups: dict[str, list[SynthesisJob]] = {}
        for job in jobs:
            groups.setdefault(job.defect_type, []).append(job)
        unet = backbone.unet
        uncond = backbone.null_embedding()
        done = 0
        for dt, dt_jobs in groups.items():
            dt_dir = Path(adapter.path) / check_name(dt, "defect type")
            info = read_taca(dt_dir)
            if info.get("model_id") != backbone.model_id or info.get("T") != backbone.scheduler.config.num_train_timesteps:
                raise ValueError(f"{dt_dir / 'taca.json'}: adapter trained on backbone {info.get('model_id')!r} "
                                 f"(T={info.get('T')}) but synthesis runs on {backbone.model_id!r}; rerun "
                                 f"anomaly_adapters with this backbone")
            _check_no_other_adapters(unet)
            lora.load_lora(unet, dt_dir / info["weights"], adapter_name=ADAPTER_NAME)
            try:
                gate = LoRAGate(unet, info["k_min"], info["k_max"], info["T"])
                with torch.no_grad():
                    cond = backbone.encode_prompt([info["prompt"]])
                for job in dt_jobs:
                    yield self._one(backbone, gate, cond, uncond, job, info, cfg)
                    done += 1
                    progress(f"apo {adapter.category}: synthesis", done, len(jobs))
            finally:
                lora.remove_lora(unet, ADAPTER_NAME)

    def _one(self, backbone: Any, gate: LoRAGate, cond: torch.Tensor, uncond: torch.Tensor, job: SynthesisJob,
             info: dict[str, Any], cfg: APOConfig) -> Synthetic:
        start = time.perf_counter()
        normal = job.normal.image
        placed = cfg.mode == "placed"
        gen = generate(backbone, gate, cond, uncond, job.seed, normal.shape[:2], cfg.steps, cfg.s_text, cfg.s_align,
                       cfg.smooth_sigma, cfg.branch_mode, normal=normal if placed else None,
                       target_mask=job.target_mask if placed else None)
        if placed:
            mask, refined = refine_target_mask(job.target_mask, gen.localization, cfg.threshold, cfg.min_keep)
            source = "target refined by localization" if refined else "target (refinement kept < min_keep)"
        else:
            mask, source = threshold_map(gen.localization, cfg.threshold), "thresholded localization"
        params = {"mode": cfg.mode, "s_text": cfg.s_text, "s_align": cfg.s_align, "steps": cfg.steps,
                  "threshold": cfg.threshold, "min_keep": cfg.min_keep, "smooth_sigma": cfg.smooth_sigma,
                  "seed": job.seed, "prompt": info["prompt"], "k_min": info["k_min"], "k_max": info["k_max"],
                  "rank": info["rank"], "adapter_hash": info["config_hash"], "mask_source": source,
                  "branch_mode": cfg.branch_mode, "preset": cfg.preset, "scheduler": "ddim eta=0",
                  "inversion": "ddim, reference model, null prompt" if placed else None}
        return Synthetic(job=job, image=gen.image, mask=mask, extras={"localization": gen.localization},
                         params=params, seconds=time.perf_counter() - start)


def _check_no_other_adapters(unet: Any) -> None:
    """ε_ref must be the plain backbone: a LoRA left in the shared UNet by another method would leak into it."""
    names = sorted(getattr(unet, "peft_config", {}) or {})
    if names:
        raise RuntimeError(f"the backbone's UNet already carries LoRA adapter(s) {names}; APO needs the plain model "
                           f"as its reference. Remove them first (ops.diffusion.lora.remove_lora) or use a private "
                           f"backbone (load_backbone(..., cache=False))")


def read_taca(dt_dir: Path, missing_ok: bool = False) -> dict[str, Any] | None:
    """A defect type's finished-adapter record (taca.json, written after its LoRA)."""
    return read_adapter_record(Path(dt_dir) / "taca.json", "apo", missing_ok)


def _summary(dt: str, info: dict[str, Any], skipped: bool) -> dict[str, Any]:
    return {"dir": dt, "config_hash": info["config_hash"], "prompt": info["prompt"], "steps": info["train_steps"],
            **loss_summary(info.get("losses") or []), "skipped": skipped, "k_min": info["k_min"], "k_max": info["k_max"], "rank": info["rank"]}

