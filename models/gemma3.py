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

The KV cache (models/cache.py) keeps every position for every layer; a local layer slices out the
keys inside its window and masks the rest, so a decoding step costs O(window) in those layers and
prompts longer than the window never attend past it. (A ring buffer for the local layers would also
bound their memory; not done.)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cache import KVCache, attention_mask
from models import decoder
from models.checkpoint import CheckpointError
from models.llama import apply_rope
from models.qwen3 import gguf_float

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

    def is_global(self, layer: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[layer] == GLOBAL
        return (layer + 1) % 6 == 0


Config = Gemma3Config

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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


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


class Attention(nn.Module):
    def __init__(self, cfg: Gemma3Config, local: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.window = cfg.sliding_window if local else None
        self.scale = cfg.query_pre_attn_scalar ** -0.5

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None, attn_mask: torch.Tensor | None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
        q, k = self.q_norm(q), self.k_norm(k)                                     # over D, per head
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)                   # [B, H(kv), T, D]
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.update(layer, k, v)                                      # [B, Hkv, past+T, D]
        is_causal = False
        if self.window is not None:
            k, v, attn_mask, is_causal = window_keys(k, v, attn_mask, past, T, self.window)
        elif attn_mask is None:
            attn_mask, is_causal = attention_mask(cache, T, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           scale=self.scale, enable_gqa=Hkv != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class GeGLU(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.gelu(gate, approximate="tanh") * up)


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


# --- Hugging Face config.json and tensors; GGUF (llama.cpp's gemma3 architecture) ----------------

HF_MODEL_TYPES = ("gemma3_text", "gemma3")    # gemma3: the multimodal wrapper, read for its text half
# Our config keys -> HF config.json's, to name the file's own key when a value is refused.
HF_KEYS = {"vocab_size": "vocab_size", "context_length": "max_position_embeddings", "d_model": "hidden_size",
           "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
           "head_dim": "head_dim", "d_ff": "intermediate_size", "norm_eps": "rms_norm_eps",
           "sliding_window": "sliding_window", "query_pre_attn_scalar": "query_pre_attn_scalar"}
# transformers' Gemma3TextConfig defaults: the multimodal config.json files list only what differs.
_HF_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096)


def _default_layer_types(n_layers: int, pattern: int = 6) -> list[str]:
    return [LOCAL if (i + 1) % pattern else GLOBAL for i in range(n_layers)]


def _rope_kind(p: dict) -> str:
    return p.get("rope_type", p.get("type", "default"))


def config_from_hf(cfg: dict) -> Gemma3Config:
    """Our config from a Gemma 3 config.json (as a dict). Both layouts: transformers >= 5's nested
    rope_parameters, and the published files' rope_theta / rope_local_base_freq / rope_scaling."""
    if cfg.get("model_type") == "gemma3":
        cfg = cfg.get("text_config") or {}
    get = lambda key: cfg.get(key, _HF_DEFAULTS[key])  # noqa: E731
    if (cfg.get("attn_logit_softcapping") is not None or cfg.get("use_bidirectional_attention")
            or cfg.get("attention_bias")):
        raise CheckpointError("gemma3 with attn_logit_softcapping, use_bidirectional_attention or attention_bias is not "
                         "supported (Gemma 3 text has none of them)")
    if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise CheckpointError(f"gemma3 hidden_activation={cfg['hidden_activation']!r} is not supported (tanh GELU only)")
    params = cfg.get("rope_parameters") or {}
    if GLOBAL in params or LOCAL in params:
        glob, local = params.get(GLOBAL) or {}, params.get(LOCAL) or {}
    else:  # rope_scaling applies to the global layers only (transformers' convert_rope_params_to_dict)
        glob = {"rope_theta": cfg.get("rope_theta", 1000000.0), **(params or cfg.get("rope_scaling") or {})}
        local = {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    if _rope_kind(local) != "default" or _rope_kind(glob) not in ("default", "linear"):
        raise CheckpointError(f"gemma3 RoPE {_rope_kind(glob)!r} (global) / {_rope_kind(local)!r} (local) is not "
                         "supported (plain, or linear on the global layers)")
    n_layers = get("num_hidden_layers")
    pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
    types = list(cfg.get("layer_types") or _default_layer_types(n_layers, pattern))
    if len(types) != n_layers or set(types) - {LOCAL, GLOBAL}:
        raise CheckpointError(f"gemma3 layer_types {types} is not one of {LOCAL!r}/{GLOBAL!r} per layer")
    return Gemma3Config(
        vocab_size=get("vocab_size"), context_length=get("max_position_embeddings"), d_model=get("hidden_size"),
        n_layers=n_layers, n_heads=get("num_attention_heads"), n_kv_heads=get("num_key_value_heads"),
        head_dim=get("head_dim"), d_ff=get("intermediate_size"), rope_base=float(glob.get("rope_theta", 1000000.0)),
        rope_local_base=float(local.get("rope_theta", 10000.0)),
        rope_scaling_factor=float(glob["factor"]) if _rope_kind(glob) == "linear" else 1.0,
        sliding_window=get("sliding_window"), layer_types=None if types == _default_layer_types(n_layers) else types,
        query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
        final_logit_softcapping=cfg.get("final_logit_softcapping"), norm_eps=float(get("rms_norm_eps")),
        tie_embeddings=bool(get("tie_word_embeddings")))


# Ours (under blocks.N.) -> (HF name under layers.N., llama.cpp name under blk.N.).
_LAYER = {
    "attn_norm.weight": ("input_layernorm.weight", "attn_norm.weight"),
    "post_attn_norm.weight": ("post_attention_layernorm.weight", "post_attention_norm.weight"),
    "ffn_norm.weight": ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    "post_ffn_norm.weight": ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
    "attn.q_norm.weight": ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    "attn.k_norm.weight": ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    "attn.o_proj.weight": ("self_attn.o_proj.weight", "attn_output.weight"),
    "ffn.down.weight": ("mlp.down_proj.weight", "ffn_down.weight"),
}
_FUSED = {   # one matmul each: parts concatenated along the output rows
    "attn.qkv.weight": ([f"self_attn.{x}_proj.weight" for x in "qkv"], [f"attn_{x}.weight" for x in "qkv"]),
    "ffn.gate_up.weight": (["mlp.gate_proj.weight", "mlp.up_proj.weight"], ["ffn_gate.weight", "ffn_up.weight"]),
}
_TOP = (("embed_tokens.weight", "norm.weight", "lm_head.weight"),
        ("token_embd.weight", "output_norm.weight", "output.weight"))


def _state(config: Gemma3Config, get, col: int, norm_shift: float) -> dict[str, torch.Tensor]:
    """Our state from a checkpoint's tensors (GGUF: but embedding and head): get(name) reads one; col 0 =
    HF names, 1 = GGUF names.
    norm_shift is subtracted from every norm weight (GGUF stores 1 + w)."""
    shift = (lambda w: w - norm_shift) if norm_shift else (lambda w: w)  # noqa: E731
    emb, norm, head = _TOP[col]
    state = {"final_norm.weight": shift(get(norm))}
    if col == 0:   # the GGUF loader reads token_embd and output itself
        state["tok_emb.weight"] = get(emb)
        if not config.tie_embeddings:
            state["head.weight"] = get(head)
    for i in range(config.n_layers):
        p, b = ("layers.{}.", "blk.{}.")[col].format(i), f"blocks.{i}."
        for ours, names in _LAYER.items():
            w = get(p + names[col])
            state[b + ours] = shift(w) if ours.endswith("norm.weight") else w
        for ours, parts in _FUSED.items():
            state[b + ours] = torch.cat([get(p + n) for n in parts[col]])
    return state


def convert_hf(state: dict[str, torch.Tensor], config: Gemma3Config) -> dict[str, torch.Tensor]:
    """HF tensor names -> ours. The text model sits under model. (Gemma3ForCausalLM) or under
    model.language_model. / language_model.model. (the multimodal checkpoints, vision tensors ignored)."""
    emb = next((k for k in state if k.endswith("embed_tokens.weight") and "vision" not in k),
               "model.embed_tokens.weight")
    prefix = emb[: -len("embed_tokens.weight")]
    hf = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    hf |= {"lm_head.weight": v for k, v in state.items() if k.endswith("lm_head.weight")}
    return _state(config, hf.__getitem__, 0, 0.0)


def from_hf(cfg: dict, folder) -> tuple[dict, Callable[[dict], dict]]:
    """The registry's hook: (our config as a dict, HF state_dict -> ours)."""
    config = config_from_hf(cfg)
    return asdict(config), lambda state: convert_hf(state, config)


GGUF_ARCH = "gemma3"


def gguf_config(header, config: dict) -> dict:
    """`config` (the sizes every GGUF gives) completed from a gemma3 GGUF, read as llama.cpp reads it:
    - the local RoPE base (10k) and the 5-local-1-global pattern are llama.cpp constants, used unless
      the newer rope.freq_base_swa / attention.sliding_window_pattern keys say otherwise;
    - query_pre_attn_scalar is not stored: llama.cpp scales by head_dim**-0.5, except for the
      27B (62 layers), d_model / n_heads (168), which is what the HF configs say too. Our exporter
      writes harness.query_pre_attn_scalar when a model has another (ignored by llama.cpp)."""
    g = header.get
    n_layers, head_dim = config["n_layers"], int(g("attention.key_length", 256))
    pattern = g("attention.sliding_window_pattern", 6)
    if isinstance(pattern, int | np.integer):                 # llama.cpp's set_swa_pattern(n)
        local = [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers)]
    else:                                                     # or one flag per layer, true = sliding
        local = [bool(x) for x in pattern]
    types = [LOCAL if x else GLOBAL for x in local]
    kind = g("rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise CheckpointError(f"{header.path}: gemma3 GGUF with RoPE scaling {kind!r} is not supported (only linear)")
    softcap = g("final_logit_softcapping")
    scalar = header.field("harness.query_pre_attn_scalar")
    if scalar is None:
        scalar = config["d_model"] // config["n_heads"] if n_layers == 62 else head_dim
    return config | dict(
        n_kv_heads=int(g("attention.head_count_kv", config["n_heads"])), head_dim=head_dim,
        d_ff=g("feed_forward_length"), rope_base=gguf_float(g("rope.freq_base", 10000.0)),
        rope_local_base=gguf_float(g("rope.freq_base_swa", 10000.0)),
        rope_scaling_factor=gguf_float(g("rope.scaling.factor", 1.0)) if kind == "linear" else 1.0,
        sliding_window=g("attention.sliding_window"),
        layer_types=None if types == _default_layer_types(n_layers) else types,
        query_pre_attn_scalar=gguf_float(scalar),
        final_logit_softcapping=None if softcap is None else gguf_float(softcap),
        norm_eps=gguf_float(g("attention.layer_norm_rms_epsilon", 1e-6)))


def gguf_state(config: dict, t) -> dict[str, torch.Tensor]:
    """Our tensors but embedding and head from llama.cpp names. Its converter stores every norm as
    1 + w (so 1 is subtracted here) and q/k unpermuted (NEOX RoPE)."""
    return _state(Gemma3Config(**config), t, 1, 1.0)


def gguf_tensors(cfg: Gemma3Config, s: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """gguf_state's inverse: norms stored as 1 + w, fused matmuls split."""
    for i in range(cfg.n_layers):
        b, g = f"blocks.{i}.", f"blk.{i}."
        for ours, parts in _FUSED.items():
            yield from zip((g + n for n in parts[1]), _split(cfg, ours, s[b + ours]))
        for ours, names in _LAYER.items():
            w = s[b + ours]
            yield g + names[1], w + 1 if ours.endswith("norm.weight") else w
    yield "output_norm.weight", s["final_norm.weight"] + 1


def _split(cfg: Gemma3Config, ours: str, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if ours == "attn.qkv.weight":
        return w.split([cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim])
    return w.chunk(2)


def gguf_hparams(writer, cfg: Gemma3Config) -> None:
    """Metadata beyond the sizes every GGUF holds (models/gguf_export.py)."""
    import gguf
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_float32(f"{GGUF_ARCH}.rope.freq_base_swa", cfg.rope_local_base)
    writer.add_sliding_window(cfg.sliding_window)
    if cfg.layer_types is not None:
        writer.add_array(f"{GGUF_ARCH}.attention.sliding_window_pattern", [t == LOCAL for t in cfg.layer_types])
    if cfg.rope_scaling_factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
    if cfg.final_logit_softcapping is not None:
        writer.add_float32(f"{GGUF_ARCH}.final_logit_softcapping", cfg.final_logit_softcapping)
    if cfg.query_pre_attn_scalar != (cfg.d_model // cfg.n_heads if cfg.n_layers == 62 else cfg.head_dim):
        writer.add_float32("harness.query_pre_attn_scalar", cfg.query_pre_attn_scalar)


def model_info(cfg: Gemma3Config) -> dict:
    """Ollama's model_info keys beyond the common ones (harness/serve_engine.py), unprefixed."""
    return {"attention.head_count_kv": cfg.n_kv_heads, "attention.key_length": cfg.head_dim,
            "attention.sliding_window": cfg.sliding_window, "feed_forward_length": cfg.d_ff,
            "rope.freq_base": cfg.rope_base}
