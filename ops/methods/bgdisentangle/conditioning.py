"""The text conditions of bg-disentangle: C1 = [C_def, C_bg], C2 = [C_m, C_bg], and their masked cross-attention.

Each of C_def, C_m, C_bg is the text encoder's output for its own prompt (1, L, D), L = the tokenizer's
``model_max_length`` (77 for SD). C1 and C2 are their concatenations along the token axis (1, 2L, D): columns
[0, L) are the "region" group (C_def in C1, C_m in C2), columns [L, 2L) the background group C_bg. The UNet's
cross-attention accepts any number of keys, so no token of one prompt can leak into the other through the text
encoder's self-attention (the gradient test of tests/test_bgdisentangle.py relies on that: C_def is not an input
of the background branch at all).

Masked cross-attention (eq. 10-11) is the toolkit's :class:`~ops.diffusion.attention.TokenRegions` rule: a query
inside m' attends only to the region group, a query outside only to C_bg, each with its softmax over its own
group, i.e. m' ⊙ softmax(QK_def^T)V_def + (1 − m') ⊙ softmax(QK_bg^T)V_bg. m' is the latent-grid mask resized to
each layer's grid by the toolkit's "majority" rule.

Choices (the paper prints no prompts):
- C_def: ``"sks {defect_type} defect"`` (DreamBooth's rare identifier "sks", as the paper fine-tunes the UNet
  DreamBooth-style), C_bg: ``"a photo of a {category}"``, C_m: ``"an empty masked region"`` (the masked latent
  z^m is 0 inside m; C_m names that blank). All three are configurable templates.
- No token is learned: the paper trains only the UNet ("We only trained the U-Net part ... followed by
  DreamBooth"), so the three embeddings are fixed encodings of their prompts.
- Defect tokens (eq. 13's K_def whose attention refines the mask): the word tokens of the C_def prompt (its
  columns 1..n, without BOS/EOS/padding), whose probabilities are summed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ops.diffusion.attention import TokenRegions

DEF_PROMPT = "sks {defect_type} defect"
BG_PROMPT = "a photo of a {category}"
M_PROMPT = "an empty masked region"


def render(template: str, category: str, defect_type: str) -> str:
    return template.format(category=category, defect_type=defect_type.replace("_", " "))


def check_template(template: str, what: str) -> None:
    try:
        template.format(category="c", defect_type="d")
    except (KeyError, IndexError) as e:
        raise ValueError(f"{what} {template!r} may only use {{category}} and {{defect_type}}") from e


@dataclass
class Conditioning:
    c_def: torch.Tensor  # (1, L, D)
    c_m: torch.Tensor
    c_bg: torch.Tensor
    def_tokens: tuple[int, ...]  # columns of the defect words inside C_def (and C1)

    @property
    def length(self) -> int:
        return int(self.c_def.shape[1])

    @property
    def c1(self) -> torch.Tensor:
        return torch.cat([self.c_def, self.c_bg], dim=1)

    @property
    def c2(self) -> torch.Tensor:
        return torch.cat([self.c_m, self.c_bg], dim=1)

    def region_cols(self) -> range:
        return range(0, self.length)

    def bg_cols(self) -> range:
        return range(self.length, 2 * self.length)

    def regions(self, mask: Any, branches: Any = None, steps: Any = None) -> TokenRegions:
        """Eq. 10-11 for C1 and C2 alike (same column layout): inside ``mask`` the region group, else C_bg."""
        return TokenRegions(regions=[(mask, self.region_cols()), (None, self.bg_cols())], branches=branches,
                            steps=steps)


def defect_token_columns(tokenizer: Any, prompt: str) -> tuple[int, ...]:
    n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    n = min(n, tokenizer.model_max_length - 2)  # truncation keeps BOS + 75 tokens + EOS
    if n < 1:
        raise ValueError(f"defect prompt {prompt!r} has no word token; eq. 13 needs one to refine the mask")
    return tuple(range(1, 1 + n))


def build(backbone: Any, def_prompt: str, m_prompt: str, bg_prompt: str) -> Conditioning:
    with torch.no_grad():
        c = backbone.encode_prompt([def_prompt, m_prompt, bg_prompt]).detach()
    return Conditioning(c_def=c[0:1], c_m=c[1:2], c_bg=c[2:3],
                        def_tokens=defect_token_columns(backbone.tokenizer, def_prompt))
