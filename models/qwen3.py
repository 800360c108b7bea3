"""Qwen3: the Llama architecture (models/llama.py) plus an RMSNorm over each query and key head
(q_norm/k_norm, over head_dim, before RoPE), no q/k/v biases, and a head size that is a config value
of its own: Qwen3-0.6B runs 16 heads of 128 on a 1024-wide residual, so head_dim != d_model / n_heads.

Everything else (SwiGLU, RoPE, GQA, the KV cache, hidden_states/logits/new_cache) is Llama's, reused
by subclassing, so the two cannot drift apart. The HF/GGUF tensor-name maps here also serve Qwen2
(models/qwen2.py), whose tensors are these minus the QK norms plus q/k/v biases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from models.checkpoint import CheckpointError, from_hf_hook
from models.llama import Attention, Block, Llama


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    context_length: int = 40960
    d_model: int = 1024
    n_layers: int = 28
    n_heads: int = 16
    n_kv_heads: int = 8
    head_dim: int = 128          # explicit, not d_model // n_heads
    d_ff: int = 3072
    rope_base: float = 1000000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    attn_bias: bool = False      # Qwen3 has none; kept so a fine-tune that adds them still loads
    num_classes: int = 0         # > 0: classifier head (see models.gpt.GPTConfig)
    # Read by llama.rope_frequencies. Not a field: Qwen3's only scaling option is YaRN, which is not
    # implemented, so config_from_hf refuses it instead of silently ignoring it.
    rope_scaling = None


Config = Qwen3Config

# From the published config.json files (all: vocab 151936, RoPE θ 1e6, RMSNorm eps 1e-6, 40960 positions).
_QWEN3 = dict(vocab_size=151936, context_length=40960, head_dim=128, rope_base=1000000.0, norm_eps=1e-6)
NAMED_CONFIGS: dict[str, dict] = {
    "qwen3-0.6b": _QWEN3 | dict(d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, d_ff=3072, tie_embeddings=True),
    "qwen3-1.7b": _QWEN3 | dict(d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8, d_ff=6144, tie_embeddings=True),
    "qwen3-4b": _QWEN3 | dict(d_model=2560, n_layers=36, n_heads=32, n_kv_heads=8, d_ff=9728, tie_embeddings=True),
    "qwen3-8b": _QWEN3 | dict(d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, d_ff=12288, tie_embeddings=False),
    "qwen3-14b": _QWEN3 | dict(d_model=5120, n_layers=40, n_heads=40, n_kv_heads=8, d_ff=17408, tie_embeddings=False),
    # Random-init test model: GPT-2's vocabulary size (the registry pairs "init" models with that
    # tokenizer) and a head size (32) that is not d_model / n_heads (16).
    "qwen3-tiny": dict(vocab_size=50257, context_length=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=32, d_ff=176, rope_base=1000000.0, norm_eps=1e-6, tie_embeddings=True),
}


class QKNormAttention(Attention):
    """Llama attention with each query and key head RMS-normalised (learned scale over head_dim)
    before RoPE: it bounds the attention logits, which is what Qwen2's q/k/v biases were not doing.
    Gemma 3's attention is this with its own RMSNorm (1 + w), scale and window (models/gemma3.py)."""
    norm_class: type[nn.Module] = nn.RMSNorm

    def __init__(self, cfg: Qwen3Config):
        super().__init__(cfg)
        self.q_norm = self.norm_class(cfg.head_dim, eps=cfg.norm_eps)
        self.k_norm = self.norm_class(cfg.head_dim, eps=cfg.norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)                                     # over D, per head


class Qwen3Block(Block):
    attn_class = QKNormAttention


class Qwen3(Llama):
    architecture = "qwen3"
    block_class = Qwen3Block


Model = Qwen3


# --- Hugging Face config.json and tensors --------------------------------------------------------

HF_MODEL_TYPES = ("qwen3",)
# Our config keys -> HF config.json's, to name the file's own key when a value is refused.
HF_KEYS = {"vocab_size": "vocab_size", "context_length": "max_position_embeddings", "d_model": "hidden_size",
           "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
           "head_dim": "head_dim", "d_ff": "intermediate_size", "norm_eps": "rms_norm_eps", "rope_base": "rope_theta"}


