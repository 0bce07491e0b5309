"""Several UNet branches per denoising step, as ONE batched call or as sequential calls (identical results).

A :class:`Branch` is one noise prediction needed at a step: which latent stream it reads (``latent``), which
conditioning (``cond``), and which adapter state (``adapter``: a key into the runner's ``adapters``; None =
the UNet exactly as loaded). Examples: classifier-free guidance = branches ("uncond", ∅) + ("text", c) on one
latent; APO = ("ref_u", ∅, adapter "off") + ("ref_c", c, "off") + ("theta_c", c, None); O2MAG = reference /
normal / target branches on three latents with attention grafting between them.

Choices:
- ``mode="batched"`` concatenates the branches that share an adapter state into one UNet call (adapter states
  differ by weights, so different states are always separate calls here; a method that needs mixed LoRA states in
  one call gates the LoRA per sample with ``ops.diffusion.lora.lora_gates``, as APO's hierarchical step does).
  ``mode="sequential"`` runs one call per branch. ``"auto"`` =
  batched on every device: bench/bench_toolkit.py measured, on this 2-core CPU with the tiny backbone (latent 32),
  a batch of 3 at 0.62x the time of three batch-1 calls with torch's default threads on an idle machine (0.75x
  at 1 thread; 0.67x with TriAG grafting + capture active), at 2.2-2.9x the peak activation memory (a few MiB
  here). The task brief had measured 1.1-1.4x on another small UNet; we follow our own measurement and keep the
  bench to re-check it. On CUDA batching is the standard way to fill the device. Pass mode="sequential" where
  memory is the limit (large models, many branches); results agree to float rounding (atol 1e-5 in the tests).
- Branch order: the attention controller (ops/diffusion/attention.py) may need some branches' self-attention
  keys/values before others (grafting sources); the runner runs/places those first in both modes, and tells the
  controller the batch layout (branch name, batch size) before every call, so per-branch control is the same
  whether a branch shares the batch or not.
- Adapter states are objects with ``context(unet)`` (a context manager) and ``unet_kwargs`` (extra UNet call
  arguments, e.g. diffusers' per-call LoRA scale ``cross_attention_kwargs={"scale": s}``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch

MODES = ("auto", "batched", "sequential")


@dataclass(frozen=True)
class Branch:
    name: str
    cond: torch.Tensor  # (1 or B, L, D) encoder hidden states
    latent: str = "x"  # latent stream this branch reads
    adapter: str | None = None  # key into BranchRunner.adapters; None = the UNet as it is


@dataclass
class AdapterState:
    """How to run the UNet for one adapter state."""

    context: Callable[[Any], ContextManager] = field(default=lambda unet: contextlib.nullcontext())
    unet_kwargs: dict[str, Any] = field(default_factory=dict)


def lora_scale(scale: float) -> AdapterState:
    """LoRA layers (diffusers/peft) scaled by ``scale`` for this call; 0 gives the base model's output exactly."""
    return AdapterState(unet_kwargs={"cross_attention_kwargs": {"scale": float(scale)}})


def adapters_disabled() -> AdapterState:
    """All peft adapters of the UNet switched off for the call (the reference model ε_ref)."""

    @contextlib.contextmanager
    def ctx(unet: Any) -> Iterator[None]:
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()

    return AdapterState(context=ctx)


def resolve_mode(mode: str, device: torch.device | str = "cpu") -> str:
    if mode not in MODES:
        raise ValueError(f"unknown branch mode {mode!r}; use one of {MODES}")
    if mode == "auto":
        return "batched"
    return mode


class BranchRunner:
    """Computes ε for a set of branches at one timestep. ``controller``: an AttentionController or None."""

    def __init__(self, backbone: Any, mode: str = "auto", controller: Any = None,
                 adapters: Mapping[str, AdapterState] | None = None):
        self.backbone = backbone
        self.mode = resolve_mode(mode, backbone.device)
        self.controller = controller
        self.adapters = dict(adapters or {})
        self.calls = 0  # UNet forward calls made (for tests and benchmarks)

    def _state(self, key: str | None) -> AdapterState:
        if key is None:
            return AdapterState()
        if key not in self.adapters:
            raise KeyError(f"branch adapter {key!r} is not among the runner's adapters {sorted(self.adapters)}")
        return self.adapters[key]

    def _ordered(self, branches: Sequence[Branch]) -> list[Branch]:
        first = set(self.controller.source_branches()) if self.controller is not None else set()
        return sorted(branches, key=lambda b: b.name not in first)  # stable: sources first, else given order

    def _groups(self, branches: list[Branch]) -> list[list[Branch]]:
        if self.mode == "sequential":
            return [[b] for b in branches]
        groups: dict[str | None, list[Branch]] = {}
        for b in branches:
            groups.setdefault(b.adapter, []).append(b)
        # a group holding sources runs first (dict keeps first-seen order, sources are first in ``branches``)
        return list(groups.values())

    def __call__(self, latents: Mapping[str, torch.Tensor], t: int | torch.Tensor,
                 branches: Sequence[Branch]) -> dict[str, torch.Tensor]:
        names = [b.name for b in branches]
        if len(set(names)) != len(names):
            raise ValueError(f"branch names must be unique, got {names}")
        missing = sorted({b.latent for b in branches} - set(latents))
        if missing:
            raise KeyError(f"branches read latent streams {missing} that were not given (have {sorted(latents)})")
        unet = self.backbone.unet
        out: dict[str, torch.Tensor] = {}
        for group in self._groups(self._ordered(branches)):
            zs = [latents[b.latent] for b in group]
            sizes = [z.shape[0] for z in zs]
            conds = [b.cond if b.cond.shape[0] == n else b.cond.expand(n, *b.cond.shape[1:])
                     for b, n in zip(group, sizes)]
            z = torch.cat(zs) if len(zs) > 1 else zs[0]
            c = torch.cat(conds) if len(conds) > 1 else conds[0]
            state = self._state(group[0].adapter)
            if self.controller is not None:
                self.controller.begin_call([(b.name, n) for b, n in zip(group, sizes)], tuple(z.shape[-2:]))
            with state.context(unet):
                eps = unet(z.to(self.backbone.dtype), t, encoder_hidden_states=c.to(self.backbone.dtype),
                           **state.unet_kwargs).sample
            self.calls += 1
            for b, part in zip(group, eps.split(sizes)):
                out[b.name] = part
        return {n: out[n] for n in names}
