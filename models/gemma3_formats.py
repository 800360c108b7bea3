"""Gemma 3's files (the model is models/gemma3.py): Hugging Face config.json and tensors, and GGUF as
llama.cpp's gemma3 architecture; the hooks of the "gemma3" entry of models/architectures.py."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from models.checkpoint import CheckpointError, from_hf_hook
from models.gemma3 import GLOBAL, LOCAL, Gemma3Config, default_layer_types
from models.qwen3 import gguf_float, gguf_hparams as qwen3_hparams

# --- Hugging Face config.json and tensors ------------------------------------------------------------

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
    types = list(cfg.get("layer_types") or default_layer_types(n_layers, pattern))
    if len(types) != n_layers or set(types) - {LOCAL, GLOBAL}:
        raise CheckpointError(f"gemma3 layer_types {types} is not one of {LOCAL!r}/{GLOBAL!r} per layer")
    return Gemma3Config(
        vocab_size=get("vocab_size"), context_length=get("max_position_embeddings"), d_model=get("hidden_size"),
        n_layers=n_layers, n_heads=get("num_attention_heads"), n_kv_heads=get("num_key_value_heads"),
        head_dim=get("head_dim"), d_ff=get("intermediate_size"), rope_base=float(glob.get("rope_theta", 1000000.0)),
        rope_local_base=float(local.get("rope_theta", 10000.0)),
        rope_scaling_factor=float(glob["factor"]) if _rope_kind(glob) == "linear" else 1.0,
        sliding_window=get("sliding_window"), layer_types=None if types == default_layer_types(n_layers) else types,
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


from_hf = from_hf_hook(config_from_hf, convert_hf)


# --- GGUF (llama.cpp's gemma3 architecture) ------------------------------------------------------------

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
        layer_types=None if types == default_layer_types(n_layers) else types,
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
    """Metadata beyond the sizes every GGUF holds (models/gguf_export.py): Qwen3's, then the local
    layers' window, pattern and RoPE base."""
    import gguf
    qwen3_hparams(writer, cfg)
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
    """Ollama's model_info keys beyond the common ones (harness/serve/engine.py), unprefixed."""
    return {"attention.head_count_kv": cfg.n_kv_heads, "attention.key_length": cfg.head_dim,
            "attention.sliding_window": cfg.sliding_window, "feed_forward_length": cfg.d_ff,
            "rope.freq_base": cfg.rope_base}
