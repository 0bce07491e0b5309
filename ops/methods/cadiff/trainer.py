"""CADiff training: CTP (context + anomaly tokens, eq. 4-8), then SSC (ControlNet + SAIM) with those tokens.

One model per product: a context token ``<cadiff-{category}>`` and one anomaly token
``<cadiff-{category}-{defect_type}>`` per defect type, all initialised from ``init_word`` ("anomaly", the paper's
choice), trained jointly on every support image of the category with the text encoder and UNet frozen (the
toolkit's textual inversion: only the new embedding rows train). Prompt per image: ``prompt`` with
``{context}`` and ``{anomaly}`` replaced by the image's two tokens.

Loss per step: L = L_CALDM + γ·L_loc + β·L_contrastive (eq. 8; ``losses``). L_CALDM regresses ε, so a backbone
whose scheduler predicts anything else is refused before the first step.

Choices where the paper is vague:
- Batch: ``batch_size`` support images drawn with replacement over ALL defect types (joint training), each seen
  in ``views`` augmented views (random crop = zoom in [``min_scale``, 1], translation up to ``max_shift`` of the
  size, rotation up to ``max_rotate`` degrees; image and mask share the transform; images reflect-padded, masks
  zero-padded; a view whose mask leaves the frame is replaced by the plain image). Views give NT-Xent its
  positives. Every random draw comes from the training loop's seeded generator.
- "Time-averaged" attention maps (A^{i,l} = 1/T Σ_t A_t^{i,l}): each view is noised at ``loc_timesteps`` = K
  stratified timesteps (one uniform draw in each of K equal slices of [0, T)), all views × K in ONE UNet call;
  L_CALDM averages over all of them, and each view's maps are the mean over its K timesteps (a K-point
  estimate of the time average; K = 1 is the plain single-timestep estimate).
- Attention maps: the cross-attention probabilities (mean over heads) of the two tokens of the sample at EVERY
  cross-attention layer, captured with their gradient (``GradCapture``); masks per layer by the toolkit's
  majority rule (``blend.latent_mask``).
- Contrastive data points v_b^c: the token's attention-pooled features of view b, Σ_p A_b^c(p) h_b(p) / Σ_p
  A_b^c(p) with h the cross-attention layer's input (query-side) features, L2-normalised per layer and
  concatenated over layers, averaged over the view's K timesteps. (A token embedding alone is the same vector in
  every view, so it cannot have positives across augmented views; pooling by its attention gives "the concept
  the token picks up in this image".) Labels: the context token is one concept, each anomaly type another.
- Stages and learning rates: the paper trains with one constant lr of 1e-5 (ControlNet's setting), which moves
  textual-inversion rows very slowly; we train in two resumable stages of the toolkit's loop: (1) CTP, only the
  token rows, ``train_steps`` at ``lr``; (2) SSC, the ControlNet + SAIM, ``control_steps`` at ``control_lr``,
  with the tokens frozen and baked into the text encoder, the same loss (L_loc and NT-Xent still shape the
  attention through the control residuals). Stage 2 is skipped with ``controlnet=False`` or 0 steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ops.diffusion.attention import AttentionController, Capture
from ops.diffusion.blend import latent_mask
from ops.diffusion.vae import encode
from ops.methods.cadiff.losses import loc_loss, nt_xent
from ops.types import Sample


class GradCapture(AttentionController):
    """The toolkit's controller, keeping captured probabilities in the autograd graph (for L_loc / NT-Xent)."""

    def keep(self, kind: str, branch: str, layer: str, name: str, probs: torch.Tensor) -> None:
        self.captured[(kind, branch, self.step, layer, name)] = probs


def token_names(category: str, defect_types: Sequence[str]) -> tuple[str, dict[str, str]]:
    """Placeholder strings: (context token, {defect type: anomaly token})."""
    return f"<cadiff-{category}>", {d: f"<cadiff-{category}-{d}>" for d in defect_types}


def render(template: str, context: str, anomaly: str) -> str:
    return template.format(context=context, anomaly=anomaly)


