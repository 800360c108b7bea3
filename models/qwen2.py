"""Qwen2 / Qwen2.5: exactly the Llama architecture with biases on the q/k/v projections (none on the
output projection), RoPE θ 1e6, and the embedding tied to the head up to 3B. models/llama.py already
has `attn_bias`, so the model is Llama's with LlamaConfig presets. It is an architecture entry of its
own ("qwen2") only for its files: llama.cpp stores qwen2 q/k rows unpermuted (NEOX RoPE), unlike its
`llama` layout, so a qwen2 GGUF must be read, and exported, by these maps, not Llama's.
The tensor-name maps are shared with Qwen3 (models/qwen3.py), whose tensors add only the QK norms.
"""
from __future__ import annotations

from typing import Iterator

import torch

from models.checkpoint import CheckpointError, from_hf_hook
from models.llama import HF_KEYS, Llama, LlamaConfig  # noqa: F401 (HF_KEYS: the registry entry's)
from models.qwen3 import (convert_llama_family, gguf_hparams, gguf_llama_family_config,  # noqa: F401
                          gguf_llama_family_state, gguf_llama_family_tensors, hf_check_no_sliding, hf_rope_theta)


class Qwen2(Llama):
    architecture = "qwen2"


Config = LlamaConfig
Model = Qwen2

# From the published config.json files. context_length is the 32k the models are trained for: the
# 1.5B/7B files say 131072, reachable only with YaRN, which is not implemented (and whose RoPE
# tables would be 4x larger for nothing).
_QWEN25 = dict(context_length=32768, rope_base=1000000.0, norm_eps=1e-6, attn_bias=True)
NAMED_CONFIGS: dict[str, dict] = {
    "qwen2.5-0.5b": _QWEN25 | dict(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                                   d_ff=4864, tie_embeddings=True),
    "qwen2.5-1.5b": _QWEN25 | dict(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                                   d_ff=8960, tie_embeddings=True),
    "qwen2.5-3b": _QWEN25 | dict(vocab_size=151936, d_model=2048, n_layers=36, n_heads=16, n_kv_heads=2,
                                 d_ff=11008, tie_embeddings=True),
    "qwen2.5-7b": _QWEN25 | dict(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                                 d_ff=18944, tie_embeddings=False),
    "qwen2-tiny": dict(vocab_size=50257, context_length=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       d_ff=176, rope_base=1000000.0, norm_eps=1e-6, tie_embeddings=True, attn_bias=True),
}

HF_MODEL_TYPES = ("qwen2",)


def config_from_hf(cfg: dict) -> LlamaConfig:
    """Our config from a Qwen2/Qwen2.5 config.json (as a dict); missing keys take transformers' defaults."""
    hf_check_no_sliding(cfg)
    n_heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // n_heads):
        raise CheckpointError(f"qwen2 head_dim={cfg['head_dim']} is not hidden_size / num_attention_heads")
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], context_length=cfg["max_position_embeddings"], d_model=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        d_ff=cfg["intermediate_size"], rope_base=hf_rope_theta(cfg), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), attn_bias=True)


def convert_hf(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    return convert_llama_family(state, config, qk_norm=False)


from_hf = from_hf_hook(config_from_hf, convert_hf)


GGUF_ARCH = "qwen2"


def gguf_config(header, config: dict) -> dict:
    return gguf_llama_family_config(header, config) | dict(rope_scaling=None)


def gguf_state(config: dict, t) -> dict[str, torch.Tensor]:
    return gguf_llama_family_state(config, t, qk_norm=False)


def gguf_tensors(cfg: LlamaConfig, s: dict) -> Iterator[tuple[str, torch.Tensor]]:
    return gguf_llama_family_tensors(cfg, s, qk_norm=False)


def model_info(cfg: LlamaConfig) -> dict:
    return {"attention.head_count_kv": cfg.n_kv_heads, "feed_forward_length": cfg.d_ff, "rope.freq_base": cfg.rope_base}
