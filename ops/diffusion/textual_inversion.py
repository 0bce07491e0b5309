"""Textual inversion: new placeholder tokens whose embedding rows are the only thing trained.

Choices where the brief, the papers or the libraries leave room:
- The new rows live in a separate float32 ``nn.Parameter`` ([N, D]); a forward hook on the text encoder's
  token-embedding module substitutes them at the placeholder positions. The embedding matrix itself never
  requires grad, so every other row stays bit-identical whatever the optimizer does (weight decay included),
  and a training loop can assert that the text encoder holds no trainable tensor. (diffusers' script instead
  trains the whole matrix and copies the old rows back after each step.)
- The matrix is grown with ``resize_token_embeddings(mean_resizing=False)`` inside ``torch.random.fork_rng``
  (it draws the new rows from the global RNG, which must not shift a caller's stream); the new rows are then
  set to the initial vectors, so the encoder gives the init embedding even without the hook.
- Initial vector: the mean of the init word's sub-token embeddings (diffusers' script refuses multi-token
  init words; AnoGen initialises from "defect", a single CLIP token, where the mean is that token's row).
  ``init_words`` gives one word per placeholder or one word for all.
- A placeholder that is already an added token of this tokenizer (an earlier fit on the same backbone) is
  reused and re-initialised; one that the base tokenizer reads as a single vocabulary token ("defect" ->
  "defect</w>") is refused: adding it would silently change every prompt that uses the real word.
- Files: one ``learned_embeds-<i>.safetensors`` per placeholder holding ``{placeholder: float32 [1, D]}`` -
  diffusers' own textual-inversion file layout, which ``pipe.load_textual_inversion(file)`` reads as a
  single-vector token (a [N, D] tensor under one key would instead become "tok", "tok_1", ...). Written with
  ``ops.atomic``. :func:`load_learned_tokens` reads them back into a bare tokenizer + text encoder.
- Gradient checkpointing re-runs the hook in the backward pass; keep the hook attached until backward is done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ops.atomic import canonical_safetensors, write_bytes_atomic


@dataclass
class TextualInversion:
    tokens: list[str]
    token_ids: list[int]
    embeddings: nn.Parameter  # [N, D] float32, the trainable rows
    text_encoder: nn.Module
    handle: Any = field(default=None, repr=False)

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.embeddings]

    def attach(self) -> "TextualInversion":
        """Make the text encoder use the trainable rows (idempotent)."""
        if self.handle is None:
            self.handle = self.text_encoder.get_input_embeddings().register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _hook(self, _module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        ids = inputs[0]
        for j, tid in enumerate(self.token_ids):
            out = torch.where((ids == tid).unsqueeze(-1), self.embeddings[j].to(out.device, out.dtype), out)
        return out

    @torch.no_grad()
    def bake(self) -> None:
        """Copy the trained rows into the embedding matrix and drop the hook (plain encoder for inference)."""
        weight = self.text_encoder.get_input_embeddings().weight
        for j, tid in enumerate(self.token_ids):
            weight[tid] = self.embeddings[j].to(weight.device, weight.dtype)
        self.detach()

    def save(self, out_dir: Any) -> list[Path]:
        """One diffusers textual-inversion file per placeholder; returns the paths in token order."""
        from safetensors.torch import save

        out = Path(out_dir)
        paths = []
        for j, token in enumerate(self.tokens):
            row = self.embeddings[j].detach().to("cpu", torch.float32).reshape(1, -1).contiguous()
            path = out / f"learned_embeds-{j}.safetensors"
            write_bytes_atomic(path, canonical_safetensors(save({token: row}, metadata={"format": "pt"})))
            paths.append(path)
        return paths


def _init_vector(tokenizer, weight: torch.Tensor, word: str) -> torch.Tensor:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"init word {word!r} tokenizes to nothing; use a real word such as 'defect'")
    return weight[ids].detach().float().mean(0)


def _token_ids(tokenizer, text_encoder: nn.Module, tokens: Sequence[str]) -> list[int]:
    base_vocab = tokenizer.vocab_size
    existing = tokenizer.get_vocab()
    for tok in tokens:
        known = existing.get(tok)
        ids = tokenizer(tok, add_special_tokens=False).input_ids
        if (known is not None and known < base_vocab) or (known is None and len(ids) == 1 and ids[0] < base_vocab):
            raise ValueError(f"placeholder {tok!r} is a word of the base vocabulary (adding it would change every "
                             f"prompt using that word); pick a new name like '<defect-0>'")
    tokenizer.add_tokens([t for t in tokens if t not in existing])
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    for tok, tid in zip(tokens, ids):
        if tokenizer(tok, add_special_tokens=False).input_ids != [tid]:
            raise ValueError(f"placeholder {tok!r} does not tokenize to a single token")
    if text_encoder.get_input_embeddings().weight.shape[0] < len(tokenizer):
        with torch.random.fork_rng(devices=[]):
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return ids


def add_placeholder_tokens(tokenizer, text_encoder: nn.Module, placeholders: Sequence[str],
                           init_words: Sequence[str] | str = "defect") -> TextualInversion:
    """Add the placeholders, initialise their rows from the init words, return the attached trainable rows."""
    placeholders = list(placeholders)
    if not placeholders or len(set(placeholders)) != len(placeholders):
        raise ValueError(f"placeholders must be non-empty and distinct, got {placeholders}")
    words = [init_words] * len(placeholders) if isinstance(init_words, str) else list(init_words)
    if len(words) != len(placeholders):
        raise ValueError(f"{len(placeholders)} placeholders but {len(words)} init words; give one word or one each")
    base = text_encoder.get_input_embeddings().weight
    init = torch.stack([_init_vector(tokenizer, base, w) for w in words])
    ids = _token_ids(tokenizer, text_encoder, placeholders)
    emb = text_encoder.get_input_embeddings()
    emb.weight.requires_grad_(False)
    with torch.no_grad():
        emb.weight[ids] = init.to(emb.weight.device, emb.weight.dtype)
    rows = nn.Parameter(init.to(emb.weight.device))
    return TextualInversion(tokens=placeholders, token_ids=list(ids), embeddings=rows,
                            text_encoder=text_encoder).attach()


def read_learned_embeds(path: Any) -> tuple[str, torch.Tensor]:
    """(placeholder, [D] float32 vector) from one file written by :meth:`TextualInversion.save`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no textual-inversion file there (written by TextualInversion.save)")
    state = load_file(str(path))
    if len(state) != 1:
        raise ValueError(f"{path}: expected one {{placeholder: tensor}} entry, found keys {sorted(state)[:5]}")
    token, vec = next(iter(state.items()))
    if vec.ndim == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.ndim != 1:
        raise ValueError(f"{path}: {token!r} holds a {tuple(vec.shape)} tensor, expected [1, D] or [D]")
    return token, vec.float()


def load_learned_tokens(tokenizer, text_encoder: nn.Module, paths: Sequence[Any]) -> list[int]:
    """Add the tokens of saved files to a tokenizer + text encoder (no pipeline needed); returns their ids."""
    loaded = [read_learned_embeds(p) for p in paths]
    dim = text_encoder.get_input_embeddings().weight.shape[1]
    for p, (tok, vec) in zip(paths, loaded):
        if vec.shape[0] != dim:
            raise ValueError(f"{p}: embedding of {tok!r} has {vec.shape[0]} dims but the text encoder uses {dim}; "
                             f"it was trained for another text encoder")
    ids = _token_ids(tokenizer, text_encoder, [t for t, _ in loaded])
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for tid, (_, vec) in zip(ids, loaded):
            weight[tid] = vec.to(weight.device, weight.dtype)
    return ids
