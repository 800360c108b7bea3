"""Gemma 3 (text): a decoder whose layers are mostly sliding-window (local) attention, with one global
layer in every six, each kind with its own RoPE base (local 10k, global 1M, plus linear position
interpolation on the global layers of the 4B+ models).

What differs from Llama (models/llama.py), each as transformers' Gemma3ForCausalLM computes it:
- RMSNorm scales by (1 + w), w stored as in HF (zero-initialised), computed in fp32;
- four norms per block: before and after attention, before and after the MLP (sandwich norms);
- RMSNorm over each query/key head before RoPE (QK-norm), head_dim 256 independent of d_model, and
  attention scaled by query_pre_attn_scalar**-0.5 rather than head_dim**-0.5;
- GeGLU MLP (tanh GELU), embeddings multiplied by sqrt(d_model) in the embedding's dtype, tied head,
  optional final logit soft-capping (None in Gemma 3).

The attention and MLP are Llama's (models/llama.py) through Qwen3's QK-norm attention, with Gemma's
norm, scale, window and activation swapped in. The KV cache (models/cache.py) keeps every position
for every layer; a local layer slices out the keys inside its window and masks the rest, so a
decoding step costs O(window) in those layers and prompts longer than the window never attend past
it. (A ring buffer for the local layers would also bound their memory; not done.)

Its files (HF config.json and tensors, GGUF) are read and written by models/gemma3_formats.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import decoder
from models.cache import KVCache
from models.llama import SwiGLU
from models.qwen3 import QKNormAttention

LOCAL, GLOBAL = "sliding_attention", "full_attention"     # transformers' layer_types values


@dataclass
class Gemma3Config:
    vocab_size: int = 262144
    context_length: int = 32768
    d_model: int = 640
    n_layers: int = 18
    n_heads: int = 4
    n_kv_heads: int = 1
    head_dim: int = 256                   # explicit, not d_model // n_heads
    d_ff: int = 2048
    rope_base: float = 1000000.0          # global layers
    rope_local_base: float = 10000.0      # sliding-window layers
    rope_scaling_factor: float = 1.0      # linear interpolation on the global layers (4B+: 8)
    sliding_window: int = 512             # a local layer's query sees itself and the window-1 before it
    layer_types: list[str] | None = None  # per layer LOCAL/GLOBAL; None: every 6th layer global
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    num_classes: int = 0                  # > 0: classifier head (see models.gpt.GPTConfig)
    # Read by Llama's attention. Not a field: Gemma 3 has no q/k/v biases (config_from_hf refuses them).
    attn_bias = False

    def is_global(self, layer: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[layer] == GLOBAL
        return (layer + 1) % 6 == 0


Config = Gemma3Config


def default_layer_types(n_layers: int, pattern: int = 6) -> list[str]:
    return [LOCAL if (i + 1) % pattern else GLOBAL for i in range(n_layers)]


NAMED_CONFIGS: dict[str, dict] = {
    "gemma3-270m": dict(vocab_size=262144, context_length=32768, d_model=640, n_layers=18, n_heads=4,
                        n_kv_heads=1, d_ff=2048, sliding_window=512),
    "gemma3-1b": dict(vocab_size=262144, context_length=32768, d_model=1152, n_layers=26, n_heads=4,
                      n_kv_heads=1, d_ff=6912, sliding_window=512),
    "gemma3-4b": dict(vocab_size=262208, context_length=131072, d_model=2560, n_layers=34, n_heads=8,
                      n_kv_heads=4, d_ff=10240, sliding_window=1024, rope_scaling_factor=8.0),
    # Random-init test model: GPT-2's vocabulary size (the registry pairs "init" models with that
    # tokenizer), local and global layers, a window shorter than most prompts.
    "gemma3-tiny": dict(vocab_size=50257, context_length=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                        head_dim=32, d_ff=128, sliding_window=16, layer_types=[LOCAL, LOCAL, GLOBAL],
                        query_pre_attn_scalar=32.0),
}


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), in fp32 whatever the model's dtype, as transformers' Gemma3RMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        # torch's fused rms_norm: the same fp32 values as the three-op form transformers writes, at
        # about half the time (six norms a block make them a large share of a CPU forward)
        return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).type_as(x)


def window_keys(k, v, attn_mask, past: int, T: int, window: int):
    """(k, v, attn_mask, is_causal) for queries at positions past..past+T-1 of a local layer, each
    seeing the `window` latest positions up to itself (transformers: kv > q - window). Keys no query
    can see are sliced off, so a decode step reads `window` keys, not the whole cache.
    k, v: [B, Hkv, past+T, D]; attn_mask: None or bool [B, 1, T, past+T] (left-padded batches: pads
    lie before each row's tokens, so column distance is position distance)."""
    lo = max(0, past - window + 1)                       # the first position any of the T queries sees
    k, v = k[:, :, lo:], v[:, :, lo:]
    if attn_mask is not None:
        attn_mask = attn_mask[..., lo:]
    if T == 1:
        return k, v, attn_mask, False                    # every kept key is in the window
    if attn_mask is None and past == 0 and T <= window:
        return k, v, None, True                          # plain causal: the window is never reached
    q_pos = torch.arange(past, past + T, device=k.device)[:, None]
    k_pos = torch.arange(lo, past + T, device=k.device)[None, :]
    band = (k_pos <= q_pos) & (k_pos > q_pos - window)  # [T, S']
    return k, v, band if attn_mask is None else attn_mask & band, False


class Attention(QKNormAttention):
    """Qwen3's (Llama's with QK-norm) with Gemma's norm, query_pre_attn_scalar**-0.5 scale and, on
    local layers, the sliding window."""
    norm_class = RMSNorm

    def __init__(self, cfg: Gemma3Config, local: bool):
        super().__init__(cfg)
        self.window = cfg.sliding_window if local else None
        self.scale = cfg.query_pre_attn_scalar ** -0.5

    def visible_keys(self, k, v, attn_mask: torch.Tensor | None, cache: KVCache | None, T: int):
        if self.window is None:
            return super().visible_keys(k, v, attn_mask, cache, T)
        past = cache.length if cache is not None else 0   # the cache advances after the last block
        return window_keys(k, v, attn_mask, past, T, self.window)


class GeGLU(SwiGLU):
    act = staticmethod(partial(F.gelu, approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: Gemma3Config, local: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, local)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = GeGLU(cfg)
        self.post_ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x, cos, sin, layer, cache, attn_mask):
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin, layer, cache, attn_mask))
        return x + self.post_ffn_norm(self.ffn(self.ffn_norm(x)))


