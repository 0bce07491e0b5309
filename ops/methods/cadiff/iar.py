"""CADiff synthesis: generation on a normal image at a target mask with Intensity-controllable Attention
Re-weighting (IAR: masked focus attention + delayed focus scheduler, the CADiff paper's eq. 11).

    (A_t^&)' = w·‖M^&‖₁·A_t^&   if α_t = n_t / n_start > α_thr,   A_t^& otherwise

Built on the toolkit: ``attention.Reweight`` (the anomaly token's column, query rows inside the mask = MFA) whose
``steps`` selector is ``attention.DelayedFocus`` (DFS: α_t from the token's 16×16 map at the previous step,
latched once above α_thr), DDIM sampling with classifier-free guidance, ``blend.LatentBlend`` for the
background, and the SSC (``ssc.ControlledUNet``) conditioned on the target mask.

Choices where the paper is vague:
- ‖M‖₁ normalisation: taken literally, ‖M‖₁ is the mask's pixel count (tens to thousands), which would multiply
  the probabilities far beyond 1 and make w = 1 change the image, whereas the paper's Fig. 3 / Tab. 4 treat
  w = 1 as the un-weighted generation. We normalise M to unit L1 norm over its own support (M̂ = M / ‖M‖₁ on the
  mask's cells, ‖M̂‖₁ = 1), so the factor on the masked rows is exactly w, and M enters as MFA's restriction of
  the re-weighting to the mask's rows. The raw ‖M‖₁ at the attention grid is recorded per image (``mask_l1``).
  Probabilities are scaled without renormalisation (prompt-to-prompt's re-weighting, which the paper cites).
- w ~ U[w_min, w_max] per image from the job's seed (default [0.5, 1.5], the paper's best setting); recorded.
- Re-weighting acts on the text-conditioned branch of CFG only (the unconditional prompt has no anomaly token),
  at every cross-attention layer; DFS reads the token's map at ``attention_res`` (16, as in the paper).
- Background (the paper generates on normal images with identical masks as AnomalyDiffusion, which keeps the
  normal image outside the mask by latent blending): the normal image's latent is forward-noised with the job's
  noise ε to every DDIM level (one ε, ``blend.forward_noised``); sampling starts from its noisiest level and after
  every step the latent outside the mask (latent cells the mask touches are generated) is replaced by the normal
  trajectory, so it equals the normal latent at the end. ``background="normal"`` (default) then pastes the
  decoded pixels onto the original normal image only on those latent cells (the rest is the normal image to the
  bit; the VAE's reconstruction error does not leak in); ``"generated"`` keeps the whole decoded image.
- Own mask: the target (control) mask refined by the anomaly token's attention: the token's map averaged over
  steps and the layers at ``attention_res``, divided by its maximum, resized to the image, then eq. 13 of the
  bg-disentangle paper (``ops.masks.refine.attention_mask``: m' ⊙ A ≥ threshold); the target when that is empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ops.diffusion.attention import AttentionController, DelayedFocus, Reweight
from ops.diffusion.attn_mask import peak_normalise
from ops.diffusion.blend import LatentBlend, forward_noised, latent_mask
from ops.diffusion.branches import BranchRunner
from ops.diffusion.ddim import cfg_branches, ddim_grid, sample
from ops.diffusion.vae import decode, encode
from ops.masks.refine import attention_mask

TEXT = "text"


@dataclass(frozen=True)
class IARSettings:
    steps: int = 12
    guidance: float = 5.0
    w: float = 1.0
    alpha_thr: float = 0.75
    attention_res: int = 16
    mfa: bool = True  # re-weight only inside the mask (False: every query row; the paper's "w/o MFA" ablation)
    dfs: bool = True  # wait for α_t > α_thr (False: every step; the "w/o DFS" ablation)
    background: str = "normal"
    refine_threshold: float = 0.5


@dataclass
class IARResult:
    image: np.ndarray
    mask: np.ndarray
    attention: np.ndarray
    latent: torch.Tensor
    params: dict[str, Any] = field(default_factory=dict)


def draw_w(seed: int, w_min: float, w_max: float) -> float:
    """The image's intensity factor, from its seed alone (reproducible per job)."""
    return float(np.random.default_rng([int(seed), 0xCAD1FF]).uniform(w_min, w_max)) if w_max > w_min else float(w_min)


