"""bg-disentangle ("Revisiting DDIM Inversion for Controlling Defect Generation by Disentangling the Background")
as the ``bgdisentangle`` generation method.

``fit``: per defect type of the category, the UNet (LoRA by default, every weight with ``adapter="full"``) is
trained with the matching loss + background regulariser of eq. 5-7 under the masked cross-attention of eq. 10-11
(``loss.py``; training, files and resume in ``fit.py``; C1/C2 in ``conditioning.py``).
``synthesize``: masked DDIM inversion of the target normal image (eq. 8), z_T* = z̃_T^m + m ⊙ ε, eq. 9, and the
eq. 13 mask refinement inside the target mask, which becomes the row's own mask (``sampling.py``). Jobs that share
(defect type, normal image, latent-grid target mask) share one inversion and one background stream.

Choices where the paper or the brief leave room (more in the sibling modules):
- ε of z_T* comes from the job's seed, so each job is deterministic; targets come from the pipeline's target
  sampler (``job.target_mask``); the job's reference image is not used (the adapter carries the defect).
- No classifier-free guidance: eq. 9 is written without it, and the background stream must stay the exact reverse
  of the eq. 8 inversion (CFG would break that reconstruction).
- Output image: the decoded z*_0 resized to the normal image (``background="generated"``, the paper's, and the
  ``paper`` preset), or the decoded pixels pasted onto the original normal image on the latent cells m touches
  (``background="normal"``, the ``demo`` preset: an untrained or small VAE cannot reproduce the background).
- Mask: eq. 13 refined target; when the refinement leaves nothing, the target mask (recorded in ``params``).
  ``threshold_rule``: ``"absolute"`` (default) compares the attention probabilities with ``threshold`` as the
  paper writes eq. 13; ``"peak_in_mask"`` compares them relative to their peak inside the target (½ = half the
  peak), which still refines when a token's probabilities stay below ½. A synthesis option: it is not part of
  the adapter's training digest.
- Presets: ``demo`` (default: LoRA rank 4, 8 steps at lr 1e-3, batch 2, 10 DDIM steps) is sized for the CPU
  demo; ``paper``: the UNet fine-tuned (DreamBooth-style, "full") for 500 iterations at lr 5e-6, batch 1, and
  50 DDIM steps, as the paper's experiments (it prints no learning rate or batch: DreamBooth's defaults).
  ``forge-base``: the wider LoRA (attention + conv + feed-forward), 8 steps at lr 2e-3, 8 DDIM steps, background
  "normal".
  Without an explicit preset the loaded backbone's own is used if the method has one, else ``demo``.
- MVTec LOCO: logical anomalies go through the same path (C_bg carries the background the defect depends on);
  LOCO's merged per-image ground truth is what ingest gives as the mask.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch

from ops.diffusion import lora
from ops.diffusion.vae import decode, encode, image_key
from ops.methods.base import (Method, MethodConfig, Progress, fit_each_type, loss_summary, no_progress,
                              support_by_type)
from ops.methods.bgdisentangle.conditioning import (BG_PROMPT, DEF_PROMPT, M_PROMPT, Conditioning, build,
                                                    check_template)
from ops.methods.bgdisentangle.fit import TRAIN_FIELDS, adapted, fit_one, read_info
from ops.methods.bgdisentangle.sampling import (THRESHOLD_RULES, InversionCache, background_run, denoise,
                                                invert_masked, refine, start_latents, target_latent_mask)
from ops.methods.o2mag.triag import generated_region
from ops.storage import check_name
from ops.types import Adapter, Sample, Synthetic, SynthesisJob

PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(background="normal"),
    # forge-base: the wider LoRA (see APO's preset) and the normal background (its VAE cannot reproduce one)
    "forge-base": dict(background="normal", lora_layers="attention+conv+ff", train_steps=8, lr=2e-3, steps=8),
    "paper": dict(adapter="full", train_steps=500, lr=5e-6, batch_size=1, ckpt_every=100, steps=50,
                  background="generated"),
}
ADAPTERS = ("lora", "full")


@dataclass
class BgDisentangleConfig(MethodConfig):
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    preset: str = "demo"
    def_prompt: str = DEF_PROMPT
    m_prompt: str = M_PROMPT
    bg_prompt: str = BG_PROMPT
    # training
    adapter: str = "lora"
    rank: int = 4
    lora_layers: str = "attention"  # or "attention+conv+ff" (ops.diffusion.lora.LORA_LAYER_SETS)
    train_steps: int = 8
    lr: float = 1e-3
    batch_size: int = 2
    seed: int = 0
    ckpt_every: int = 0
    # sampling
    steps: int = 10
    background: str = "generated"
    threshold: float = 0.5  # eq. 13
    threshold_rule: str = "absolute"  # or "peak_in_mask" (THRESHOLD_RULES)
    cache_inversion: bool = True
    target_batch: int = 8

    def __post_init__(self) -> None:
        lora.lora_targets(self.lora_layers)
        if self.adapter not in ADAPTERS:
            raise ValueError(f"BgDisentangleConfig.adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.background not in ("generated", "normal"):
            raise ValueError(f"BgDisentangleConfig.background must be 'generated' or 'normal', got "
                             f"{self.background!r}")
        if (self.rank < 1 or self.train_steps < 0 or self.lr <= 0 or self.batch_size < 1 or self.steps < 1
                or self.target_batch < 1 or self.ckpt_every < 0):
            raise ValueError("BgDisentangleConfig: need rank >= 1, train_steps >= 0, lr > 0, batch_size >= 1, "
                             "steps >= 1, target_batch >= 1, ckpt_every >= 0")
        if not 0 < self.threshold < 1:
            raise ValueError(f"BgDisentangleConfig.threshold must lie in (0, 1), got {self.threshold}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"BgDisentangleConfig.threshold_rule must be one of {THRESHOLD_RULES}, got "
                             f"{self.threshold_rule!r}")
        for f in ("def_prompt", "m_prompt", "bg_prompt"):
            check_template(getattr(self, f), f"BgDisentangleConfig.{f}")


class BgDisentangle(Method):
    """Background-disentangled training (eq. 5-7), masked DDIM inversion + eq. 9 generation, eq. 13 masks."""

    name = "bgdisentangle"
    config_cls = BgDisentangleConfig
    needs_backbone = True
    needs_reference = False

    # ------------------------------------------------------------------ training
    def fit(self, backbone: Any, support: Sequence[Sample], cfg: BgDisentangleConfig, out_dir: Path,
            progress: Progress = no_progress) -> Adapter:
        category, by_type = support_by_type("BgDisentangle", support, need_mask=True)
        out_dir = Path(out_dir)

        def fit_type(dt: str, samples: list[Sample], dt_dir: Path) -> dict[str, Any]:
            info = fit_one(backbone, category, dt, samples, cfg, dt_dir, progress)
            return {"dir": dt, "config_hash": info["config_hash"], "adapter": info["adapter"],
                    "steps": info["train_steps"], "skipped": info["skipped"], **loss_summary(info.get("losses") or [])}

        types = fit_each_type(f"bgdisentangle {category}: adapters", by_type, out_dir, progress, fit_type)
        meta = {"trained": True, "defect_types": types, "preset": cfg.preset, "model_id": backbone.model_id,
                "training": {f: getattr(cfg, f) for f in TRAIN_FIELDS}}
        return Adapter(method=self.name, category=category, path=out_dir, meta=meta)

    # ------------------------------------------------------------------ synthesis
    def synthesize(self, backbone: Any, adapter: Adapter, jobs: Sequence[SynthesisJob], cfg: BgDisentangleConfig,
                   progress: Progress = no_progress) -> Iterator[Synthetic]:
        if adapter.path is None:
            raise ValueError(f"bgdisentangle adapter of category {adapter.category!r} has no folder; materialize "
                             f"anomaly_adapters for method 'bgdisentangle' first")
        by_type: dict[str, list[SynthesisJob]] = {}
        for job in jobs:
            by_type.setdefault(job.defect_type, []).append(job)
        cache = InversionCache()
        done = 0
        for dt in sorted(by_type):
            dt_dir = Path(adapter.path) / check_name(dt, "defect type")
            info = read_info(dt_dir)
            T = backbone.scheduler.config.num_train_timesteps
            if info.get("model_id") != backbone.model_id or info.get("T") != T:
                raise ValueError(f"{dt_dir / 'adapter.json'}: adapter trained on backbone {info.get('model_id')!r} "
                                 f"(T={info.get('T')}) but synthesis runs on {backbone.model_id!r}; rerun "
                                 f"anomaly_adapters with this backbone")
            with adapted(backbone, info, dt_dir) as bb:
                cond = build(bb, info["def_prompt"], info["m_prompt"], info["bg_prompt"])
                for group in _groups(by_type[dt], bb.latent_size):
                    for r in self.generate_group(bb, cond, info, group, cfg, cache):
                        done += 1
                        progress(f"bgdisentangle {adapter.category}: synthesis", done, len(jobs))
                        yield r

    def generate_group(self, backbone: Any, cond: Conditioning, info: dict[str, Any], jobs: Sequence[SynthesisJob],
                       cfg: BgDisentangleConfig, cache: InversionCache | None) -> list[Synthetic]:
        """Jobs sharing (normal image, latent mask): one inversion + background stream when cached."""
        start = time.perf_counter()
        normal = jobs[0].normal
        hw = normal.image.shape[:2]
        lat = (backbone.latent_size, backbone.latent_size)
        m = target_latent_mask(jobs[0].target_mask, lat).to(backbone.device)
        nkey = (backbone.model_id, image_key(normal.image))
        outs = []
        if cfg.cache_inversion and cache is not None:
            z0 = cache.latent(nkey, lambda: encode(backbone, normal.image))
            key = (info["config_hash"], info["defect_type"], cfg.steps, nkey, image_key(m.cpu().numpy()))
            run = cache.background(key, lambda: background_run(backbone, z0, m, cond, cfg.steps))
            for i in range(0, len(jobs), cfg.target_batch):
                batch = jobs[i:i + cfg.target_batch]
                outs.append(denoise(backbone, cond, m, start_latents(run.zT_m, m, [j.seed for j in batch]),
                                    cfg.steps, background=run))
        else:  # every target inverts and runs both branches itself (the baseline of the cache)
            for job in jobs:
                z0 = encode(backbone, normal.image)
                zT_m = invert_masked(backbone, z0, m, cond, cfg.steps)
                outs.append(denoise(backbone, cond, m, start_latents(zT_m, m, [job.seed]), cfg.steps))
        z = torch.cat([o.z0 for o in outs])
        attention = torch.cat([o.attention for o in outs])
        images = decode(backbone, z, size=hw)
        seconds = (time.perf_counter() - start) / len(jobs)
        params = {"steps": cfg.steps, "threshold": cfg.threshold, "threshold_rule": cfg.threshold_rule,
                  "background": cfg.background,
                  "adapter": info["adapter"], "adapter_hash": info["config_hash"], "def_prompt": info["def_prompt"],
                  "m_prompt": info["m_prompt"], "bg_prompt": info["bg_prompt"], "preset": cfg.preset,
                  "cache_inversion": bool(cfg.cache_inversion and cache is not None), "scheduler": "ddim eta=0",
                  "inversion": "masked ddim (eq. 8), C2, masked cross-attention"}
        results = []
        for i, job in enumerate(jobs):
            image = images[i]
            if cfg.background == "normal":
                image = np.where(generated_region(job.target_mask, lat)[..., None], image, normal.image)
            refined, extra = refine(attention[i], job.target_mask, cfg.threshold, cfg.threshold_rule)
            mask, kind = (refined, "eq13 refined") if refined.any() else (job.target_mask.copy(),
                                                                          "target (refinement empty)")
            results.append(Synthetic(job=job, image=np.ascontiguousarray(image), mask=mask,
                                     extras={"attention": extra}, params={**params, "seed": job.seed, "mask": kind},
                                     seconds=seconds))
        return results


def _groups(jobs: Sequence[SynthesisJob], latent_size: int) -> list[list[SynthesisJob]]:
    """Jobs grouped by (normal image, latent-grid target mask), in first-seen order."""
    groups: dict[tuple[str, str], list[SynthesisJob]] = {}
    for job in jobs:
        m = target_latent_mask(job.target_mask, (latent_size, latent_size))
        key = (image_key(job.normal.image), image_key(m.numpy()))
        groups.setdefault(key, []).append(job)
    return list(groups.values())