class Gemma3(nn.Module):
    architecture = "gemma3"

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, local=not cfg.is_global(i)) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = decoder.output_head(cfg)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        # Inverse frequencies per layer kind; cos/sin are computed per call from the positions, as
        # transformers does (no [context, head_dim] tables: at 131k positions, cos/sin for both kinds
        # would take 512 MiB).
        exponent = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
        self.register_buffer("inv_freq_local", 1.0 / cfg.rope_local_base ** exponent, persistent=False)
        self.register_buffer("inv_freq_global", 1.0 / cfg.rope_base ** exponent / cfg.rope_scaling_factor,
                             persistent=False)

    @staticmethod
    def _rope(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] or [B, T] -> cos, sin [T, Dh] or [B, 1, T, Dh] (angles in fp32)."""
        angles = positions[..., None].float() * inv_freq                          # [(B,) T, Dh/2]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        return (cos.unsqueeze(1), sin.unsqueeze(1)) if positions.dim() == 2 else (cos, sin)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """tokens [B, T] -> [B, T, d_model], scaled by sqrt(d_model) rounded to the embedding's dtype (as HF)."""
        if positions is None and start + tokens.shape[1] > self.config.context_length:
            raise ValueError(f"sequence longer than the model's context ({self.config.context_length})")
        x = self.tok_emb(tokens)
        return x * torch.tensor(self.config.d_model ** 0.5).to(x.dtype)

    def run_blocks(self, x: torch.Tensor, first: int = 0, last: int | None = None, *, cache: KVCache | None = None,
                   positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks [first, last) on x [B, T, d_model] at positions consecutive after the cache, or at
        `positions` [B, T] (left padding)."""
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        rope = {False: self._rope(positions, self.inv_freq_local, x.dtype),
                True: self._rope(positions, self.inv_freq_global, x.dtype)}
        for i in range(first, len(self.blocks) if last is None else last):
            x = self.blocks[i](x, *rope[self.blocks[i].attn.window is None], i, cache, attn_mask)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """decoder.logits, then the optional final soft-capping (not on a classifier's head)."""
        out = decoder.logits(self, hidden)
        cap = self.config.final_logit_softcapping
        if cap and not self.config.num_classes:
            out = torch.tanh(out / cap) * cap
        return out

    # The rest of the Model protocol, shared by the architectures (models/decoder.py).
    hidden_states, forward, new_cache = decoder.hidden_states, decoder.forward, decoder.new_cache


Model = Gemma3

