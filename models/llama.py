"""Llama-style decoder: RMSNorm, rotary positions (with Llama-3 frequency scaling), SwiGLU MLP,
grouped-query attention, optionally tied embeddings. SmolLM2 is this architecture.

q/k/v and gate/up projections are fused into one matmul each: fewer, larger matmuls are faster on
every backend. The end of this file concatenates the separate HF/GGUF tensors at load time and
splits them again for GGUF export (wired up in models/architectures.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import decoder
from models.cache import KVCache, attention_mask
from models.checkpoint import CheckpointError, float_or_raw, strip_prefix


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
    scale: float | None = None  # of the attention logits; None: scaled_dot_product_attention's head_dim**-0.5

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama leaves queries and keys as projected; QK-norm architectures (Qwen3) override this."""
        return q, k

    def visible_keys(self, k, v, attn_mask: torch.Tensor | None, cache: KVCache | None, T: int):
        """(k, v, attn_mask, is_causal) for scaled_dot_product_attention: every key, causally or as
        `attn_mask` says. Gemma's sliding-window layers keep only their window (models/gemma3.py)."""
        if attn_mask is not None:
            return k, v, attn_mask, False
        return (k, v, *attention_mask(cache, T, k.device))

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None, attn_mask: torch.Tensor | None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
        q, k = self.normalize_qk(q, k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)                   # [B, H(kv), T, D]
        if cache is not None:
            k, v = cache.update(layer, k, v)                                      # [B, Hkv, S, D]
        k, v, attn_mask, is_causal = self.visible_keys(k, v, attn_mask, cache, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           scale=self.scale, enable_gqa=Hkv != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class SwiGLU(nn.Module):
    """down(act(gate) * up), gate and up one matmul; act is SiLU here, tanh GELU in Gemma's GeGLU."""
    act = staticmethod(F.silu)

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


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
        self.head = decoder.output_head(cfg)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        # cos/sin tables for every position, kept in fp32 and cast per call (not a checkpoint tensor).
        angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float32), rope_frequencies(cfg))
        angles = torch.cat((angles, angles), dim=-1)                                    # [ctx, Dh]
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """tokens [B, T] -> [B, T, d_model]; positions enter each block's attention (RoPE)."""
        return self.tok_emb(tokens)

    def run_blocks(self, x: torch.Tensor, first: int = 0, last: int | None = None, *, cache: KVCache | None = None,
                   positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks [first, last) on x [B, T, d_model] at positions consecutive after the cache, or at
        `positions` [B, T] (left padding)."""
        T = x.shape[1]
        if positions is None:
            start = cache.length if cache is not None else 0
            if start + T > self.config.context_length:
                raise ValueError(f"sequence longer than the model's context ({self.config.context_length})")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i in range(first, len(self.blocks) if last is None else last):
            x = self.blocks[i](x, cos, sin, i, cache, attn_mask)
        return x

    # The rest of the Model protocol, shared by the architectures (models/decoder.py).
    hidden_states, logits, forward, new_cache = (decoder.hidden_states, decoder.logits, decoder.forward,
                                                 decoder.new_cache)


# --- Hugging Face and GGUF files (the "llama" entry of models/architectures.py) -------------------

# Our config keys -> HF config.json's, to name the file's own key when a value is refused.
HF_KEYS = {"vocab_size": "vocab_size", "context_length": "max_position_embeddings", "d_model": "hidden_size",
           "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
           "d_ff": "intermediate_size", "norm_eps": "rms_norm_eps", "rope_base": "rope_theta"}
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")


def from_hf(cfg: dict, folder) -> tuple[dict, Callable[[dict], dict]]:
    """(our config, HF state_dict -> ours) for a llama / mistral config.json."""
    # transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling.
    rope = cfg.get("rope_parameters") or {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 10000.0)}
    scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise CheckpointError(f"{folder}: rope_scaling {scaling} is not supported (only llama3)")
    if scaling:
        scaling = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor")} | {
            "original_context_length": scaling["original_max_position_embeddings"]}
    tied = bool(cfg.get("tie_word_embeddings", False))
    n_kv = cfg.get("num_key_value_heads")   # absent: as many as query heads; 0 is refused later
    config = dict(vocab_size=cfg["vocab_size"], context_length=cfg["max_position_embeddings"],
                  d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                  n_kv_heads=cfg["num_attention_heads"] if n_kv is None else n_kv, d_ff=cfg["intermediate_size"],
                  rope_base=float_or_raw(rope.get("rope_theta", 10000.0)),
                  rope_scaling=scaling, norm_eps=cfg.get("rms_norm_eps", 1e-5),
                  tie_embeddings=tied, attn_bias=bool(cfg.get("attention_bias", False)))
    return config, lambda state: convert_hf(state, config["n_layers"], tied)


def convert_hf(hf: dict, n_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    hf = strip_prefix(hf, "model.")
    out = {"tok_emb.weight": hf["embed_tokens.weight"], "final_norm.weight": hf["norm.weight"]}
    if not tied:
        out["head.weight"] = hf["lm_head.weight"]
    for i in range(n_layers):
        p, a, m = f"layers.{i}.", f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        out[f"blocks.{i}.attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[f"blocks.{i}.ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([hf[a + f"{x}_proj.weight"] for x in "qkv"])
        if a + "q_proj.bias" in hf:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([hf[a + f"{x}_proj.bias"] for x in "qkv"])
        out[f"blocks.{i}.attn.o_proj.weight"] = hf[a + "o_proj.weight"]
        out[f"blocks.{i}.ffn.gate_up.weight"] = torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]])
        out[f"blocks.{i}.ffn.down.weight"] = hf[m + "down_proj.weight"]
    return out


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Half-split q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """permute_rope's inverse (torch ops, so that meta tensors go through it too)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_factors(cfg: LlamaConfig) -> torch.Tensor | None:
    """Llama-3 scaling as llama.cpp applies it, the `rope_freqs` tensor: theta_i / factor_i (None
    for plain RoPE). llama.cpp keeps only these; our exporter also writes the parameters that made
    them (harness.rope_scaling.*, ignored by llama.cpp) so that our loader rebuilds the exact config."""
    if not cfg.rope_scaling:
        return None
    return rope_frequencies(replace(cfg, rope_scaling=None)) / rope_frequencies(cfg)


def gguf_config(header, config: dict) -> dict:
    """`config` (the keys every GGUF gives, models/gguf_import.py) completed from the metadata."""
    config = config | dict(n_kv_heads=header.get("attention.head_count_kv", config["n_heads"]),
                           d_ff=header.get("feed_forward_length"),
                           rope_base=float_or_raw(header.get("rope.freq_base", 10000.0)),
                           norm_eps=float_or_raw(header.get("attention.layer_norm_rms_epsilon", 1e-5)),
                           attn_bias="blk.0.attn_q.bias" in header.shapes, rope_scaling=None)
    if "rope_freqs.weight" in header.shapes:
        scaling = {k: header.field(f"harness.rope_scaling.{k}") for k in ROPE_SCALING_KEYS}
        if any(v is None for v in scaling.values()):
            raise CheckpointError(f"{header.path}: GGUF rope frequency factors (Llama 3.1 long context) are not "
                                  "supported yet")
        config["rope_scaling"] = scaling | {"original_context_length": int(scaling["original_context_length"])}
    return config


def gguf_check(config: dict, t: Callable[[str], torch.Tensor], header) -> None:
    """The file's rope_freqs must be the factors its harness.rope_scaling parameters give."""
    if config["rope_scaling"] and not torch.allclose(t("rope_freqs.weight"), rope_factors(LlamaConfig(**config)),
                                                     rtol=1e-5):
        raise CheckpointError(f"{header.path}: rope_freqs does not match its harness.rope_scaling parameters")


def gguf_state(config: dict, t: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors but the embedding and vocabulary head, from llama.cpp's llama layout; t(name) ->
    tensor (a meta tensor for shapes alone)."""
    state = {"final_norm.weight": t("output_norm.weight")}
    heads = {"q": config["n_heads"], "k": config["n_kv_heads"]}
    qkv = lambda b, p: torch.cat([unpermute_rope(t(f"{b}attn_{x}.{p}"), heads[x]) if x in heads  # noqa: E731
                                  else t(f"{b}attn_{x}.{p}") for x in "qkv"])
    for i in range(config["n_layers"]):
        b = f"blk.{i}."
        state[f"blocks.{i}.attn_norm.weight"] = t(b + "attn_norm.weight")
        state[f"blocks.{i}.ffn_norm.weight"] = t(b + "ffn_norm.weight")
        state[f"blocks.{i}.attn.qkv.weight"] = qkv(b, "weight")
        if config["attn_bias"]:
            state[f"blocks.{i}.attn.qkv.bias"] = qkv(b, "bias")
        state[f"blocks.{i}.attn.o_proj.weight"] = t(b + "attn_output.weight")
        state[f"blocks.{i}.ffn.gate_up.weight"] = torch.cat([t(b + "ffn_gate.weight"), t(b + "ffn_up.weight")])
        state[f"blocks.{i}.ffn.down.weight"] = t(b + "ffn_down.weight")
    return state


def gguf_hparams(writer, cfg: LlamaConfig) -> None:
    """Metadata beyond the sizes every GGUF holds (models/gguf_export.py)."""
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    for key in ROPE_SCALING_KEYS if cfg.rope_scaling else ():  # see rope_factors
        add = writer.add_uint32 if key == "original_context_length" else writer.add_float32
        add(f"harness.rope_scaling.{key}", cfg.rope_scaling[key])


def gguf_tensors(cfg: LlamaConfig, s: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """gguf_state's inverse: (llama.cpp name, tensor) in the order its converter writes them."""
    if (factors := rope_factors(cfg)) is not None:
        yield "rope_freqs.weight", factors
    sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    for i in range(cfg.n_layers):
        b, g = f"blocks.{i}.", f"blk.{i}."
        yield g + "attn_norm.weight", s[b + "attn_norm.weight"]
        for suffix in ("weight", "bias"):
            if b + f"attn.qkv.{suffix}" not in s:
                continue
            q, k, v = s[b + f"attn.qkv.{suffix}"].split(sizes)
            yield g + f"attn_q.{suffix}", permute_rope(q, cfg.n_heads)
            yield g + f"attn_k.{suffix}", permute_rope(k, cfg.n_kv_heads)
            yield g + f"attn_v.{suffix}", v
        yield g + "attn_output.weight", s[b + "attn.o_proj.weight"]
        yield g + "ffn_norm.weight", s[b + "ffn_norm.weight"]
        gate, up = s[b + "ffn.gate_up.weight"].chunk(2)
        yield g + "ffn_gate.weight", gate
        yield g + "ffn_up.weight", up
        yield g + "ffn_down.weight", s[b + "ffn.down.weight"]
    yield "output_norm.weight", s["final_norm.weight"]


def model_info(cfg: LlamaConfig) -> dict:
    """Ollama's model_info keys beyond the common ones (harness/serve/engine.py), unprefixed."""
    return {"attention.head_count_kv": cfg.n_kv_heads, "feed_forward_length": cfg.d_ff, "rope.freq_base": cfg.rope_base}
