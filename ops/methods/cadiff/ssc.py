"""CADiff's Self-adaptive Spatial Control (SSC): a mask-conditioned ControlNet whose residuals enter the frozen
UNet through SAIM blocks (the CADiff paper, eq. 9-10).

    y_a = CrossAttn(RMSNorm(y), RMSNorm(y_c))          y_f = concat(y, y + MLP(y_a))

y = a skip feature of the locked UNet (or the mid block's output), y_c = the ControlNet's residual for it (the
output of its zero convolution). The plain ControlNet adds y_c to y; SAIM lets every position of y query the
control features (queries from y, keys/values from y_c) and adds MLP(y_a) instead.

Choices where the paper is vague:
- The ControlNet is diffusers' ``ControlNetModel.from_unet(unet, conditioning_channels=1, ...)``: its encoder
  and mid block copy the UNet's weights, its zero convolutions start at 0. The condition is the binary anomaly
  mask at the backbone's pixel resolution (1 channel, {0, 1}); the conditioning embedding has one stride-2 conv
  per factor 2 of the VAE (``embedding_channels``: (16, 32, 96, 256) for SD's x8, (16, 32, 96) for x4) so its
  output lands on the latent grid. Its random layers are drawn under ``torch.random.fork_rng`` from ``seed``.
- Eq. 10's concat is the UNet decoder's own skip concatenation: SAIM replaces the skip y by y + MLP(y_a) and the
  up block concatenates it with its upsampled features (a literal 2C-channel concat would change the frozen
  decoder's input widths, which no pretrained UNet accepts). For the mid block (no concat in the UNet) the output
  is y + MLP(y_a) as well. Implemented with forward (pre-)hooks on the UNet's up blocks and mid block that live
  only during one call (:meth:`SSC.fused`), so the UNet module itself is never changed or saved.
- Zero init: the MLP's last layer is zero (weights and bias), so at init y_f = y exactly and, with the
  ControlNet's zero convolutions, the UNet's output is bit-identical to the plain UNet's. RMSNorm eps is
  1e-5 (RMSNorm(0) = 0 at init; a tiny eps would make its gradient there huge).
- CrossAttn: multi-head scaled dot-product attention over the h·w positions, ``max(1, C // head_dim)`` heads of
  ``head_dim`` = 64 channels (SD's head size), q/k/v/out projections with bias. MLP: Linear(C, r·C) → GELU →
  Linear(r·C, C) with r = ``mlp_ratio`` (1 by default: 12 SAIM blocks at up to 1280 channels already add
  ~6·C² parameters each on SD 1.5).
- Files: ``<dir>/controlnet/`` (``ControlNetModel.save_pretrained``; ``ControlNetModel.from_pretrained`` reads it)
  and ``<dir>/saim.safetensors`` + ``<dir>/saim.json`` (channels, heads, mlp_ratio, eps), written atomically.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ops.atomic import write_bytes_atomic

HEAD_DIM = 64
RMS_EPS = 1e-5
SAIM_WEIGHTS = "saim.safetensors"
SAIM_CONFIG = "saim.json"
CONTROLNET_DIR = "controlnet"


class SAIM(nn.Module):
    """One self-adaptive interaction block: (y, y_c) (B, C, h, w) -> y + MLP(CrossAttn(RMSNorm(y), RMSNorm(y_c)))."""

    def __init__(self, channels: int, heads: int | None = None, mlp_ratio: float = 1.0, eps: float = RMS_EPS):
        super().__init__()
        self.channels = int(channels)
        self.heads = int(heads or max(1, channels // HEAD_DIM))
        if self.channels % self.heads:
            raise ValueError(f"SAIM: {channels} channels do not split into {self.heads} heads")
        hidden = max(1, int(round(channels * mlp_ratio)))
        self.norm_y = nn.RMSNorm(channels, eps=eps)
        self.norm_c = nn.RMSNorm(channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def attend(self, y: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
        """y_a (B, h·w, C) of eq. 9."""
        b, c, h, w = y.shape
        t = y.flatten(2).transpose(1, 2)
        tc = y_c.flatten(2).transpose(1, 2)
        q, kc = self.norm_y(t), self.norm_c(tc)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, self.heads, c // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.to_q(q)), split(self.to_k(kc)), split(self.to_v(kc)))
        return self.to_out(a.transpose(1, 2).reshape(b, h * w, c))

    def forward(self, y: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
        if y.shape != y_c.shape:
            raise ValueError(f"SAIM: UNet feature {tuple(y.shape)} and control residual {tuple(y_c.shape)} differ")
        dtype = y.dtype
        y32, yc32 = y.float(), y_c.float()
        b, c, h, w = y.shape
        fused = y32.flatten(2).transpose(1, 2) + self.mlp(self.attend(y32, yc32))
        return fused.transpose(1, 2).reshape(b, c, h, w).to(dtype)


def embedding_channels(vae_factor: int) -> tuple[int, ...]:
    """Conditioning-embedding widths with log2(vae_factor) stride-2 convs (diffusers' SD default for x8)."""
    widths = (16, 32, 96, 256, 512)
    n = int(vae_factor).bit_length() - 1
    if 2 ** n != vae_factor or not 0 <= n < len(widths):
        raise ValueError(f"VAE factor {vae_factor} is not a power of two in [1, 16]")
    return widths[:n + 1]


class SSC(nn.Module):
    """ControlNet + one SAIM per ControlNet residual (down residuals in UNet skip order, then mid)."""

    def __init__(self, controlnet: Any, saims: Sequence[SAIM]):
        super().__init__()
        self.controlnet = controlnet
        self.saims = nn.ModuleList(saims)
        n_down = len(controlnet.controlnet_down_blocks)
        if len(self.saims) != n_down + 1:
            raise ValueError(f"SSC: {len(self.saims)} SAIM blocks for {n_down} down residuals + 1 mid")

    @classmethod
    def from_unet(cls, unet: Any, vae_factor: int, seed: int = 0, mlp_ratio: float = 1.0) -> "SSC":
        from diffusers import ControlNetModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            cn = ControlNetModel.from_unet(unet, conditioning_channels=1,
                                           conditioning_embedding_out_channels=embedding_channels(vae_factor))
            channels = [b.out_channels for b in cn.controlnet_down_blocks] + [cn.controlnet_mid_block.out_channels]
            saims = [SAIM(c, mlp_ratio=mlp_ratio) for c in channels]
        ssc = cls(cn, saims)
        return ssc.to(unet.device)

    def config(self) -> dict[str, Any]:
        return {"channels": [s.channels for s in self.saims], "heads": [s.heads for s in self.saims],
                "hidden": [s.mlp[0].out_features for s in self.saims], "eps": self.saims[0].norm_y.eps}

    def residuals(self, sample: torch.Tensor, timestep: Any, cond: torch.Tensor,
                  control: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The ControlNet's zero-conv outputs y_c: (down residuals, mid residual)."""
        dtype = self.controlnet.dtype
        if control.shape[0] != sample.shape[0]:
            control = control.expand(sample.shape[0], *control.shape[1:])
        down, mid = self.controlnet(sample.to(dtype), timestep, encoder_hidden_states=cond.to(dtype),
                                    controlnet_cond=control.to(sample.device, dtype), return_dict=False)
        return tuple(down), mid

    @contextmanager
    def fused(self, unet: Any, down: Sequence[torch.Tensor], mid: torch.Tensor) -> Iterator[None]:
        """While active, the UNet's skips and mid output pass through the SAIM blocks with these residuals."""
        handles = []
        end = len(down)
        try:
            for block in unet.up_blocks:
                n = len(block.resnets)
                idx = list(range(end - n, end))
                end -= n

                def pre(_module: Any, args: tuple, kwargs: dict, idx: list[int] = idx) -> tuple[tuple, dict]:
                    skips = kwargs["res_hidden_states_tuple"]
                    fused = tuple(self.saims[i](y, down[i]) for i, y in zip(idx, skips))
                    return args, {**kwargs, "res_hidden_states_tuple": fused}

                handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            if end != 0:
                raise ValueError(f"SSC: the UNet's up blocks consume {len(down) - end} skips but the ControlNet "
                                 f"gives {len(down)} residuals; the ControlNet was built for another UNet")
            handles.append(unet.mid_block.register_forward_hook(lambda _m, _a, out: self.saims[-1](out, mid)))
            yield
        finally:
            for h in handles:
                h.remove()

    def unet_forward(self, unet: Any, sample: torch.Tensor, timestep: Any, cond: torch.Tensor,
                     control: torch.Tensor, **kwargs: Any) -> Any:
        down, mid = self.residuals(sample, timestep, cond, control)
        with self.fused(unet, down, mid):
            return unet(sample, timestep, encoder_hidden_states=cond, **kwargs)

    def save(self, out_dir: Any) -> Path:
        from safetensors.torch import save

        out = Path(out_dir)
        self.controlnet.save_pretrained(str(out / CONTROLNET_DIR), safe_serialization=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.saims.state_dict().items()}
        write_bytes_atomic(out / SAIM_WEIGHTS, save(state, metadata={"format": "pt"}))
        write_bytes_atomic(out / SAIM_CONFIG, json.dumps(self.config(), indent=1).encode())
        return out

    @classmethod
    def load(cls, out_dir: Any, device: Any = "cpu") -> "SSC":
        from diffusers import ControlNetModel
        from safetensors.torch import load_file

        out = Path(out_dir)
        for need in (out / CONTROLNET_DIR / "config.json", out / SAIM_WEIGHTS, out / SAIM_CONFIG):
            if not need.is_file():
                raise FileNotFoundError(f"{need}: missing file of a CADiff SSC adapter; rerun anomaly_adapters for "
                                        f"method 'cadiff'")
        cn = ControlNetModel.from_pretrained(str(out / CONTROLNET_DIR))
        cfg = json.loads((out / SAIM_CONFIG).read_text())
        saims = [SAIM(c, heads=h, mlp_ratio=hid / c, eps=cfg["eps"])
                 for c, h, hid in zip(cfg["channels"], cfg["heads"], cfg["hidden"])]
        ssc = cls(cn, saims)
        ssc.saims.load_state_dict(load_file(str(out / SAIM_WEIGHTS)), strict=True)
        return ssc.to(device).eval().requires_grad_(False)


class ControlledUNet:
    """Callable with the UNet's call signature that runs the SSC with a fixed control mask (for BranchRunner)."""

    def __init__(self, unet: Any, ssc: SSC, control: torch.Tensor):
        self.unet, self.ssc, self.control = unet, ssc, control

    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any):
        return self.ssc.unet_forward(self.unet, sample, timestep, encoder_hidden_states, self.control, **kwargs)

    def __getattr__(self, name: str) -> Any:  # config, dtype, device, attn_processors, ... of the real UNet
        return getattr(self.unet, name)
