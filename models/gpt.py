"""GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP, tied vocabulary head.

Follows "Build a Large Language Model (From Scratch)" ch04 and nanoGPT. Weights use our own names;
`models/checkpoint.py` maps Hugging Face GPT-2 (Conv1D, transposed) onto them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cache import KVCache, attention_mask


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    dropout: float = 0.0        # 0 by default: dropout costs speed and GPT-2 finetunes fine without it
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # > 0: a classifier, the vocabulary head replaced by num_classes outputs (spam finetuning, ch06)
    num_classes: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads


# The four published GPT-2 sizes (the book's GPT_CONFIG_124M etc.) and tiny CPU configs for tests.
GPT_CONFIGS: dict[str, dict] = {
    "gpt2-124m": dict(d_model=768, n_layers=12, n_heads=12),
    "gpt2-355m": dict(d_model=1024, n_layers=24, n_heads=16),
    "gpt2-774m": dict(d_model=1280, n_layers=36, n_heads=20),
    "gpt2-1558m": dict(d_model=1600, n_layers=48, n_heads=25),
    "gpt-tiny": dict(context_length=256, d_model=64, n_layers=2, n_heads=4),
    "gpt-small": dict(context_length=256, d_model=256, n_layers=4, n_heads=4),
}


def output_head(cfg) -> nn.Linear | None:
    """The vocabulary head (None when tied to the embedding) or a classifier's num_classes head."""
    if cfg.num_classes:
        return nn.Linear(cfg.d_model, cfg.num_classes)
    return None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x, layer: int, cache: KVCache | None, attn_mask: torch.Tensor | None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
        if cache is not None:
            k, v = cache.update(layer, k, v)                                          # [B, H, S, Dh]
        is_causal = False
        if attn_mask is None:
            attn_mask, is_causal = attention_mask(cache, T, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's tanh GELU


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, layer, cache, attn_mask):
        x = x + self.drop(self.attn(self.ln1(x), layer, cache, attn_mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    architecture = "gpt"

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = output_head(cfg)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden_states(self, tokens: torch.Tensor, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None):
        """tokens [B, T] -> final-normed hidden states [B, T, d_model]."""
        B, T = tokens.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=tokens.device)
        if int(positions.max()) >= self.config.context_length:
            raise ValueError(f"sequence longer than the model's context ({self.config.context_length})")
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for i, block in enumerate(self.blocks):
            x = block(x, i, cache, attn_mask)
        if cache is not None:
            cache.advance(T)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d_model] -> [..., vocab]; callers pass only the positions they need."""
        weight = self.tok_emb.weight if self.head is None else self.head.weight
        return F.linear(hidden, weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden_states(tokens))

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        p = self.tok_emb.weight
        cfg = self.config
        return KVCache(cfg.n_layers, batch, cfg.n_heads, cfg.head_dim, capacity, p.dtype, p.device)
