"""O2MAG inference: Tri-branch Attention Grafting (TriAG) + Dual Attention Enhancement (DAE), one-to-more.

Three DDIM trajectories share the frozen UNet and the reference's AGO embedding e*:
``ref`` (the reference anomaly, DDIM-inverted and reconstructed), ``normal`` (the normal image, likewise) and
``target`` (n target masks at once, all starting from the normal image's inverted noise). At the graft layers and
steps the target keeps its Q; inside its mask M_T it attends to the reference's self-attention K/V with keys
outside M_R masked out, outside M_T to the normal branch's K/V, outputs stitched by M_T (the toolkit's
``attention.Graft``). DAE (``attention.Reweight``) scales attention probabilities on query rows inside M_T at the
middle steps. Everything attention-related is the toolkit's controller; this module adds the K/V cache.

Performance design: the reference and normal branches do not depend on the target. With ``cache`` on, each
source branch is inverted and sampled ONCE while :class:`SourceKV` records its K/V at every graft layer and step;
every target batch then replays them (the target runs alone, batched). The reference branch is shared by every
normal image it is paired with, the normal branch by every target of its (reference, normal) group. A cached run
is keyed by its image, latent, conditioning e*, the model and the settings it was recorded with (steps, graft
layers/steps, triag_masks), so a cache shared across calls never serves a run of another setup. Without the
cache, every target batch inverts both sources again and runs the three branches jointly in one sampling loop
(the toolkit's in-step grafting). In both paths every branch is its own UNet call (sources batch 1, targets
batch <= ``target_batch``), so they give bit-identical images on any device (tests/test_o2mag.py); merging the
sources into the targets' call would change the last bits (batch composition) and saves little once the sources
are cached. The target batch size itself changes the last bits (~1e-5 in latents) on CPU.

Choices where the paper is vague:
- Inversion and sampling use the same DDIM grid and conditioning e*, no CFG (exact reconstructions); the target
  starts from the normal image's z_T. The job seed is not used: given (reference, normal, M_T) the output is
  deterministic, diversity comes from the target masks (one-to-more).
- Graft layers: the decoder's self-attention ("up", MasaCtrl's choice for appearance transfer) at every step by
  default; ``graft_layers`` takes groups ("down", "mid", "up") or processor names. DAE acts during the middle
  steps [dae_start, dae_end) of the schedule, on the target branch only:
  * cross-attention: probabilities of the anomaly tokens on query rows inside M_T times ``dae_factor`` at every
    cross-attention layer, prompt-to-prompt style without renormalisation (the anomaly words' values get more
    weight inside the mask; rows outside M_T are untouched).
  * self-attention, a true RE-WEIGHTING toward the anomaly region: on query rows inside M_T the probabilities of
    the keys inside M_T are multiplied by ``dae_factor`` and each row is renormalised to sum 1, so mass moves from
    the background keys to the region's keys; the row's output is a convex combination again, not a gain (scaling
    a whole row by f without a key mask or renormalisation would just multiply that row's output by f). It acts
    where the target attends to its OWN keys: every self-attention layer that is not grafted at that step. On a
    grafted layer the rows inside M_T already attend only to the reference's keys inside M_R, so a re-weighting
    toward the region would be the identity there.
- Ablations (the paper's table): ``triag_masks=False`` grafts without masks (the target attends to ALL of the
  reference's keys/values at every query, the normal branch is not used, no stitching); DAE off =
  ``dae_factor`` 1 (O2MAGConfig ``dae=False``); AGO off = the plain prompt embedding (O2MAGConfig ``ago=False``).
- Anomaly tokens: the prompt's tokens from the rendered ``{defect_type}`` to the end ("hole defect" in the
  default prompt); every word token when the template has no ``{defect_type}``.
- Background: outside M_T the target is steered by the normal branch's K/V, not pinned to it; through the
  non-grafted layers and the convolutions' receptive fields the defect leaks a little. Measured on tiny
  (untrained, attention at 16 and 8, the three target masks of tests/test_o2mag.py, 6 and 12 steps): mean |Δz| to
  the normal reconstruction outside the latent cells of M_T is 3.6-10 % of the latent's mean |z|, inside 2.8-4.0x
  the outside value (it was 5x while the self-attention DAE was a row gain); tests/test_o2mag.py holds the leak
  under 15 % (LEAK_TOL) and the inside/outside ratio above 2.5.
- Attention extra: the target's cross-attention probabilities of the anomaly tokens (summed), averaged over
  sampling steps and the cross-attention layers at ``attention_res`` (16, prompt-to-prompt's resolution), divided
  by its maximum, bilinearly resized to the normal image. The toolkit captures what the layer used, so DAE's
  scaling inside M_T is included.
- Cache memory (``SourceRun.nbytes``): K and V of each graft layer and step of both sources on the UNet's
  device: about 2.8 GB for SD 1.5 at 512 px, 50 steps, fp16 and the 9 decoder layers (27.5 MB per branch and
  step); 7.6 MiB for tiny at 12 steps (its 4 decoder layers at 8x8 and 16x16; BranchCache.peak_bytes). Only the last reference's branch and the current
  normal branch are kept (groups are processed in reference order).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ops.diffusion.attention import AttentionController, Capture, Graft, Reweight
from ops.diffusion.blend import latent_mask
from ops.diffusion.branches import AdapterState, Branch, BranchRunner
from ops.diffusion.ddim import sample, single
from ops.diffusion.inversion import invert
from ops.diffusion.vae import image_key

REF, NORMAL, TARGET = "ref", "normal", "target"
KV = dict[int, dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]]  # step -> (layer, branch) -> (K, V)


@dataclass(frozen=True)
class TriAGSettings:
    steps: int
    graft_layers: tuple[str, ...] = ("up",)
    graft_steps: tuple[int, ...] = ()
    dae_factor: float = 1.0
    dae_steps: tuple[int, ...] = ()
    dae_self: bool = True
    dae_cross: bool = True
    tokens: tuple[int, ...] = ()  # anomaly token columns of the prompt
    attention_res: int | None = 16
    target_batch: int = 8
    cache: bool = True
    triag_masks: bool = True  # False: the "w/o TriAG mask" ablation (whole reference K/V for every query)

    @property
    def grafting(self) -> bool:
        return bool(self.graft_layers and self.graft_steps)


def step_window(start: float, end: float, steps: int) -> tuple[int, ...]:
    """Sampling step indices i with start <= i / steps < end (fractions of the schedule)."""
    return tuple(range(int(round(start * steps)), int(round(end * steps))))


def anomaly_tokens(tokenizer: Any, template: str, category: str, defect_type: str) -> tuple[int, ...]:
    """Token columns of the rendered prompt from ``{defect_type}`` to its end (BOS is column 0)."""
    dt = defect_type.replace("_", " ")
    full = tokenizer(template.format(category=category, defect_type=dt), add_special_tokens=False).input_ids
    if "{defect_type}" in template:
        prefix = template.split("{defect_type}")[0].format(category=category).strip()
        first = len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0
    else:
        first = 0
    last = min(len(full), tokenizer.model_max_length - 2)  # truncation keeps BOS + 75 tokens + EOS
    return tuple(range(1 + first, 1 + last))


class SourceKV(AttentionController):
    """The toolkit's controller plus a K/V store across steps: ``record=True`` keeps every K/V the graft sources
    compute; ``sources`` are stores of earlier runs served at each step as if the source branches had just run."""

    def __init__(self, unet: Any, rules: Sequence[Any] = (), record: bool = False, sources: Sequence[KV] = ()):
        super().__init__(unet, rules)
        self.record = record
        self.store: KV = {}
        self.sources = list(sources)

    def set_step(self, step: int, t: int | None = None) -> None:
        super().set_step(step, t)
        for src in self.sources:
            for (layer, branch), (k, v) in src.get(self.step, {}).items():
                super().store_kv(layer, branch, k, v)

    def store_kv(self, layer: str, branch: str, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.record:  # contiguous copies: a slice of a batched call would pin the whole batch's tensor
            k, v = k.contiguous(), v.contiguous()
            self.store.setdefault(self.step, {})[(layer, branch)] = (k, v)
        super().store_kv(layer, branch, k, v)


@dataclass
class SourceRun:
    """One source branch inverted and reconstructed, with its K/V at the graft layers and steps."""

    name: str
    zT: torch.Tensor
    z0: torch.Tensor  # its DDIM reconstruction
    kv: KV = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors = [t for layers in self.kv.values() for kv in layers.values() for t in kv] + [self.zT, self.z0]
        return sum(t.numel() * t.element_size() for t in tensors)


_EVERYWHERE = np.ones((1, 1), dtype=bool)  # covers every cell of any layer grid


def _graft(s: TriAGSettings, target_masks: Any, ref_mask: np.ndarray) -> list[Graft]:
    if not s.grafting:
        return []
    if not s.triag_masks:  # ablation: every query reads the whole reference, nothing from the normal branch
        return [Graft(target=TARGET, reference=REF, normal=None, target_mask=_EVERYWHERE, reference_mask=_EVERYWHERE,
                      layers=s.graft_layers, steps=s.graft_steps)]
    return [Graft(target=TARGET, reference=REF, normal=NORMAL, target_mask=target_masks, reference_mask=ref_mask,
                  layers=s.graft_layers, steps=s.graft_steps)]


def _in_groups(groups: Sequence[str], info: Any) -> bool:
    return info.name in groups or info.place in groups


def _target_rules(s: TriAGSettings, target_masks: np.ndarray, ref_mask: np.ndarray) -> list[Any]:
    rules: list[Any] = _graft(s, target_masks, ref_mask)
    if s.dae_factor != 1.0 and s.dae_steps:
        if s.dae_cross and s.tokens:
            rules.append(Reweight(s.dae_factor, kind="cross", tokens=s.tokens, query_mask=target_masks,
                                  branches=[TARGET], steps=s.dae_steps))
        if s.dae_self:  # re-weighting toward M_T on the self-attention layers where the target reads its own keys
            own = dict(kind="self", query_mask=target_masks, key_mask=target_masks, renormalize=True,
                       branches=[TARGET])
            grafted = s.graft_layers if s.grafting else ()
            rules.append(Reweight(s.dae_factor, layers=lambda info: not _in_groups(grafted, info),
                                  steps=s.dae_steps, **own))
            idle = tuple(i for i in s.dae_steps if i not in s.graft_steps)  # graft layers outside the graft window
            if grafted and idle:
                rules.append(Reweight(s.dae_factor, layers=grafted, steps=idle, **own))
    if s.attention_res and s.tokens:
        rules.append(Capture(kind="cross", branches=[TARGET], resolutions=[s.attention_res], tokens=s.tokens))
    return rules


def _runner(backbone: Any, ctrl: AttentionController) -> BranchRunner:
    """Each branch its own UNet call in every mode: the source branches are distinct no-op adapter states, so
    batched mode cannot merge them with the targets (module doc: bit-identical cached and uncached paths)."""
    return BranchRunner(backbone, "batched", controller=ctrl, adapters={REF: AdapterState(), NORMAL: AdapterState()})


def run_source(backbone: Any, name: str, z0: torch.Tensor, cond: torch.Tensor, s: TriAGSettings,
               ref_mask: np.ndarray) -> SourceRun:
    """Invert ``z0`` and reconstruct it as branch ``name``, recording its graft-layer K/V at every graft step."""
    inv = invert(backbone, z0, cond, s.steps, progress=f"o2mag invert {name}")
    # the graft rule only marks which layers/steps to record; its target never runs here
    ctrl = SourceKV(backbone.unet, _graft(s, np.zeros((1, 1), bool), ref_mask), record=True)
    with ctrl:
        z = sample(backbone, {name: inv.zT}, [Branch(name, cond, name)], single(name, name), s.steps,
                   runner=_runner(backbone, ctrl), progress=f"o2mag {name} branch")
    return SourceRun(name, inv.zT, z[name], ctrl.store)


@dataclass
class TargetOutput:
    z0: torch.Tensor  # (n, C, h, w) target latents
    attention: torch.Tensor | None  # (n, r, r) float32 in [0, 1] at attention_res, or None
    normal_z0: torch.Tensor  # (1, C, h, w) the normal branch's reconstruction


def _attention(ctrl: AttentionController, s: TriAGSettings) -> torch.Tensor | None:
    if not (s.attention_res and s.tokens):
        return None
    a = ctrl.maps("cross", TARGET, resolution=s.attention_res).sum(-1).float()  # (n, r, r)
    peak = a.flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    return (a / peak[:, None, None]).clamp(0, 1).cpu()


class BranchCache:
    """Source runs shared across the jobs of one ``synthesize`` call: the last reference's branch and the current
    (reference, normal) pair's normal branch. ``runs`` counts source inversions+reconstructions (tests/bench)."""

    def __init__(self) -> None:
        self.ref: tuple[tuple, SourceRun] | None = None
        self.normal: tuple[tuple, SourceRun] | None = None
        self.runs = 0
        self.peak_bytes = 0

    def get(self, slot: str, key: tuple, make) -> SourceRun:
        held = getattr(self, slot)
        if held is None or held[0] != key:
            setattr(self, slot, None)  # free the old run before computing the new one
            held = (key, make())
            setattr(self, slot, held)
            self.runs += 1
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return held[1]

    @property
    def nbytes(self) -> int:
        return sum(h[1].nbytes for h in (self.ref, self.normal) if h is not None)