def mask_l1(mask: np.ndarray, res: int) -> int:
    """‖M‖₁ of the mask on the res×res attention grid (majority rule), as recorded per image."""
    return int(latent_mask(mask, (res, res), rule="majority").sum())


def iar_rules(mask: np.ndarray, token: int, s: IARSettings) -> tuple[DelayedFocus, Reweight]:
    """DFS (which also captures the token's map for the own mask) and the MFA re-weighting it schedules.

    With ``dfs=False`` the focus rule still captures the map but the re-weighting runs at every step."""
    focus = DelayedFocus(mask=mask, token=token, branch=TEXT, threshold=s.alpha_thr, resolution=s.attention_res)
    # eq. 11 with ‖M̂‖₁ = 1 (module doc): the factor on the masked rows is w
    rule = Reweight(factor=s.w, kind="cross", tokens=[token], query_mask=mask if s.mfa else None, branches=[TEXT],
                    steps=focus if s.dfs else None)
    return focus, rule


def initial_noise(backbone: Any, seed: int) -> torch.Tensor:
    h = backbone.latent_size
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, backbone.unet.config.in_channels, h, h), generator=g).to(backbone.device)


def control_image(mask: np.ndarray, resolution: int, device: Any) -> torch.Tensor:
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    return F.interpolate(m, size=(resolution, resolution), mode="nearest").to(device)


def generate(backbone: Any, cond: torch.Tensor, uncond: torch.Tensor, token: int, normal: np.ndarray,
             mask: np.ndarray, seed: int, s: IARSettings, ssc: Any = None) -> IARResult:
    """One image: IAR sampling on ``normal`` (uint8 HxWx3) at ``mask`` (bool HxW), seeded."""
    from ops.methods.cadiff.ssc import ControlledUNet

    if mask.shape != normal.shape[:2] or not mask.any():
        raise ValueError("CADiff generation needs a non-empty bool target mask of the normal image's size")
    size = normal.shape[:2]
    unet = backbone.unet
    controller = AttentionController(unet)
    focus, rule = iar_rules(mask, token, s)
    controller.add(focus)
    controller.add(rule)
    view = backbone if ssc is None else replace(backbone, unet=ControlledUNet(
        unet, ssc, control_image(mask, backbone.resolution, backbone.device)))
    runner = BranchRunner(view, controller=controller)
    grid = ddim_grid(backbone.scheduler, s.steps)
    z0 = encode(backbone, normal).float()
    traj = forward_noised(grid, z0, initial_noise(backbone, seed))
    m_lat = latent_mask(mask, tuple(z0.shape[-2:]), rule="any").to(z0.device)
    blend = LatentBlend(m_lat, traj)
    branches, guidance = cfg_branches(cond, uncond, s.guidance)
    with controller:
        z = sample(view, traj[grid.num_steps], branches, guidance, num_steps=s.steps, runner=runner,
                   callbacks=[blend], progress="CADiff sampling")["x"]
        try:
            attn = controller.maps("cross", TEXT, s.attention_res, name=focus.capture_name)[0, ..., 0]
        except KeyError:
            grids = sorted({hw[0] for hw in controller.layer_hw.values()})
            raise ValueError(f"CADiff attention_res={s.attention_res}: the UNet of {backbone.model_id!r} has no "
                             f"cross-attention at that grid for {backbone.resolution} px images (grids seen: "
                             f"{grids}); set attention_res to one of them") from None
    image = decode(backbone, z, size=size)[0]
    if s.background == "normal":
        region = F.interpolate(m_lat.float(), size=size, mode="nearest")[0, 0].cpu().numpy() > 0
        image = np.where((region | mask)[..., None], image, normal)
    a = attn.float().cpu()
    up = F.interpolate(a[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    up = peak_normalise(up, mask)  # a peak outside the mask must not push every cell inside below the threshold
    refined = attention_mask(up, mask, s.refine_threshold)
    if refined.any():
        own, kind = refined, "target refined by attention"
    else:
        own, kind = mask.copy(), "target (refinement empty)"
    params = {"w": s.w, "mask_l1": mask_l1(mask, s.attention_res), "alpha_thr": s.alpha_thr, "mfa": s.mfa,
              "dfs": s.dfs, "dfs_on_step": focus.on_since if s.dfs else 0,
              "alpha": [round(x, 4) for x in focus.history], "mask": kind}
    return IARResult(image=np.ascontiguousarray(image), mask=own, attention=up.astype(np.float32), latent=z,
                     params=params)