def hf_rope_theta(cfg: dict) -> float:
    """RoPE base of an HF config (transformers >= 5 writes rope_parameters, older rope_theta); any
    scaling (YaRN, the Qwen long-context option) is refused: it is not implemented."""
    rope = cfg.get("rope_parameters") or {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta")}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise CheckpointError(f"RoPE scaling {kind!r} is not supported (only plain RoPE)")
    theta = rope.get("rope_theta")
    return 10000.0 if theta is None else float(theta)    # transformers' default


def hf_check_no_sliding(cfg: dict) -> None:
    if cfg.get("use_sliding_window"):
        raise CheckpointError(f"{cfg.get('model_type')} with use_sliding_window=true is not supported")


def config_from_hf(cfg: dict) -> Qwen3Config:
    """Our config from a Qwen3 config.json (as a dict); missing keys take transformers' defaults."""
    hf_check_no_sliding(cfg)
    n_heads = cfg["num_attention_heads"]
    return Qwen3Config(
        vocab_size=cfg["vocab_size"], context_length=cfg["max_position_embeddings"], d_model=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim", 128) or cfg["hidden_size"] // n_heads, d_ff=cfg["intermediate_size"],
        rope_base=hf_rope_theta(cfg), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), attn_bias=bool(cfg.get("attention_bias", False)))


def convert_llama_family(state: dict[str, torch.Tensor], config, qk_norm: bool) -> dict[str, torch.Tensor]:
    """HF Llama-family tensor names -> ours, fusing q/k/v and gate/up into one matmul each.
    A tied checkpoint's lm_head (transformers' state_dict lists it) is the embedding: dropped."""
    hf = {k.removeprefix("model."): v for k, v in state.items()}
    out = {"tok_emb.weight": hf["embed_tokens.weight"], "final_norm.weight": hf["norm.weight"]}
    if not config.tie_embeddings:
        out["head.weight"] = hf["lm_head.weight"]
    for i in range(config.n_layers):
        p, a, m, b = f"layers.{i}.", f"layers.{i}.self_attn.", f"layers.{i}.mlp.", f"blocks.{i}."
        out[b + "attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[b + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[b + "attn.qkv.weight"] = torch.cat([hf[a + f"{x}_proj.weight"] for x in "qkv"])   # [(H+2Hkv)D, d]
        if config.attn_bias:
            out[b + "attn.qkv.bias"] = torch.cat([hf[a + f"{x}_proj.bias"] for x in "qkv"])
        if qk_norm:
            out[b + "attn.q_norm.weight"] = hf[a + "q_norm.weight"]
            out[b + "attn.k_norm.weight"] = hf[a + "k_norm.weight"]
        out[b + "attn.o_proj.weight"] = hf[a + "o_proj.weight"]
        out[b + "ffn.gate_up.weight"] = torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]])
        out[b + "ffn.down.weight"] = hf[m + "down_proj.weight"]
    return out


def convert_hf(state: dict[str, torch.Tensor], config: Qwen3Config) -> dict[str, torch.Tensor]:
    return convert_llama_family(state, config, qk_norm=True)


from_hf = from_hf_hook(config_from_hf, convert_hf)


# --- GGUF (llama.cpp's qwen2 / qwen3 architectures; the "qwen3" entry of models/architectures.py) ----

GGUF_ARCH = "qwen3"


def gguf_float(v) -> float:
    """A GGUF float32 field as the decimal it was written from (1e-06, not 9.99999997e-07): the
    shortest repr that round-trips through float32 is the same float32, so nothing changes but the
    config's printout and equality with the HF config's."""
    return float(str(np.float32(v)))


def gguf_llama_family_config(header, config: dict) -> dict:
    """`config` (the sizes every GGUF gives) completed from a qwen2/qwen3 GGUF's metadata."""
    kind = header.get("rope.scaling.type", "none")
    if kind not in ("none", None):
        raise CheckpointError(f"{header.path}: {header.arch} GGUF with RoPE scaling {kind!r} is not supported "
                              "(only plain RoPE)")
    return config | dict(n_kv_heads=int(header.get("attention.head_count_kv", config["n_heads"])),
                         d_ff=header.get("feed_forward_length"),
                         rope_base=gguf_float(header.get("rope.freq_base", 10000.0)),
                         norm_eps=gguf_float(header.get("attention.layer_norm_rms_epsilon", 1e-6)),
                         attn_bias="blk.0.attn_q.bias" in header.shapes)