def run_targets(backbone: Any, cond: torch.Tensor, ref: tuple[np.ndarray, np.ndarray, torch.Tensor],
                normal: tuple[np.ndarray, torch.Tensor], target_masks: np.ndarray, s: TriAGSettings,
                cache: BranchCache | None = None) -> TargetOutput:
    """TriAG + DAE for n target masks (n, H, W) of one (reference, normal) pair.

    ``ref`` = (reference image, reference mask M_R, its latent), ``normal`` = (normal image, its latent);
    ``cond`` = e* (1, 77, D). With ``s.cache`` a ``cache`` keeps the source runs (a private one if None)."""
    ref_img, ref_mask, z_ref = ref
    normal_img, z_normal = normal
    if not ref_mask.any():
        raise ValueError("O2MAG: the reference mask M_R is empty; TriAG would graft from no key")
    masks = np.asarray(target_masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"target masks must be (n, H, W), got {masks.shape}")
    outs, atts, normal_z0 = [], [], None
    if s.cache:
        cache = cache or BranchCache()
        # a caller's cache may outlive one configuration: key on everything a source run reads
        run_key = (backbone.model_id, s.steps, s.graft_layers, s.graft_steps, s.triag_masks, _tensor_key(cond))
        ref_key = ("ref", image_key(ref_img), image_key(ref_mask.astype(np.uint8)), _tensor_key(z_ref), run_key)
        ref_run = cache.get("ref", ref_key, lambda: run_source(backbone, REF, z_ref, cond, s, ref_mask))
        normal_run = cache.get("normal", ("normal", image_key(normal_img), _tensor_key(z_normal), run_key),
                               lambda: run_source(backbone, NORMAL, z_normal, cond, s, ref_mask))
        normal_z0 = normal_run.z0
    for i in range(0, masks.shape[0], s.target_batch):
        batch = masks[i:i + s.target_batch]
        rules = _target_rules(s, batch, ref_mask)
        if s.cache:
            ctrl = SourceKV(backbone.unet, rules, sources=[ref_run.kv, normal_run.kv])
            latents = {TARGET: normal_run.zT.repeat(len(batch), 1, 1, 1)}
            branches = [Branch(TARGET, cond, TARGET)]
        else:
            inv_r = invert(backbone, z_ref, cond, s.steps, progress="o2mag invert ref")
            inv_n = invert(backbone, z_normal, cond, s.steps, progress="o2mag invert normal")
            ctrl = SourceKV(backbone.unet, rules)
            latents = {REF: inv_r.zT, NORMAL: inv_n.zT, TARGET: inv_n.zT.repeat(len(batch), 1, 1, 1)}
            branches = [Branch(REF, cond, REF, adapter=REF), Branch(NORMAL, cond, NORMAL, adapter=NORMAL),
                        Branch(TARGET, cond, TARGET)]

        def guidance(eps, _state):
            return {b.name: eps[b.name] for b in branches}

        with ctrl:
            z = sample(backbone, latents, branches, guidance, s.steps,
                       runner=_runner(backbone, ctrl), progress="o2mag targets")
        outs.append(z[TARGET])
        atts.append(_attention(ctrl, s))
        if normal_z0 is None:
            normal_z0 = z[NORMAL]
    attention = None if atts[0] is None else torch.cat(atts)
    return TargetOutput(torch.cat(outs), attention, normal_z0)


def _tensor_key(x: torch.Tensor) -> str:
    return image_key(x.detach().float().cpu().numpy())


def resize_map(a: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(r, r) map -> float32 HxW in [0, 1], bilinear."""
    up = F.interpolate(a[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    return up.clamp(0, 1).numpy().astype(np.float32)


def generated_region(mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """Pixels of the latent cells the mask touches (rule "any"), plus the mask itself."""
    cells = latent_mask(mask, latent_hw, rule="any").float()
    up = F.interpolate(cells, size=mask.shape, mode="nearest")[0, 0].bool().numpy()
    return up | mask
