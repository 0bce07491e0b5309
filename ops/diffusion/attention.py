"""Attention control on a diffusers UNet: capture, K/V grafting, re-weighting and token-region masking.

An :class:`AttentionController` replaces every attention processor of the UNet while it is entered (a context
manager; ``unet.set_attn_processor`` with a dict keyed by processor name, the originals restored on exit). It
holds rules; the processors apply the rules active at the current step/layer to each branch of the batch:

- :class:`Capture`: attention probabilities, mean over heads, per (branch, step, layer), only for the requested
  kind/layers/resolutions/tokens/steps; :meth:`AttentionController.maps` averages them.
- :class:`Graft` (O2MAG TriAG): the target branch keeps its Q; inside the target mask M_T it attends to the
  reference branch's self-attention K/V with keys outside the reference mask M_R masked out; outside M_T to the
  normal branch's K/V (or its own when ``normal`` is None); the two outputs are stitched by M_T.
- :class:`Reweight` (O2MAG DAE for self and cross attention; CADiff IAR with masked focus): probabilities of the
  chosen keys/tokens, on query rows inside ``query_mask``, multiplied by ``factor`` at the chosen steps.
  :class:`DelayedFocus` is CADiff's delayed focus scheduler for the ``steps`` of such a rule.
- :class:`TokenRegions` (bg_disentangle eq. 10-11): each query attends only to the token group of the region it
  lies in, softmax over that group: m' ⊙ softmax(QK_def^T)V_def + (1 − m') ⊙ softmax(QK_bg^T)V_bg.

Batched and sequential branch calls give the same results: the BranchRunner announces the batch layout (branch
names and sizes) before every UNet call (a batch that does not match the announced layout raises), the
processors split Q/K/V per branch, and grafting sources' K/V are stored per (step, layer) when computed, then
read by the target branch in the same or a later call of that step (the runner runs sources first).

Choices where papers are vague:
- Masks are pixel masks (bool HxW, or NxHxW per sample of a branch) resized to each layer's grid with the
  "majority" rule of ops/diffusion/blend.latent_mask (never empty for a non-empty mask).
- Re-weighting scales probabilities without renormalising (prompt-to-prompt's reweighting; CADiff eq. 11 scales
  A itself); ``renormalize=True`` divides each row by its new sum instead. CADiff eq. 11's factor
  "w·||M||_1·A" is read as "w·A on the masked rows" (masked focus attention).
- DelayedFocus decides step t from the maps captured at step t−1 (the decision must precede step t's UNet call)
  and latches: once α = n_t / n_start exceeds the threshold it stays on; n_t counts mask cells whose token
  attention exceeds the map's mean, on the mean of the captured layers at ``resolution``.
- Captured maps are the probabilities the layer actually used (after grafting/re-weighting/region masking).
- Layers without an active rule run the original processor (SDPA) unchanged; ``explicit=True`` forces the
  explicit softmax path everywhere (to check it equals the default). The explicit path computes softmax in
  float32.
- Step indices are those passed to ``set_step`` (sampling step i of ddim.sample, or inversion step k−1).
- Memory (issue 15): the explicit path runs over chunks of query rows whenever a branch's float32 score tensor
  (n, heads, Nq, Nk) would exceed ``chunk_bytes`` (default 256 MiB, or ``$ANOMALY_FORGE_ATTN_CHUNK_MB``); at
  SD's 64x64 self-attention with 8 targets that tensor is 4 GiB, so a 24 GB card would otherwise hold several.
  ``query_chunk`` = an int forces that many rows per chunk, None never chunks. Every rule acts per query row
  (re-weighting rows, graft stitching, region masks), so chunked results equal unchunked ones up to float
  rounding of the row-sliced matmuls (tests/test_attention_chunking.py). Captured probabilities are kept as the
  mean over heads (what Capture stores), built chunk by chunk, so no (heads, Nq, Nk) tensor is ever whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Sequence

import os

import numpy as np
import torch
import torch.nn.functional as F

from ops.diffusion.blend import latent_mask

CHUNK_BYTES = 256 * 2**20  # default budget of one branch's float32 score tensor before query chunking
StepSelect = Collection[int] | Callable[[int], bool] | None
LayerSelect = Collection[str] | Callable[["LayerInfo"], bool] | None


@dataclass(frozen=True)
class LayerInfo:
    name: str  # processor key, e.g. "up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor"
    place: str  # "down" | "mid" | "up"
    kind: str  # "self" | "cross"
    h: int = 0  # grid of the layer's queries, known at call time
    w: int = 0


def _step_on(sel: StepSelect, step: int) -> bool:
    if sel is None:
        return True
    if callable(sel):
        return bool(sel(step))
    return step in sel


def _layer_on(sel: LayerSelect, resolutions: Collection[int] | None, info: LayerInfo) -> bool:
    if resolutions is not None and info.h not in resolutions:
        return False
    if sel is None:
        return True
    if callable(sel):
        return bool(sel(info))
    return info.name in sel or info.place in sel


def _branch_on(sel: Collection[str] | None, branch: str) -> bool:
    return sel is None or branch in sel


@dataclass
class Capture:
    kind: str = "cross"
    branches: Collection[str] | None = None
    layers: LayerSelect = None
    resolutions: Collection[int] | None = None
    tokens: Sequence[int] | None = None  # cross only: keep these token columns (None = all 77)
    steps: StepSelect = None
    name: str = ""  # tells apart several captures of the same layers (read back with maps(name=...))


@dataclass
class Graft:
    target: str
    reference: str
    target_mask: Any
    reference_mask: Any
    normal: str | None = None  # None: outside M_T the target keeps its own K/V
    layers: LayerSelect = None
    resolutions: Collection[int] | None = None
    steps: StepSelect = None


@dataclass
class Reweight:
    factor: float | Callable[[int], float]
    kind: str = "cross"
    tokens: Sequence[int] | None = None  # cross: token columns to scale (None = all)
    query_mask: Any = None  # rows to scale (None = every query)
    key_mask: Any = None  # self: key columns to scale (None = every key)
    branches: Collection[str] | None = None
    layers: LayerSelect = None
    resolutions: Collection[int] | None = None
    steps: StepSelect = None
    renormalize: bool = False


@dataclass
class TokenRegions:
    regions: Sequence[tuple[Any, Sequence[int]]]  # (pixel mask or None = every query not yet covered, token ids)
    branches: Collection[str] | None = None
    layers: LayerSelect = None
    resolutions: Collection[int] | None = None
    steps: StepSelect = None


class AttentionController:
    """Installs controlled processors on ``unet`` inside ``with controller:``; rules via :meth:`add`."""

    def __init__(self, unet: Any, rules: Iterable[Any] = (), explicit: bool = False, store_device: Any = None,
                 query_chunk: int | str | None = "auto", chunk_bytes: int | None = None):
        from diffusers.models.attention_processor import Attention

        if not (query_chunk in ("auto", None) or (isinstance(query_chunk, int) and query_chunk >= 1)):
            raise ValueError(f"query_chunk must be 'auto', None or a positive int, got {query_chunk!r}")
        self.query_chunk = query_chunk
        env_mb = os.environ.get("ANOMALY_FORGE_ATTN_CHUNK_MB")
        self.chunk_bytes = int(chunk_bytes if chunk_bytes is not None
                               else float(env_mb) * 2**20 if env_mb else CHUNK_BYTES)
        self.unet = unet
        self.rules: list[Any] = []
        self.explicit = explicit
        self.store_device = store_device
        self.step = 0
        self.t: int | None = None
        self.layout: list[tuple[str, int]] = [("x", 0)]
        self.latent_hw: tuple[int, int] | None = None
        self.captured: dict[tuple[str, str, int, str, str], torch.Tensor] = {}  # (kind, branch, step, layer, name)
        self.layer_hw: dict[str, tuple[int, int]] = {}
        self._kv: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._mask_cache: dict[tuple[int, int, int], tuple[Any, torch.Tensor]] = {}
        self._originals: dict[str, Any] | None = None
        self.infos: dict[str, LayerInfo] = {}
        for name, mod in unet.named_modules():
            if isinstance(mod, Attention):
                place = "down" if name.startswith("down") else "up" if name.startswith("up") else "mid"
                key = f"{name}.processor"
                self.infos[key] = LayerInfo(key, place, "cross" if mod.is_cross_attention else "self")
        for r in rules:
            self.add(r)

    # -- rules and state ---------------------------------------------------------------------------------------
    def add(self, rule: Any) -> Any:
        if isinstance(rule, Graft) and rule.target in (rule.reference, rule.normal):
            raise ValueError(f"graft target {rule.target!r} cannot be its own reference/normal branch")
        if isinstance(rule, (Capture, Reweight)) and rule.kind not in ("self", "cross"):
            raise ValueError(f"rule kind must be 'self' or 'cross', got {rule.kind!r}")
        if isinstance(rule, TokenRegions) and any(len(tokens) == 0 for _, tokens in rule.regions):
            raise ValueError("every token region needs at least one token (a query cannot attend to nothing)")
        if isinstance(rule, DelayedFocus):
            rule.attach(self)
        self.rules.append(rule)
        return rule

    def source_branches(self) -> set[str]:
        out: set[str] = set()
        for r in self.rules:
            if isinstance(r, Graft):
                out.add(r.reference)
                if r.normal is not None:
                    out.add(r.normal)
        return out

    def set_step(self, step: int, t: int | None = None) -> None:
        self.step, self.t = int(step), t
        self._kv.clear()

    def begin_call(self, layout: Sequence[tuple[str, int]], latent_hw: tuple[int, int]) -> None:
        self.layout = list(layout)
        self.latent_hw = tuple(latent_hw)

    def reset(self) -> None:
        self.captured.clear()
        self._kv.clear()
        self.step = 0

    def __enter__(self) -> "AttentionController":
        if self._originals is not None:
            raise RuntimeError("attention controller is already installed")
        self._originals = dict(self.unet.attn_processors)
        procs = {k: ControlledProcessor(self, self.infos[k], p) for k, p in self._originals.items()}
        self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unet.set_attn_processor(dict(self._originals))
        self._originals = None
        self._kv.clear()

    # -- reading captures ----------------------------------------------------------------------------------------
    def maps(self, kind: str = "cross", branch: str = "x", resolution: int | None = None,
             steps: Collection[int] | None = None, layers: Collection[str] | None = None,
             name: str = "") -> torch.Tensor:
        """Mean of the captured maps: cross (n, h, w, K); self (n, h*w, h*w). Raises if nothing matches."""
        sel = [v for (k, b, s, layer, nm), v in self.captured.items()
               if k == kind and b == branch and nm == name and (steps is None or s in steps)
               and (layers is None or layer in layers)
               and (resolution is None or self.layer_hw[layer][0] == resolution)]
        if not sel:
            raise KeyError(f"no captured {kind}-attention maps for branch {branch!r} at resolution {resolution} "
                           f"and steps {steps}; add a Capture rule for them")
        shapes = {tuple(v.shape) for v in sel}
        if len(shapes) > 1:
            raise ValueError(f"captured maps have different shapes {sorted(shapes)}; pass a resolution")
        return torch.stack(sel).mean(0)

    # -- helpers for processors ------------------------------------------------------------------------------------
    def grid(self, n_queries: int) -> tuple[int, int]:
        if self.latent_hw is None:
            raise RuntimeError("the controller does not know the latent size: run the UNet through a BranchRunner "
                               "or call controller.begin_call(layout, latent_hw) first")
        H, W = self.latent_hw
        f = 1
        while f <= max(H, W):
            h, w = -(-H // f), -(-W // f)
            if h * w == n_queries:
                return h, w
            f *= 2
        raise RuntimeError(f"cannot map {n_queries} attention queries onto the latent grid {H}x{W}")

    def mask_at(self, mask: Any, h: int, w: int, n: int, device: torch.device) -> torch.Tensor:
        """bool (n or 1, h*w) mask on a layer grid (cached per mask object and grid; the cache keeps the object
        alive so its id cannot be reused while cached)."""
        key = (id(mask), h, w)
        hit = self._mask_cache.get(key)
        if hit is None:
            arr = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
            if not arr.flatten().any():
                m = torch.zeros((arr.shape[0] if arr.ndim == 3 else 1, h * w), dtype=torch.bool)
            else:
                m = latent_mask(arr, (h, w), rule="majority").flatten(1)
            hit = self._mask_cache[key] = (mask, m)
        m = hit[1]
        if m.shape[0] not in (1, n):
            raise ValueError(f"mask has {m.shape[0]} samples but the branch has {n}")
        return m.to(device)

    def store_kv(self, layer: str, branch: str, k: torch.Tensor, v: torch.Tensor) -> None:
        self._kv[(layer, branch)] = (k, v)

    def load_kv(self, layer: str, branch: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._kv[(layer, branch)]
        except KeyError:
            raise RuntimeError(f"graft source branch {branch!r} has no keys/values for {layer} at step {self.step}: "
                               f"it must run before {target!r} in the same step (use a BranchRunner with both "
                               f"branches)") from None

    def chunk_rows(self, n: int, heads: int, n_q: int, n_k: int) -> int:
        """Query rows per chunk of the explicit path (n_q = no chunking)."""
        if self.query_chunk is None:
            return n_q
        if self.query_chunk != "auto":
            return min(int(self.query_chunk), n_q)
        row_bytes = n * heads * n_k * 4  # one float32 score row across the branch's samples and heads
        return n_q if row_bytes * n_q <= self.chunk_bytes else max(1, self.chunk_bytes // row_bytes)

    def keep(self, kind: str, branch: str, layer: str, name: str, probs: torch.Tensor) -> None:
        key = (kind, branch, self.step, layer, name)
        self.captured[key] = probs.detach().to(self.store_device) if self.store_device else probs.detach()


class ControlledProcessor:
    """Attention processor applying the controller's active rules per branch; the original one otherwise."""

    def __init__(self, controller: AttentionController, info: LayerInfo, original: Any):
        self.c = controller
        self.info = info
        self.original = original

    def _active(self, h: int, w: int) -> tuple[LayerInfo, list[Any]]:
        info = LayerInfo(self.info.name, self.info.place, self.info.kind, h, w)
        step = self.c.step
        active = []
        for r in self.c.rules:
            if isinstance(r, DelayedFocus):
                continue
            kind = r.kind if isinstance(r, (Capture, Reweight)) else "self" if isinstance(r, Graft) else "cross"
            if kind == info.kind and _layer_on(r.layers, r.resolutions, info) and _step_on(r.steps, step):
                active.append(r)
        return info, active

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if not (self.c.rules or self.c.explicit):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        n_q = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        h, w = self.c.grid(n_q)
        info, active = self._active(h, w)
        if not (active or self.c.explicit):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        self.c.layer_hw[info.name] = (h, w)
        return self._explicit(attn, info, active, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _explicit(self, attn, info, active, hidden_states, encoder_hidden_states, attention_mask, temb):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, n_q, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        d = key.shape[-1] // heads
        q = query.view(batch, -1, heads, d).transpose(1, 2)
        k = key.view(batch, -1, heads, d).transpose(1, 2)
        v = value.view(batch, -1, heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        bias = None
        if attention_mask is not None:
            bias = attn.prepare_attention_mask(attention_mask, k.shape[2], batch).view(batch, heads, -1, k.shape[2])
        layout = self.c.layout
        if sum(n for _, n in layout) != batch:  # never guess: every sample would be treated as one branch
            raise ValueError(f"attention layer {info.name} got a batch of {batch} but the announced branch layout "
                             f"{layout} holds {sum(n for _, n in layout)}; announce each UNet call's layout with "
                             f"controller.begin_call (a BranchRunner does) before calling the UNet")
        outs, start = [], 0
        for name, n in layout:
            sl = slice(start, start + n)
            start += n
            b_bias = bias[sl] if bias is not None else None
            outs.append(self._branch(attn, info, active, name, n, q[sl], k[sl], v[sl], b_bias))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        out = out.transpose(1, 2).reshape(batch, -1, heads * d).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _branch(self, attn, info, active, name, n, q, k, v, bias):
        c = self.c
        all_grafts = [r for r in active if isinstance(r, Graft)]
        if any(name in (r.reference, r.normal) for r in all_grafts):
            c.store_kv(info.name, name, k, v)
        grafts = [r for r in all_grafts if r.target == name]
        regions = [r for r in active if isinstance(r, TokenRegions) and _branch_on(r.branches, name)]
        reweights = [r for r in active if isinstance(r, Reweight) and _branch_on(r.branches, name)]
        captures = [r for r in active if isinstance(r, Capture) and _branch_on(r.branches, name)]
        if len(grafts) > 1:
            raise ValueError(f"more than one Graft rule targets branch {name!r} at {info.name}")
        need_probs = bool(reweights or captures)
        dev = q.device
        if regions:
            allowed = self._region_allowed(regions[-1], info, n, k.shape[2], dev)
            bias = _add_bias(bias, allowed)
        if grafts:
            g = grafts[0]
            kr, vr = (_expand(x, n) for x in c.load_kv(info.name, g.reference, name))
            kn, vn = (k, v) if g.normal is None else (_expand(x, n) for x in c.load_kv(info.name, g.normal, name))
            m_t = c.mask_at(g.target_mask, info.h, info.w, n, dev)[:, None, :, None]  # (n|1, 1, Nq, 1)
            m_r = c.mask_at(g.reference_mask, info.h, info.w, n, dev)
            if not m_r.any(dim=1).all():
                raise ValueError("graft reference mask is empty: the target would attend to no key")
            fg_bias = _add_bias(bias, m_r[:, None, None, :])
            p_fg, o_fg = self._attend(attn, info, q, kr, vr, fg_bias, need_probs, name, reweights, bool(captures))
            p_bg, o_bg = self._attend(attn, info, q, kn, vn, bias, need_probs, name, reweights, bool(captures))
            out = torch.where(m_t, o_fg, o_bg)
            probs = torch.where(m_t[:, 0], p_fg, p_bg) if captures else None
        else:
            probs, out = self._attend(attn, info, q, k, v, bias, need_probs, name, reweights, bool(captures))
        for cap in captures:
            p = probs  # (n, Nq, Nk), float32 mean over heads
            if info.kind == "cross":
                p = p.reshape(n, info.h, info.w, -1)
                if cap.tokens is not None:
                    p = p[..., list(cap.tokens)]
            c.keep(info.kind, name, info.name, cap.name, p)
        return out

    def _attend(self, attn, info, q, k, v, bias, need_probs, name, reweights, keep_probs=False):
        """(head-mean float32 probs if ``keep_probs`` else None, output) for one branch's Q against K/V; the
        explicit path runs over query chunks (see the module docstring, "Memory")."""
        if not need_probs:
            mask = None
            if bias is not None:
                mask = bias.to(q.dtype) if bias.dtype != torch.bool else bias
            return None, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        n, heads, n_q, _ = q.shape
        step = self.c.chunk_rows(n, heads, n_q, k.shape[2])
        kt = k.float().transpose(-1, -2)
        outs, means = [], []
        for start in range(0, n_q, step):
            rows = slice(start, min(start + step, n_q))
            scores = torch.matmul(q[:, :, rows].float(), kt) * attn.scale
            b = bias if bias is None or bias.shape[-2] == 1 else bias[..., rows, :]
            if b is not None:
                scores = scores.masked_fill(~b, float("-inf")) if b.dtype == torch.bool else scores + b.float()
            probs = scores.softmax(dim=-1)
            del scores
            for r in reweights:
                probs = self._reweight(r, info, probs, n, q.device, rows)
            outs.append(torch.matmul(probs.to(v.dtype), v))
            if keep_probs:
                means.append(probs.mean(1))
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return (torch.cat(means, dim=1) if len(means) > 1 else means[0]) if keep_probs else None, out

    def _reweight(self, r: Reweight, info: LayerInfo, probs: torch.Tensor, n: int, dev,
                  q_rows: slice = slice(None)) -> torch.Tensor:
        """``probs`` holds the query rows ``q_rows`` of the layer (a chunk, or all of them)."""
        factor = r.factor(self.c.step) if callable(r.factor) else float(r.factor)
        n_k = probs.shape[-1]
        rows = (self.c.mask_at(r.query_mask, info.h, info.w, n, dev)[:, q_rows] if r.query_mask is not None
                else torch.ones(1, probs.shape[-2], dtype=torch.bool, device=dev))
        if info.kind == "cross":
            cols = torch.zeros(1, n_k, dtype=torch.bool, device=dev)
            cols[:, list(r.tokens) if r.tokens is not None else slice(None)] = True
        else:
            cols = (self.c.mask_at(r.key_mask, info.h, info.w, n, dev) if r.key_mask is not None
                    else torch.ones(1, n_k, dtype=torch.bool, device=dev))
        sel = rows[:, None, :, None] & cols[:, None, None, :]
        probs = torch.where(sel, probs * factor, probs)
        if r.renormalize:
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def _region_allowed(self, r: TokenRegions, info: LayerInfo, n: int, n_k: int, dev) -> torch.Tensor:
        """bool (n|1, 1, Nq, Nk): which tokens each query may attend to."""
        n_q = info.h * info.w
        allowed = torch.ones(1, n_q, n_k, dtype=torch.bool, device=dev)
        covered = torch.zeros(1, n_q, dtype=torch.bool, device=dev)
        for mask, tokens in r.regions:
            tok = torch.zeros(n_k, dtype=torch.bool, device=dev)
            tok[list(tokens)] = True
            where = ~covered if mask is None else self.c.mask_at(mask, info.h, info.w, n, dev) & ~covered
            allowed = torch.where(where[:, :, None], tok[None, None, :], allowed)
            covered = covered | where
        return allowed[:, None]


def _expand(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] == n:
        return x
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    raise ValueError(f"graft source batch {x.shape[0]} does not match target batch {n}")


def _add_bias(bias: torch.Tensor | None, allowed: torch.Tensor) -> torch.Tensor:
    """Combine an additive float bias (or None) with a bool 'allowed' mask into one mask SDPA/softmax accept."""
    if bias is None:
        return allowed
    if bias.dtype == torch.bool:
        return bias & allowed
    return bias.masked_fill(~allowed, float("-inf"))


@dataclass
class DelayedFocus:
    """CADiff's delayed focus scheduler: a ``steps`` selector that switches on once the token's attention is
    focused inside the mask (α_t = n_t / n_start > threshold). Add it to the controller before the Reweight."""

    mask: Any
    token: int
    branch: str = "x"
    threshold: float = 0.75
    resolution: int = 16
    history: list[float] = field(default_factory=list)
    on_since: int | None = None
    _controller: AttentionController | None = None
    _decided: dict[int, bool] = field(default_factory=dict)

    def attach(self, controller: AttentionController) -> None:
        self._controller = controller
        controller.rules.append(Capture(kind="cross", branches=[self.branch], resolutions=[self.resolution],
                                        tokens=[self.token], name=self.capture_name))

    @property
    def capture_name(self) -> str:
        return f"delayed-focus-{self.token}"

    def alpha(self, step: int) -> float | None:
        c = self._controller
        try:
            a = c.maps("cross", self.branch, self.resolution, steps=[step], name=self.capture_name)[..., 0]
        except KeyError:
            return None
        m = latent_mask(torch.as_tensor(np.asarray(self.mask)), tuple(a.shape[-2:]), rule="majority")[:, 0]
        m = m.to(a.device)
        n_start = m.flatten(1).sum(1).clamp_min(1)
        above = (a > a.flatten(1).mean(1)[:, None, None]) & m
        return float((above.flatten(1).sum(1) / n_start).mean())

    def __call__(self, step: int) -> bool:
        if step not in self._decided:  # asked once per layer: decide once per step
            self._decided[step] = self._decide(step)
        return self._decided[step]

    def _decide(self, step: int) -> bool:
        if self.on_since is not None and step >= self.on_since:
            return True
        a = self.alpha(step - 1)
        if a is None:
            return False
        self.history.append(a)
        if a > self.threshold:
            self.on_since = step
            return True
        return False