def gguf_config(header, config: dict) -> dict:
    config = gguf_llama_family_config(header, config)
    return config | dict(head_dim=int(header.get("attention.key_length", config["d_model"] // config["n_heads"])))


# ours under blocks.N. -> llama.cpp's under blk.N. (q/k/v and gate/up are fused: see below)
_LAYER = {"attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
          "attn.o_proj.weight": "attn_output.weight", "ffn.down.weight": "ffn_down.weight"}
_QK_NORM = {"attn.q_norm.weight": "attn_q_norm.weight", "attn.k_norm.weight": "attn_k_norm.weight"}


def gguf_llama_family_state(config: dict, t, qk_norm: bool) -> dict[str, torch.Tensor]:
    """Our state but embedding and head from llama.cpp tensor names. llama.cpp permutes q/k rows only
    for its `llama` arch (interleaved RoPE); qwen2/qwen3 use the NEOX (half-split) RoPE, as we do, and
    are stored unpermuted."""
    state = {"final_norm.weight": t("output_norm.weight")}
    for i in range(config["n_layers"]):
        g, b = f"blk.{i}.", f"blocks.{i}."
        for ours, theirs in (_LAYER | (_QK_NORM if qk_norm else {})).items():
            state[b + ours] = t(g + theirs)
        state[b + "attn.qkv.weight"] = torch.cat([t(g + f"attn_{x}.weight") for x in "qkv"])
        if config["attn_bias"]:
            state[b + "attn.qkv.bias"] = torch.cat([t(g + f"attn_{x}.bias") for x in "qkv"])
        state[b + "ffn.gate_up.weight"] = torch.cat([t(g + "ffn_gate.weight"), t(g + "ffn_up.weight")])
    return state


def gguf_state(config: dict, t) -> dict[str, torch.Tensor]:
    return gguf_llama_family_state(config, t, qk_norm=True)


def gguf_llama_family_tensors(cfg, s: dict, qk_norm: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """gguf_llama_family_state's inverse, in the order llama.cpp's converter writes them."""
    sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    for i in range(cfg.n_layers):
        b, g = f"blocks.{i}.", f"blk.{i}."
        yield g + "attn_norm.weight", s[b + "attn_norm.weight"]
        for suffix in ("weight", "bias"):
            if b + f"attn.qkv.{suffix}" in s:
                yield from zip((g + f"attn_{x}.{suffix}" for x in "qkv"), s[b + f"attn.qkv.{suffix}"].split(sizes))
        for ours, theirs in (_QK_NORM if qk_norm else {}).items():
            yield g + theirs, s[b + ours]
        yield g + "attn_output.weight", s[b + "attn.o_proj.weight"]
        yield g + "ffn_norm.weight", s[b + "ffn_norm.weight"]
        yield from zip((g + "ffn_gate.weight", g + "ffn_up.weight"), s[b + "ffn.gate_up.weight"].chunk(2))
        yield g + "ffn_down.weight", s[b + "ffn.down.weight"]
    yield "output_norm.weight", s["final_norm.weight"]


def gguf_tensors(cfg: Qwen3Config, s: dict) -> Iterator[tuple[str, torch.Tensor]]:
    return gguf_llama_family_tensors(cfg, s, qk_norm=True)


def gguf_hparams(writer, cfg) -> None:
    """Metadata beyond the sizes every GGUF holds (models/gguf_export.py); qwen2 and qwen3 alike."""
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)


def model_info(cfg) -> dict:
    """Ollama's model_info keys beyond the common ones (harness/serve/engine.py), unprefixed."""
    return {"attention.head_count_kv": cfg.n_kv_heads, "attention.key_length": cfg.head_dim,
            "feed_forward_length": cfg.d_ff, "rope.freq_base": cfg.rope_base}
