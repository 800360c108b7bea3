"""Llama-style decoder: RMSNorm, rotary positions (with Llama-3 frequency scaling), SwiGLU MLP,
grouped-query attention, optionally tied embeddings. SmolLM2 is this architecture.

q/k/v and gate/up projections are fused into one matmul each: fewer, larger matmuls are faster on
every backend. `models/checkpoint.py` concatenates the separate HF/GGUF tensors at load time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cache import KVCache, attention_mask
from models.gpt import output_head


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    context_length: int = 4096
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    d_ff: int = 11008
    rope_base: float = 10000.0
    # Llama 3.1 scaling: {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    #                     "original_context_length": 8192}; None = plain RoPE.
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attn_bias: bool = False
    num_classes: int = 0          # > 0: classifier head (see models.gpt.GPTConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


LLAMA_CONFIGS: dict[str, dict] = {
    "smollm2-135m": dict(vocab_size=49152, context_length=8192, d_model=576, n_layers=30, n_heads=9,
                         n_kv_heads=3, d_ff=1536, rope_base=100000.0, tie_embeddings=True),
    "llama-tiny": dict(vocab_size=50257, context_length=256, d_model=64, n_layers=2, n_heads=4,
                       n_kv_heads=2, d_ff=176, rope_base=500000.0, tie_embeddings=True,
                       rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_context_length": 64}),
}


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3's smooth long-context rescaling if configured."""
    # float32 throughout, as transformers computes it, so positions far into the context agree.
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s["original_context_length"] / s["low_freq_factor"]
    high_wavelen = s["original_context_length"] / s["high_freq_factor"]
    smooth = (s["original_context_length"] / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)  # long waves: slowed down
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)                     # in between: blended
    scaled = torch.where(mid, (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq, scaled)
    return scaled


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, Dh]; cos/sin [T, Dh] or [B, 1, T, Dh]. Half-split (HF) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None, attn_mask: torch.Tensor | None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)                   # [B, H(kv), T, D]
        if cache is not None:
            k, v = cache.update(layer, k, v)                                      # [B, Hkv, S, D]
        is_causal = False
        if attn_mask is None:
            attn_mask, is_causal = attention_mask(cache, T, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=Hkv != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    attn_class = Attention      # a subclass may swap the attention (Qwen3's QK-norm, models/qwen3.py)

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = self.attn_class(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, layer, cache, attn_mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, layer, cache, attn_mask)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    architecture = "llama"
    block_class = Block         # Llama-family variants subclass Llama and swap the block

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(self.block_class(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = output_head(cfg)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        # cos/sin tables for every position, kept in fp32 and cast per call (not a checkpoint tensor).
        angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float32), rope_frequencies(cfg))
        angles = torch.cat((angles, angles), dim=-1)                                    # [ctx, Dh]
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def hidden_states(self, tokens: torch.Tensor, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None):
        """tokens [B, T] -> final-normed hidden states [B, T, d_model].

        positions: None (consecutive after the cache) or [B, T] per-row positions (left padding)."""
        B, T = tokens.shape
        x = self.tok_emb(tokens)
        if positions is None:
            start = cache.length if cache is not None else 0
            if start + T > self.config.context_length:
                raise ValueError(f"sequence longer than the model's context ({self.config.context_length})")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, i, cache, attn_mask)
        if cache is not None:
            cache.advance(T)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.tok_emb.weight if self.head is None else self.head.weight
        return F.linear(hidden, weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden_states(tokens))

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        p = self.tok_emb.weight
        cfg = self.config
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, capacity, p.dtype, p.device)
