"""CADiff ("CADiff: Context-Aware Diffusion for Controllable Anomaly Generation in Anomaly Detection", Tong et
al.) as the ``cadiff`` generation method.

``fit`` (one model per product, all its defect types): Context-aware Text Prompt (CTP) = a context token and one
anomaly token per defect type trained as textual inversion with L = L_CALDM + γ·L_loc + β·L_contrastive, then
Self-adaptive Spatial Control (SSC) = a mask-conditioned ControlNet with SAIM blocks trained with those tokens
(``trainer``, ``losses``, ``ssc``). ``synthesize``: generation on a normal image at the target mask with
Intensity-controllable Attention Re-weighting (IAR: w per image, masked focus, delayed focus; ``iar``).

Files under ``out_dir``: ``tokens/learned_embeds-<i>.safetensors`` (diffusers textual-inversion files, context
token first; ``pipe.load_textual_inversion`` reads them), ``ssc/controlnet/`` (``ControlNetModel.from_pretrained``)
+ ``ssc/saim.safetensors`` + ``ssc/saim.json`` when the ControlNet is trained, ``cadiff.json`` (tokens, prompts,
config hash, loss histories; written last, so its presence marks a finished adapter), ``run.json`` and
``checkpoints/ctp|ssc/`` (resume state of the toolkit's loop).

Presets: ``demo`` (default; CPU-sized: 16 CTP steps + 8 SSC steps at batch 1 image × 2 views, 10 DDIM steps) and
``paper``: γ = 0.001, β = 0.0005, α_thr = 0.75, 50 DDIM steps, SSC at the paper's constant lr 1e-5 with batch 16
(8 images × 2 views) for 2000 steps (~1000 epochs of a product's ~30 support images); the tokens at lr 5e-3
(textual inversion's usual rate; the paper gives none for them), CFG 7.5 (the paper gives none). The paper does
not state the NT-Xent temperature: 0.5 (configurable). ``forge-base``: 12 CTP + 6 SSC steps, 8 DDIM steps
(sized for the demo's budget). Explicit options override the preset; without one, the loaded backbone's own preset
is used if the method has one, else ``demo`` (``ops.methods.base.MethodConfig``).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

from ops.atomic import write_bytes_atomic
from ops.methods.base import (Method, MethodConfig, Progress, backbone_identity, no_progress,
                              read_adapter_record, training_digest)
from ops.types import Adapter, Sample, Synthetic, SynthesisJob

FORMAT_VERSION = 1
INFO = "cadiff.json"
TRAIN_FIELDS = ("prompt", "init_word", "train_steps", "lr", "batch_size", "views", "loc_timesteps", "gamma", "beta",
                "temperature", "min_scale", "max_shift", "max_rotate", "controlnet", "control_steps", "control_lr",
                "mlp_ratio", "seed")

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    # forge-base: sized for the demo's budget (its UNet costs ~4x tiny's per call)
    "forge-base": dict(train_steps=12, control_steps=6, steps=8),
    "paper": dict(train_steps=2000, lr=5e-3, batch_size=8, views=2, loc_timesteps=2, control_steps=2000,
                  control_lr=1e-5, ckpt_every=200, steps=50, guidance=7.5),
}


@dataclass
class CADiffConfig(MethodConfig):
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    preset: str = "demo"
    prompt: str = "a photo of {context} with {anomaly}"
    init_word: str = "anomaly"
    # CTP
    train_steps: int = 16
    lr: float = 5e-3
    batch_size: int = 1
    views: int = 2
    loc_timesteps: int = 1
    gamma: float = 0.001
    beta: float = 0.0005
    temperature: float = 0.5
    min_scale: float = 0.8
    max_shift: float = 0.1
    max_rotate: float = 15.0
    # SSC
    controlnet: bool = True
    control_steps: int = 8
    control_lr: float = 1e-4
    mlp_ratio: float = 1.0
    seed: int = 0
    ckpt_every: int = 0
    # IAR sampling
    steps: int = 10
    guidance: float = 5.0
    w_min: float = 0.5
    w_max: float = 1.5
    alpha_thr: float = 0.75
    attention_res: int = 16
    mfa: bool = True
    dfs: bool = True
    background: str = "normal"
    refine_threshold: float = 0.5


    def __post_init__(self) -> None:
        for key in ("{context}", "{anomaly}"):
            if key not in self.prompt:
                raise ValueError(f"CADiffConfig.prompt {self.prompt!r} must contain {key}")
        try:
            self.prompt.format(context="c", anomaly="a")
        except (KeyError, IndexError) as e:
            raise ValueError(f"CADiffConfig.prompt {self.prompt!r} may only use {{context}} and {{anomaly}}") from e
        if min(self.train_steps, self.control_steps, self.ckpt_every) < 0 or self.steps < 1:
            raise ValueError("CADiffConfig: need train_steps, control_steps, ckpt_every >= 0 and steps >= 1")
        if self.batch_size < 1 or self.views < 2 or self.loc_timesteps < 1:
            raise ValueError("CADiffConfig: need batch_size >= 1, views >= 2 (NT-Xent positives), loc_timesteps >= 1")
        if min(self.lr, self.control_lr, self.temperature, self.mlp_ratio) <= 0 or min(self.gamma, self.beta) < 0:
            raise ValueError("CADiffConfig: need lr, control_lr, temperature, mlp_ratio > 0 and gamma, beta >= 0")
        if not 0 < self.min_scale <= 1 or self.max_shift < 0 or self.max_rotate < 0:
            raise ValueError("CADiffConfig: need 0 < min_scale <= 1, max_shift >= 0, max_rotate >= 0")
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"CADiffConfig: need 0 <= w_min <= w_max, got {self.w_min}, {self.w_max}")
        if self.background not in ("normal", "generated"):
            raise ValueError(f"CADiffConfig.background must be 'normal' or 'generated', got {self.background!r}")
        if not 0 <= self.refine_threshold <= 1:
            raise ValueError("CADiffConfig.refine_threshold must lie in [0, 1]")


def config_hash(cfg: CADiffConfig, backbone: Any, samples: Sequence[Sample]) -> str:
    """What makes two trainings the same: training options, the backbone, the exact support pixels and masks (the
    defect type is part of each sample's key: one adapter holds every type's token)."""
    return training_digest([{f: getattr(cfg, f) for f in TRAIN_FIELDS}, backbone_identity(backbone, FORMAT_VERSION)],
                           samples, masks=True, key=lambda s: f"{s.image_id}|{s.defect_type}")


def read_info(out_dir: Path, missing_ok: bool = False) -> dict[str, Any] | None:
    return read_adapter_record(Path(out_dir) / INFO, "cadiff", missing_ok)


class CADiff(Method):
    """CADiff: context + anomaly tokens (CTP), mask ControlNet with SAIM (SSC), attention re-weighting (IAR)."""

    name = "cadiff"
    config_cls = CADiffConfig
    needs_backbone = True
    needs_reference = False

    def fit(self, backbone: Any, support: Sequence[Sample], cfg: CADiffConfig, out_dir: Path,
            progress: Progress = no_progress) -> Adapter:
        from ops.methods.cadiff.trainer import fit_category

        if not support:
            raise ValueError("CADiff.fit: empty support set; the split has no support anomalies for this category")
        for s in support:
            if s.defect_type == "good" or s.mask is None or not s.mask.any():
                raise ValueError(f"{s.source or s.image_id}: CADiff trains on defect images with non-empty masks; "
                                 f"this support image is normal or its mask is empty (check the split / mask file)")
        category = support[0].category
        out = Path(out_dir)
        digest = config_hash(cfg, backbone, support)
        done = read_info(out, missing_ok=True)
        if done is not None and done.get("config_hash") == digest:
            return self._adapter(category, out, done, skipped=True, preset=cfg.preset)
        run_file = out / "run.json"
        if run_file.is_file() and json.loads(run_file.read_text()).get("config_hash") != digest:
            # checkpoints of another configuration or support set must not be resumed into this run
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / INFO).unlink(missing_ok=True)  # outputs of an earlier, different run must not survive this one
        for stale in (out / "tokens", out / "ssc"):
            shutil.rmtree(stale, ignore_errors=True)
        write_bytes_atomic(run_file, json.dumps({"config_hash": digest}).encode())
        result = fit_category(backbone, support, cfg, out, progress)
        info = {"format": FORMAT_VERSION, "config_hash": digest, "category": category, "model_id": backbone.model_id,
                "resolution": backbone.resolution, "T": int(backbone.scheduler.config.num_train_timesteps),
                "tokens": result.tokens, "controlnet": result.ssc is not None,
                "training": {f: getattr(cfg, f) for f in TRAIN_FIELDS},
                "support_ids": sorted(s.image_id for s in support),
                "losses": {"ctp": result.ctp.losses, "ssc": result.ssc.losses if result.ssc else []},
                "loss_parts": result.parts,
                "resumed_from": {"ctp": result.ctp.resumed_from,
                                 "ssc": result.ssc.resumed_from if result.ssc else None},
                "seconds": {"ctp": result.ctp.seconds, "ssc": result.ssc.seconds if result.ssc else 0.0}}
        write_bytes_atomic(out / INFO, json.dumps(info, indent=1).encode())
        return self._adapter(category, out, info, skipped=False, preset=cfg.preset)

    def _adapter(self, category: str, out: Path, info: dict[str, Any], skipped: bool, preset: str) -> Adapter:
        meta = {"trained": True, "skipped": skipped, "preset": preset, "config_hash": info["config_hash"],
                "model_id": info["model_id"], "tokens": info["tokens"], "controlnet": info["controlnet"],
                "training": info["training"], "loss_parts": info.get("loss_parts", {}),
                "loss_first": {k: (v[0] if v else None) for k, v in info["losses"].items()},
                "loss_last": {k: (v[-1] if v else None) for k, v in info["losses"].items()}}
        return Adapter(method=self.name, category=category, path=out, meta=meta)

    def synthesize(self, backbone: Any, adapter: Adapter, jobs: Sequence[SynthesisJob], cfg: CADiffConfig,
                   progress: Progress = no_progress) -> Iterator[Synthetic]:
        import torch

        from ops.diffusion.textual_inversion import load_learned_tokens
        from ops.methods.cadiff.iar import IARSettings, draw_w, generate
        from ops.methods.cadiff.ssc import SSC

        if adapter.path is None:
            raise ValueError(f"CADiff adapter of category {adapter.category!r} has no folder; materialize "
                             f"anomaly_adapters for method 'cadiff' first")
        out = Path(adapter.path)
        info = read_info(out)
        if info.get("model_id") != backbone.model_id or info.get("T") != backbone.scheduler.config.num_train_timesteps:
            raise ValueError(f"{out / INFO}: adapter trained on backbone {info.get('model_id')!r} (T={info.get('T')}) "
                             f"but synthesis runs on {backbone.model_id!r}; rerun anomaly_adapters with this backbone")
        tokens = info["tokens"]
        ids = load_learned_tokens(backbone.tokenizer, backbone.text_encoder,
                                  [out / "tokens" / f for f in tokens["files"]])
        names = [tokens["context"]] + list(tokens["anomaly"].values())
        ssc = SSC.load(out / "ssc", backbone.device) if info["controlnet"] else None
        uncond = backbone.null_embedding()
        conds: dict[str, Any] = {}
        col = int(tokens["columns"][1])
        for done, job in enumerate(jobs, 1):
            start = time.perf_counter()
            prompt = tokens["prompts"].get(job.defect_type)
            if prompt is None:
                raise ValueError(f"{job.category} job {job.index}: defect type {job.defect_type!r} has no CADiff "
                                 f"anomaly token (trained: {sorted(tokens['prompts'])}); rerun anomaly_adapters")
            if job.defect_type not in conds:
                with torch.no_grad():
                    conds[job.defect_type] = backbone.encode_prompt([prompt])
            w = draw_w(job.seed, cfg.w_min, cfg.w_max)
            s = IARSettings(steps=cfg.steps, guidance=cfg.guidance, w=w, alpha_thr=cfg.alpha_thr,
                            attention_res=cfg.attention_res, mfa=cfg.mfa, dfs=cfg.dfs, background=cfg.background,
                            refine_threshold=cfg.refine_threshold)
            r = generate(backbone, conds[job.defect_type], uncond, col, job.normal.image, job.target_mask, job.seed, s,
                         ssc)
            params = {**r.params, "seed": job.seed, "prompt": prompt, "w_range": [cfg.w_min, cfg.w_max],
                      "steps": cfg.steps, "guidance": cfg.guidance, "background": cfg.background,
                      "controlnet": ssc is not None, "adapter_hash": info["config_hash"], "preset": cfg.preset,
                      "token_ids": dict(zip(names, ids))}
            yield Synthetic(job=job, image=r.image, mask=r.mask, extras={"attention": r.attention}, params=params,
                            seconds=time.perf_counter() - start)
            progress(f"cadiff {adapter.category}: synthesis", done, len(jobs))
