"""O2MAG (One-to-More Anomaly Generation, papers/o2mag.md) as the training-free ``o2mag`` method.

``fit`` runs AGO (``ops.methods.o2mag.ago``) once per support anomaly: one optimised text embedding e* per
reference image, cached by content hash + model id + settings under ``out_dir``. ``synthesize`` runs TriAG + DAE
(``ops.methods.o2mag.triag``) for every job: jobs sharing (reference, normal) share the reference and normal
branches, which are computed once; their targets are batched.

Choices where the paper or the brief leave room (more in the two helper modules):
- Prompt: every branch of a (reference, normal) group is conditioned on the reference's e* (AGO of
  ``prompt`` = "a photo of a {category} with a {defect_type} defect"); with ``ago_steps=0`` (the paper's
  "w/o AGO" ablation) e is the prompt's plain embedding. One conditioning for all three branches makes the
  normal branch a reconstruction under the same text as the target, so outside M_T the target sees exactly
  what the normal branch sees.
- No classifier-free guidance: the reference and normal branches are DDIM reconstructions of their inversions,
  which CFG would break; the semantics come from e* and the grafted keys/values.
- Output image: the WHOLE decoded target image, as in the paper, resized from ``backbone.resolution`` back to the
  normal image's size (``background="generated"``, the field default and the ``paper`` preset); outside M_T it is close to, not equal to, the normal
  branch's reconstruction (tolerance in ``ops.methods.o2mag.triag``). ``background="normal"`` instead pastes the decoded
  target onto the original normal pixels on the latent cells M_T touches (upsampled), so the rest is the
  original image to the bit. On the untrained tiny backbone the VAE alone turns any image into noise, so only
  "normal" gives a recognisable background there: the ``demo`` preset (the default preset) uses it.
- Output mask: the target mask M_T; with ``refine_mask=True`` it is M_T refined by the captured cross-attention
  of the anomaly tokens (``ops.masks.refine.attention_mask``, eq. 13 of the bg-disentangle paper), falling back
  to M_T when that leaves nothing (recorded in the row's params).
- Presets: ``demo`` (AGO 30 steps, 12 DDIM steps, background "normal") keeps the CPU demo fast; ``paper`` = AGO
  500 Adam steps at lr 3e-3 and 50 DDIM steps on SD 1.5; ``forge-base`` = AGO 12 steps, 8 DDIM steps, background
  "normal" (its VAE round trip is 19 dB). Explicit options override the preset; without one, the loaded
  backbone's own preset is used if the method has one, else ``demo`` (``ops.methods.base.MethodConfig``). The paper publishes no
  graft layers/steps nor DAE range/factor: defaults are the decoder at every step, DAE x1.5 on the middle 40 %.
- Ablation switches (the paper's ablation table, each a config option): ``ago=False`` ("w/o AGO": the prompt's
  plain embedding for every branch, nothing fitted; same as ``ago_steps=0``), ``dae=False`` ("w/o DAE": no
  attention enhancement; same as ``dae_factor=1``), ``triag_masks=False`` ("w/o TriAG mask": grafting without
  M_T/M_R, the target reads the whole reference K/V at every query; ``ops.methods.o2mag.triag``).
- Files: ``out_dir/ago/<key>.safetensors`` per support image; embeddings of images no longer in the support are
  deleted, so the folder mirrors the adapter row. ``ago_steps=0`` writes nothing (path None).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from ops.diffusion.vae import image_key
from ops.masks.refine import attention_mask
from ops.methods.base import Method, MethodConfig, Progress, no_progress, render_prompt
from ops.methods.o2mag.ago import AGOSettings, fit_reference, load_embedding
from ops.types import Adapter, Sample, Synthetic, SynthesisJob

AGO_DIR = "ago"
PRESETS: dict[str, dict[str, Any]] = {
    # The demo runs on the untrained tiny backbone, whose VAE turns any image into noise: keep the original pixels
    # outside the generated region so the demo's images (and background metrics) show the placement mechanics.
    "demo": dict(background="normal"),
    # forge-base's VAE (19 dB round trip) cannot reproduce a background either; fewer steps for the demo's budget
    "forge-base": dict(background="normal", ago_steps=12, steps=8),
    "paper": dict(ago_steps=500, ago_lr=3e-3, ago_ckpt_every=100, steps=50, background="generated"),
}
LAYER_GROUPS = ("down", "mid", "up")  # or full attention-processor names of the UNet


@dataclass
class O2MAGConfig(MethodConfig):
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    preset: str = "demo"
    prompt: str = "a photo of a {category} with a {defect_type} defect"
    # AGO
    ago_steps: int = 30
    ago_lr: float = 3e-3
    ago_batch_size: int = 1
    ago_ckpt_every: int = 0
    seed: int = 0
    # sampling
    steps: int = 12
    graft_layers: tuple[str, ...] = ("up",)  # self-attention layers (groups or processor names) TriAG grafts
    graft_start: float = 0.0  # fraction of the sampling steps where grafting starts / ends
    graft_end: float = 1.0
    dae_factor: float = 1.5  # DAE scale inside M_T (1 = off)
    dae_start: float = 0.3  # DAE acts on the middle sampling steps [start, end) (fractions)
    dae_end: float = 0.7
    dae_self: bool = True
    dae_cross: bool = True
    # ablation switches (module docstring)
    ago: bool = True
    dae: bool = True
    triag_masks: bool = True
    background: str = "generated"  # "generated" | "normal"
    refine_mask: bool = False
    attention_threshold: float = 0.5
    attention_res: int | None = 16  # grid of the captured cross-attention (None: no attention extra)
    cache_branches: bool = True
    target_batch: int = 8


    def __post_init__(self) -> None:
        self.graft_layers = tuple(self.graft_layers)
        bad = [g for g in self.graft_layers if g not in LAYER_GROUPS and not str(g).endswith(".processor")]
        if bad:
            raise ValueError(f"O2MAGConfig.graft_layers {bad} unknown; use groups from {LAYER_GROUPS} or attention "
                             f"processor names like 'up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor'")
        for lo, hi, what in ((self.graft_start, self.graft_end, "graft"), (self.dae_start, self.dae_end, "dae")):
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"O2MAGConfig: need 0 <= {what}_start <= {what}_end <= 1, got {lo}, {hi}")
        if self.steps < 1 or self.target_batch < 1 or self.dae_factor <= 0:
            raise ValueError("O2MAGConfig: need steps >= 1, target_batch >= 1 and dae_factor > 0")
        if self.background not in ("generated", "normal"):
            raise ValueError(f"O2MAGConfig.background must be 'generated' or 'normal', got {self.background!r}")
        self.ago_settings()  # validates the AGO options
        try:
            self.prompt.format(category="c", defect_type="d")
        except (KeyError, IndexError) as e:
            raise ValueError(f"O2MAGConfig.prompt {self.prompt!r} may only use {{category}} and {{defect_type}}") from e

    @property
    def uses_ago(self) -> bool:
        return self.ago and self.ago_steps > 0

    def ago_settings(self) -> AGOSettings:
        return AGOSettings(steps=self.ago_steps, lr=self.ago_lr, seed=self.seed, batch_size=self.ago_batch_size,
                           ckpt_every=self.ago_ckpt_every)


class O2MAG(Method):
    """O2MAG, training-free: AGO text embedding, tri-branch self-attention grafting (TriAG), dual attention enhancement."""

    name = "o2mag"
    config_cls = O2MAGConfig
    needs_backbone = True
    needs_reference = True

    def fit(self, backbone: Any, support: Sequence[Sample], cfg: O2MAGConfig, out_dir: Path,
            progress: Progress = no_progress) -> Adapter:
        if not support:
            raise ValueError("O2MAG.fit: empty support set; the split has no support anomalies for this category")
        category = support[0].category
        out_dir = Path(out_dir)
        refs: dict[str, Any] = {}
        ordered = sorted(support, key=lambda s: s.image_id)
        for i, s in enumerate(ordered):
            if s.defect_type == "good":
                raise ValueError(f"{s.source or s.image_id}: a normal ('good') image reached O2MAG's support set; "
                                 f"the support must hold defect images only (check the split)")
            progress(f"o2mag {category}: AGO", i, len(ordered))
            if cfg.uses_ago:
                refs[s.image_id] = fit_reference(backbone, s.image, s.image_id,
                                                 render_prompt(cfg, category, s.defect_type), cfg.ago_settings(),
                                                 out_dir / AGO_DIR, progress)
        progress(f"o2mag {category}: AGO", len(ordered), len(ordered))
        _prune(out_dir / AGO_DIR, {r["file"] for r in refs.values()})
        meta = {"trained": False, "ago": {"steps": cfg.ago_steps if cfg.uses_ago else 0, "lr": cfg.ago_lr, "seed": cfg.seed,
                                          "batch_size": cfg.ago_batch_size},
                "model_id": backbone.model_id, "preset": cfg.preset, "references": refs}
        return Adapter(method=self.name, category=category, path=out_dir if refs else None, meta=meta)

    def embedding(self, backbone: Any, adapter: Adapter, reference: Sample, cfg: O2MAGConfig) -> Any:
        """e* of ``reference`` (1, 77, D): the fitted AGO file, or the plain prompt embedding without AGO."""
        prompt = render_prompt(cfg, reference.category, reference.defect_type)
        if not cfg.uses_ago:
            return backbone.encode_prompt([prompt])
        info = (adapter.meta.get("references") or {}).get(reference.image_id)
        if info is None or adapter.path is None:
            raise ValueError(f"{reference.source or reference.image_id}: the o2mag adapter of {adapter.category} has "
                             f"no AGO embedding for this reference; re-materialize anomaly_adapters for method "
                             f"'o2mag' (the support set changed) or set ago_steps=0")
        if info["image_sha256"] != image_key(reference.image) or info.get("prompt") != prompt:
            raise ValueError(f"{reference.source or reference.image_id}: its pixels or prompt differ from the ones "
                             f"AGO was fitted on; re-materialize anomaly_adapters for method 'o2mag'")
        return load_embedding(Path(adapter.path) / AGO_DIR / info["file"], backbone)

    def synthesize(self, backbone: Any, adapter: Adapter, jobs: Sequence[SynthesisJob], cfg: O2MAGConfig,
                   progress: Progress = no_progress) -> Iterator[Synthetic]:
        from ops.methods.o2mag.triag import BranchCache

        groups: dict[tuple[str, str], list[SynthesisJob]] = {}
        for job in jobs:
            if job.reference is None or job.reference.mask is None or not job.reference.mask.any():
                where = job.reference.source or job.reference.image_id if job.reference is not None else "no reference"
                raise ValueError(f"{job.category} job {job.index} ({where}): O2MAG needs a reference anomaly with a "
                                 f"non-empty mask; check the support image's ground-truth mask file")
            groups.setdefault((job.reference.image_id, job.normal.image_id), []).append(job)
        cache = BranchCache() if cfg.cache_branches else None
        done = 0
        # reference order: consecutive groups share the cached reference branch
        for key in sorted(groups):
            for r in self.generate_group(backbone, adapter, groups[key], cfg, cache):
                done += 1
                progress("o2mag synthesize", done, len(jobs))
                yield r

    def generate_group(self, backbone: Any, adapter: Adapter, jobs: Sequence[SynthesisJob], cfg: O2MAGConfig,
                       cache: Any = None) -> list[Synthetic]:
        """All jobs of one (reference, normal) pair: their target masks become one batched target branch."""
        from ops.diffusion.vae import decode, encode
        from ops.methods.o2mag.triag import generated_region, resize_map, run_targets

        start = time.perf_counter()
        ref, normal = jobs[0].reference, jobs[0].normal
        s = triag_settings(cfg, backbone, ref.category, ref.defect_type)
        cond = self.embedding(backbone, adapter, ref, cfg)
        out = run_targets(backbone, cond, (ref.image, ref.mask, encode(backbone, ref.image)),
                          (normal.image, encode(backbone, normal.image)), np.stack([j.target_mask for j in jobs]), s,
                          cache)
        hw = normal.image.shape[:2]
        images = decode(backbone, out.z0, size=hw)
        seconds = (time.perf_counter() - start) / len(jobs)
        params = {"steps": s.steps, "graft_layers": list(s.graft_layers), "graft_steps": _span(s.graft_steps),
                  "dae_factor": s.dae_factor, "dae_steps": _span(s.dae_steps), "dae_self": s.dae_self,
                  "dae_cross": s.dae_cross, "anomaly_tokens": list(s.tokens),
                "ago_steps": cfg.ago_steps if cfg.uses_ago else 0, "triag_masks": s.triag_masks,
                  "prompt": render_prompt(cfg, ref.category, ref.defect_type), "background": cfg.background,
                  "cache_branches": s.cache, "target_batch": s.target_batch, "preset": cfg.preset}
        results = []
        for i, job in enumerate(jobs):
            image = images[i]
            if cfg.background == "normal":
                region = generated_region(job.target_mask, tuple(out.z0.shape[-2:]))
                image = np.where(region[..., None], image, normal.image)
            extras, mask, kind = {}, job.target_mask, "target"
            if out.attention is not None:
                extras["attention"] = resize_map(out.attention[i], hw)
                if cfg.refine_mask:
                    refined = attention_mask(extras["attention"], job.target_mask, cfg.attention_threshold)
                    mask, kind = (refined, "refined") if refined.any() else (mask, "target (refinement empty)")
            results.append(Synthetic(job=job, image=np.ascontiguousarray(image), mask=mask.copy(), extras=extras,
                                     params={**params, "mask": kind}, seconds=seconds))
        return results


def triag_settings(cfg: O2MAGConfig, backbone: Any, category: str, defect_type: str) -> Any:
    from ops.methods.o2mag.triag import TriAGSettings, anomaly_tokens, step_window

    known = set(backbone.unet.attn_processors)
    missing = [n for n in cfg.graft_layers if n not in LAYER_GROUPS and n not in known]
    if missing:
        raise ValueError(f"O2MAGConfig.graft_layers {missing} are not attention processors of {backbone.model_id}; "
                         f"use groups {LAYER_GROUPS} or names from unet.attn_processors")
    return TriAGSettings(steps=cfg.steps, graft_layers=tuple(cfg.graft_layers),
                         graft_steps=step_window(cfg.graft_start, cfg.graft_end, cfg.steps),
                         dae_factor=cfg.dae_factor if cfg.dae else 1.0,
                         dae_steps=step_window(cfg.dae_start, cfg.dae_end, cfg.steps), dae_self=cfg.dae_self,
                         dae_cross=cfg.dae_cross,
                         tokens=anomaly_tokens(backbone.tokenizer, cfg.prompt, category, defect_type),
                         attention_res=cfg.attention_res, target_batch=cfg.target_batch, cache=cfg.cache_branches,
                         triag_masks=cfg.triag_masks)


def _span(steps: Sequence[int]) -> list[int] | None:
    return [steps[0], steps[-1]] if steps else None


def _prune(ago_dir: Path, keep: set[str]) -> None:
    """The adapter folder mirrors the adapter row: embeddings of references no longer in the support go."""
    if not ago_dir.is_dir():
        return
    for p in ago_dir.glob("*.safetensors"):
        if p.name not in keep:
            p.unlink()
