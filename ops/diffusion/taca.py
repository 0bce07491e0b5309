"""TACA, APO's time-aware capacity allocation: the LoRA update at timestep t is ΔW_t = B·G_t·A with
G_t = diag(1 for the first k(t) rank dimensions, 0 after) and

    k(t) = floor(k_min + (k_max − k_min) · (T − t) / T)

so high-noise steps (t → T) use few rank dimensions (structure stays diverse) and low-noise steps (t → 0) use
up to k_max (fine anomaly detail).

Choices where the paper is vague:
- G_t acts on the LoRA hidden activation A·x (shape [..., r]) before B, per sample with each sample's own t,
  through the per-sample gate hook of ``ops.diffusion.lora.lora_gates``. Dimensions at or above k(t) get
  exactly zero output and zero gradient (for A's rows and B's columns) from that sample. The same gate is
  applied when sampling, so an adapter trained with TACA must be sampled inside ``taca_context`` too; the saved
  file is a plain diffusers LoRA (record k_min, k_max and T beside it).
- "First k(t) dimensions" means rank indices 0..k(t)−1 in peft's A/B layout, so low indices are trained at
  every timestep and carry the shared structure, high indices only near t = 0.
- T is the scheduler's ``num_train_timesteps`` (1000 for SD), so t ∈ [0, T−1] in practice and k(T−1) is
  k_min whenever k_max − k_min < T. t outside [0, T] is an error.
- k_min may be 0 (the adapter is fully off at the noisiest steps); k_max may not exceed the LoRA rank.
- The floor is taken in float64, which is exact here: a non-integer quotient (k_max−k_min)(T−t)/T lies at
  least 1/T away from an integer, far more than float64's rounding error.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from ops.diffusion.lora import lora_gates, lora_ranks


def check_schedule(k_min: int, k_max: int, T: int, rank: int | None = None) -> None:
    if T < 1:
        raise ValueError(f"TACA: T (the scheduler's num_train_timesteps) must be >= 1, got {T}")
    if not 0 <= k_min <= k_max:
        raise ValueError(f"TACA: need 0 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if rank is not None and k_max > rank:
        raise ValueError(f"TACA: k_max={k_max} exceeds the LoRA rank {rank}; raise the rank or lower k_max")


def active_rank(timesteps: torch.Tensor | Sequence[float] | int, k_min: int, k_max: int, T: int) -> torch.Tensor:
    """k(t) for each timestep, as int64 (same shape as ``timesteps``)."""
    check_schedule(k_min, k_max, T)
    t = torch.as_tensor(timesteps).detach().to("cpu", torch.float64)
    if bool(((t < 0) | (t > T)).any()):
        raise ValueError(f"TACA: timesteps must lie in [0, T={T}], got min {t.min().item()}, max {t.max().item()}")
    return (k_min + torch.floor((k_max - k_min) * (T - t) / T)).long()


@contextmanager
def taca_context(unet: nn.Module, timesteps: torch.Tensor | Sequence[float], k_min: int, k_max: int,
                 T: int) -> Iterator[nn.Module]:
    """Gate the UNet's LoRA to k(t_b) rank dimensions for each sample b of the UNet calls inside the block."""
    check_schedule(k_min, k_max, T, rank=min(lora_ranks(unet)))
    k = active_rank(torch.as_tensor(timesteps).flatten(), k_min, k_max, T)
    with lora_gates(unet, rank_k=k):
        yield unet
