"""The `Model` protocol: all that code outside a model file may use of a torch model.

The LM adapter, generation, serving, GGUF export and the trainers see a model only through these
names, so a new architecture (a model file plus its entry in models/architectures.py) works with
all of them without their knowing it. A Protocol, not a base class: model files stay
self-contained (nanoGPT style). The functions below are the parts every current architecture
shares; a model class binds them as its methods (`hidden_states = decoder.hidden_states`), and an
architecture that needs otherwise (a scaled embedding, a soft-capped head) writes its own.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cache import KVCache


class Model(Protocol):
    architecture: str          # its name in models/architectures.py
    # The architecture's config dataclass. Every one has vocab_size, context_length, d_model,
    # n_layers, n_heads, n_kv_heads, head_dim, tie_embeddings and num_classes (> 0: a classifier).
    config: Any
    tok_emb: nn.Embedding      # its weight tells the model's device and dtype, and is the tied head
    blocks: nn.ModuleList      # partial finetuning trains the last N; LoRA targets "blocks.N.*"
    final_norm: nn.Module
    head: nn.Linear | None     # None: tied to tok_emb; num_classes outputs for a classifier

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """tokens [B, T] -> the input of block 0 [B, T, d_model], at `positions` ([T] or [B, T];
        None: start .. start + T)."""
        ...

    def run_blocks(self, x: torch.Tensor, first: int = 0, last: int | None = None, *, cache: KVCache | None = None,
                   positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks [first, last) (last None: to the end) on x [B, T, d_model], the output of block
        first - 1 (or of embed). Positions as in hidden_states. A frozen prefix of blocks is run
        once and cached this way (harness/train/classify.py)."""
        ...

    def hidden_states(self, tokens: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> final-normed hidden states [B, T, d_model]; see `hidden_states` below."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d_model] -> [..., vocab_size or num_classes], for the positions the caller asks."""
        ...

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        ...

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits at every position [B, T, vocab] (training)."""
        ...


def hidden_states(model: Model, tokens: torch.Tensor, cache: KVCache | None = None,
                  positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """tokens [B, T] -> final-normed hidden states [B, T, d_model].

    cache: keys/values of earlier positions, extended in place. positions: None (consecutive after
    what the cache holds) or [B, T] per-row positions (left-padded batches). attn_mask: None
    (causal) or a boolean mask that scaled_dot_product_attention broadcasts."""
    x = model.embed(tokens, positions, cache.length if cache is not None else 0)
    x = model.run_blocks(x, cache=cache, positions=positions, attn_mask=attn_mask)
    if cache is not None:
        cache.advance(tokens.shape[1])
    return model.final_norm(x)


def logits(model: Model, hidden: torch.Tensor) -> torch.Tensor:
    """The head on the positions passed only: for a small model the vocabulary head is the largest
    matmul, so callers gather the positions they score first."""
    weight = model.tok_emb.weight if model.head is None else model.head.weight
    return F.linear(hidden, weight)


def forward(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    return model.logits(model.hidden_states(tokens))


def new_cache(model: Model, batch: int, capacity: int) -> KVCache:
    """An empty KV cache for `batch` rows of up to `capacity` positions, in the model's dtype."""
    p, cfg = model.tok_emb.weight, model.config
    return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, capacity, p.dtype, p.device)


def output_head(cfg) -> nn.Linear | None:
    """The vocabulary head (None when tied to the embedding) or a classifier's num_classes head:
    the same for every architecture, and what `to_classifier` swaps in."""
    if cfg.num_classes:
        return nn.Linear(cfg.d_model, cfg.num_classes)
    return None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