def token_columns(tokenizer: Any, prompt: str, token_ids: Sequence[int]) -> list[int]:
    """Column of each token id in the encoded prompt (BOS = column 0)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    cols = []
    for tid in token_ids:
        if tid not in ids:
            raise ValueError(f"prompt {prompt!r} does not contain token id {tid} (truncated?); shorten the template")
        cols.append(ids.index(tid))
    return cols


def token_targets(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(V, 1, R, R) anomaly masks -> (V, h, w, 2) float targets: [context ↔ inverse of the mask, anomaly ↔ mask]."""
    m = latent_mask(masks[:, 0] > 0.5, size, rule="majority")[:, 0]
    return torch.stack([~m, m], -1).float()


@dataclass
class Batch:
    images: torch.Tensor  # (V, 3, R, R) in [-1, 1]
    masks: torch.Tensor  # (V, 1, R, R) float {0, 1}
    types: list[str]


def affine_views(images: torch.Tensor, masks: torch.Tensor, rng: torch.Generator, min_scale: float,
                 max_shift: float, max_rotate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop/translation/rotation, the same for an image and its mask (module doc)."""
    n = images.shape[0]
    u = torch.rand((n, 4), generator=rng, device=rng.device, dtype=torch.float64).cpu()
    scale = min_scale + (1.0 - min_scale) * u[:, 0]
    shift = (u[:, 1:3] * 2 - 1) * max_shift * 2  # affine_grid coordinates span 2 per image side
    angle = (u[:, 3] * 2 - 1) * math.radians(max_rotate)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(images.device, torch.float32)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out_i = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    out_m = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    lost = out_m.flatten(1).amax(1) <= 0  # the defect left the frame: keep the plain view
    out_i[lost], out_m[lost] = images[lost], masks[lost]
    return out_i, out_m


def to_tensors(samples: Sequence[Sample], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Support images (N, 3, R, R) in [-1, 1] and masks (N, 1, R, R) {0, 1} at the backbone's resolution."""
    imgs, masks = [], []
    for s in samples:
        x = torch.from_numpy(np.ascontiguousarray(s.image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        m = torch.from_numpy(np.ascontiguousarray(s.mask))[None, None].float()
        imgs.append(F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                                  antialias=True))
        masks.append(F.interpolate(m, size=(resolution, resolution), mode="nearest"))
    return torch.cat(imgs), torch.cat(masks)


@dataclass
class CTPLoss:
    """loss_fn(step, rng) for ``ops.diffusion.training.train``; records the last components in ``parts``."""

    backbone: Any
    samples: Sequence[Sample]
    prompts: dict[str, str]  # defect type -> prompt
    columns: tuple[int, int]  # (context column, anomaly column), identical for every prompt
    labels: dict[str, int]  # defect type -> concept label of its anomaly token (context = 0)
    batch_size: int
    views: int
    loc_timesteps: int
    gamma: float
    beta: float
    temperature: float
    min_scale: float = 0.8
    max_shift: float = 0.1
    max_rotate: float = 15.0
    ssc: Any = None  # an SSC: stage 2
    fixed_cond: dict[str, torch.Tensor] | None = None  # prompt embeddings when the tokens are frozen
    parts: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind = self.backbone.scheduler.config.prediction_type
        if kind != "epsilon":  # L_CALDM regresses ε, and IAR's DDIM sampler reads the UNet's output as ε
            raise ValueError(f"CADiff trains and samples an ε-prediction UNet (L_CALDM = ||ε - ε_θ||², eq. 4); the "
                             f"backbone's scheduler has prediction_type={kind!r}, use a backbone whose scheduler "
                             f"predicts 'epsilon'")
        self.images, self.masks = to_tensors(self.samples, self.backbone.resolution)
        self.controller = GradCapture(self.backbone.unet, [Capture(kind="cross", tokens=list(self.columns),
                                                                   name="ctp")])
        self.cross = [k for k, info in self.controller.infos.items() if info.kind == "cross"]
        self.hidden: dict[str, torch.Tensor] = {}

    def _cond(self, types: Sequence[str]) -> torch.Tensor:
        if self.fixed_cond is not None:
            return torch.cat([self.fixed_cond[t] for t in types])
        uniq = sorted(set(types))
        enc = self.backbone.encode_prompt([self.prompts[t] for t in uniq])  # with grad to the token rows
        return enc[[uniq.index(t) for t in types]]

    def draw(self, rng: torch.Generator) -> Batch:
        idx = torch.randint(len(self.samples), (self.batch_size,), generator=rng, device=rng.device).cpu()
        idx = idx.repeat_interleave(self.views)
        images, masks = affine_views(self.images[idx], self.masks[idx], rng, self.min_scale, self.max_shift,
                                     self.max_rotate)
        return Batch(images, masks, [self.samples[int(i)].defect_type for i in idx])

    def __call__(self, _step: int, rng: torch.Generator) -> torch.Tensor:
        bb, k = self.backbone, self.loc_timesteps
        batch = self.draw(rng)
        v = len(batch.types)
        z0 = encode(bb, batch.images).float().repeat_interleave(k, 0)
        T = bb.scheduler.config.num_train_timesteps
        u = torch.rand((v, k), generator=rng, device=rng.device).cpu()
        t = ((torch.arange(k)[None, :] + u) * (T / k)).long().clamp_max(T - 1).flatten().to(bb.device)
        noise = torch.randn(z0.shape, generator=rng, device=rng.device, dtype=torch.float32).to(z0.device)
        noisy = bb.scheduler.add_noise(z0, noise, t)
        cond = self._cond(batch.types).repeat_interleave(k, 0)
        pred, attn = self.forward(noisy, t, cond, batch.masks.repeat_interleave(k, 0))
        l_caldm = F.mse_loss(pred.float(), noise.float())
        maps, targets, pooled = [], [], []
        for layer, a in attn.items():  # a: (V·K, h, w, 2) = [context, anomaly] columns
            h, w = a.shape[1:3]
            maps.append(a.view(v, k, h, w, 2).mean(1))  # the K-timestep average per view
            targets.append(token_targets(batch.masks, (h, w)).to(a.device))
            feats = self.hidden[layer].float()  # (V·K, h·w, C)
            weights = a.flatten(1, 2)  # (V·K, h·w, 2)
            vec = torch.einsum("npc,npd->ncd", weights, feats) / weights.sum(1)[..., None].clamp_min(1e-8)
            pooled.append(F.normalize(vec, dim=-1))
        l_loc = loc_loss(maps, targets)
        feats = torch.cat(pooled, -1).view(v, k, 2, -1).mean(1)  # (V, 2, D)
        labels = torch.tensor([[0, self.labels[d]] for d in batch.types], device=feats.device)
        l_con = nt_xent(feats.reshape(2 * v, -1), labels.flatten(), self.temperature)
        self.parts = {"caldm": float(l_caldm.detach()), "loc": float(l_loc.detach()), "con": float(l_con.detach())}
        return l_caldm + self.gamma * l_loc + self.beta * l_con

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The UNet's prediction (through the SSC in stage 2) and, per cross-attention layer, the probabilities of
        the [context, anomaly] columns (N, h, w, 2) with their gradient; the layers' inputs go to ``hidden``."""
        bb = self.backbone
        unet = bb.unet
        handles = []
        for layer in self.cross:
            module = unet.get_submodule(layer.removesuffix(".processor"))

            def grab(_m: Any, args: tuple, kwargs: dict, layer: str = layer) -> None:
                self.hidden[layer] = args[0] if args else kwargs["hidden_states"]

            handles.append(module.register_forward_pre_hook(grab, with_kwargs=True))
        c = self.controller
        c.captured.clear()
        c.set_step(0)
        c.begin_call([("x", noisy.shape[0])], tuple(noisy.shape[-2:]))
        try:
            with c:
                x, cc = noisy.to(bb.dtype), cond.to(bb.dtype)
                if self.ssc is None:
                    pred = unet(x, t, encoder_hidden_states=cc).sample
                else:
                    pred = self.ssc.unet_forward(unet, x, t, cc, masks.to(bb.device)).sample
        finally:
            for h in handles:
                h.remove()
        return pred, {layer: c.captured[("cross", "x", 0, layer, "ctp")] for layer in self.cross}


@dataclass
class FitResult:
    tokens: dict[str, Any]  # context token, anomaly tokens per type, files
    ctp: Any  # TrainResult of stage 1
    ssc: Any  # TrainResult of stage 2 or None
    parts: dict[str, dict[str, float]]  # last loss components per stage


def fit_category(backbone: Any, samples: Sequence[Sample], cfg: Any, out_dir: Any, progress: Any = None) -> FitResult:
    """Both stages for one category (module doc); writes tokens/ (and ssc/) under ``out_dir``."""
    from pathlib import Path

    from ops.diffusion.textual_inversion import add_placeholder_tokens
    from ops.diffusion.training import train
    from ops.methods.cadiff.ssc import SSC

    out = Path(out_dir)
    category = samples[0].category
    types = sorted({s.defect_type for s in samples})
    ctx, ano = token_names(category, types)
    placeholders = [ctx] + [ano[d] for d in types]
    tok, te, unet = backbone.tokenizer, backbone.text_encoder, backbone.unet
    ti = add_placeholder_tokens(tok, te, placeholders, init_words=cfg.init_word)
    try:
        prompts = {d: render(cfg.prompt, ctx, ano[d]) for d in types}
        cols = {d: tuple(token_columns(tok, p, [ti.token_ids[0], ti.token_ids[1 + i]]))
                for i, (d, p) in enumerate(prompts.items())}
        if len(set(cols.values())) != 1:
            raise ValueError(f"CADiff prompt {cfg.prompt!r}: the tokens land in different columns per defect type "
                             f"{cols}; put {{context}} and {{anomaly}} where only single tokens precede them")
        loss = CTPLoss(backbone, samples, prompts, next(iter(cols.values())), {d: 1 + i for i, d in enumerate(types)},
                       cfg.batch_size, cfg.views, cfg.loc_timesteps, cfg.gamma, cfg.beta, cfg.temperature,
                       cfg.min_scale, cfg.max_shift, cfg.max_rotate)
        ctp = train(ti.params, loss, cfg.train_steps, cfg.lr, ckpt_dir=out / "checkpoints" / "ctp",
                    ckpt_every=cfg.ckpt_every, seed=cfg.seed, progress=progress, frozen_modules=[unet, te],
                    desc=f"cadiff {category}: CTP")
        parts = {"ctp": dict(loss.parts)}
        files = ti.save(out / "tokens")
        ti.bake()  # frozen tokens from here on: the plain text encoder gives the trained prompts
        ssc_result = None
        if cfg.controlnet and cfg.control_steps > 0:
            ssc = SSC.from_unet(unet, backbone.vae_factor, seed=cfg.seed, mlp_ratio=cfg.mlp_ratio).train()
            with torch.no_grad():
                fixed = {d: backbone.encode_prompt([p]) for d, p in prompts.items()}
            loss.ssc, loss.fixed_cond = ssc, fixed
            ssc_result = train(list(ssc.parameters()), loss, cfg.control_steps, cfg.control_lr,
                               ckpt_dir=out / "checkpoints" / "ssc", ckpt_every=cfg.ckpt_every, seed=cfg.seed + 1,
                               progress=progress, frozen_modules=[unet, te], desc=f"cadiff {category}: SSC")
            parts["ssc"] = dict(loss.parts)
            ssc.save(out / "ssc")
    finally:
        ti.detach()
    tokens = {"context": ctx, "anomaly": ano, "files": [p.name for p in files], "init_word": cfg.init_word,
              "prompts": prompts, "columns": list(loss.columns)}
    return FitResult(tokens=tokens, ctp=ctp, ssc=ssc_result, parts=parts)
