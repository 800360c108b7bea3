"""Reading GGUF files (llama.cpp's format) into our models: the inverse of models/gguf_export.py.

The metadata gives the config, the header the tensor shapes; both are checked against each other
(models/shapes.py) before any tensor is dequantized, so inconsistent metadata cannot allocate a model
of its size. Tensors are mapped onto our names with torch ops that meta tensors go through too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.checkpoint import CheckpointError, float_or_raw, gguf_field, open_gguf
from models.llama import LlamaConfig, rope_frequencies


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter interleaves q/k rows for its RoPE; undo it for the half-split layout.
    (torch ops, so that meta tensors go through it too.)"""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_rope_scaling(reader, rope_freqs: torch.Tensor | None, config: dict, path: Path) -> dict | None:
    """Llama-3 RoPE scaling. llama.cpp keeps only per-frequency factors (rope_freqs); files from
    models/gguf_export.py also carry the parameters (harness.rope_scaling.*), checked against them."""
    if rope_freqs is None:
        return None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")
    scaling = {k: gguf_field(reader, f"harness.rope_scaling.{k}") for k in keys}
    if any(v is None for v in scaling.values()):
        raise CheckpointError(f"{path}: GGUF rope frequency factors (Llama 3.1 long context) are not supported yet")
    scaling["original_context_length"] = int(scaling["original_context_length"])
    plain = LlamaConfig(**config | {"rope_scaling": None})
    factors = rope_frequencies(plain) / rope_frequencies(LlamaConfig(**config | {"rope_scaling": scaling}))
    if not np.allclose(rope_freqs.numpy(), factors.numpy(), rtol=1e-5):
        raise CheckpointError(f"{path}: rope_freqs does not match its harness.rope_scaling parameters")
    return scaling


def _gguf_config(arch: str, g, shapes: dict[str, tuple]) -> dict:
    """Our config from the GGUF metadata and tensor shapes (gguf arch llama or gpt2)."""
    config = dict(vocab_size=int(shapes["token_embd.weight"][0]), context_length=g("context_length"),
                  d_model=g("embedding_length"), n_layers=g("block_count"), n_heads=g("attention.head_count"),
                  tie_embeddings="output.weight" not in shapes)
    if arch == "gpt2":
        return config | dict(norm_eps=float_or_raw(g("attention.layer_norm_epsilon", 1e-5)))
    return config | dict(n_kv_heads=g("attention.head_count_kv", config["n_heads"]), d_ff=g("feed_forward_length"),
                         rope_base=float_or_raw(g("rope.freq_base", 10000.0)),
                         norm_eps=float_or_raw(g("attention.layer_norm_rms_epsilon", 1e-5)),
                         attn_bias="blk.0.attn_q.bias" in shapes, rope_scaling=None)


def _gguf_state(arch: str, config: dict, t) -> dict[str, torch.Tensor]:
    """Our state_dict from GGUF tensors; t(name) -> tensor (a meta tensor for shapes alone)."""
    state = {"tok_emb.weight": t("token_embd.weight"), "final_norm.weight": t("output_norm.weight")}
    if not config["tie_embeddings"]:
        state["head.weight"] = t("output.weight")
    if arch == "gpt2":  # llama.cpp's gpt2 layout: fused attn_qkv, Linear weights [out, in] as ours
        state |= {"pos_emb.weight": t("position_embd.weight"), "final_norm.bias": t("output_norm.bias")}
        pairs = {"attn_norm": "ln1", "attn_qkv": "attn.qkv", "attn_output": "attn.proj",
                 "ffn_norm": "ln2", "ffn_up": "mlp.fc", "ffn_down": "mlp.proj"}
        for i in range(config["n_layers"]):
            for theirs, ours in pairs.items():
                for p in ("weight", "bias"):
                    state[f"blocks.{i}.{ours}.{p}"] = t(f"blk.{i}.{theirs}.{p}")
        return state
    heads = {"q": config["n_heads"], "k": config["n_kv_heads"]}
    qkv = lambda b, p: torch.cat([_unpermute(t(f"{b}attn_{x}.{p}"), heads[x]) if x in heads  # noqa: E731
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


def load_gguf(path: Path):
    """(architecture, config, state_dict) of a GGUF file. Its metadata is checked against the tensor
    shapes in its header (the reader memory-maps the file) before anything is dequantized."""
    from gguf.quants import dequantize

    from models.shapes import check_fits, make_config
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in ("llama", "gpt2"):
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama, gpt2)")
    ours = "gpt" if arch == "gpt2" else "llama"
    g = lambda key, default=None: gguf_field(reader, f"{arch}.{key}", default)  # noqa: E731
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # numpy order
    names = {k: f"{arch}.{v}" for k, v in (
        ("context_length", "context_length"), ("d_model", "embedding_length"), ("n_layers", "block_count"),
        ("n_heads", "attention.head_count"), ("n_kv_heads", "attention.head_count_kv"),
        ("d_ff", "feed_forward_length"), ("rope_base", "rope.freq_base"))} | {"vocab_size": "token_embd.weight rows"}

    def convert(t):
        try:
            return _gguf_state(arch, config, t)
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {e} missing from a {arch} GGUF") from None
        except RuntimeError as e:  # q/k rows that do not split into heads, or parts that do not concatenate
            raise CheckpointError(f"{path}: tensor shapes do not fit its metadata ({e})") from None

    try:
        config = _gguf_config(arch, g, shapes)
    except KeyError as e:
        raise CheckpointError(f"{path}: tensor {e} missing from a {arch} GGUF") from None
    make_config(ours, config, str(path), names)  # sizes first: the conversion loops over n_layers
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    check_fits(ours, config, convert(meta.__getitem__), f"{path}'s metadata", "its tensor data",
               "convert or export the file again", names)
    try:
        tensors = {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors}
    except Exception as e:
        raise CheckpointError(f"cannot dequantize {path}: {e}") from None
    # np.require copies read-only F32 memmaps, which torch cannot wrap.
    t = lambda name: torch.from_numpy(np.require(tensors[name], np.float32, ["C", "W"]))  # noqa: E731
    if ours == "llama":
        freqs = t("rope_freqs.weight") if "rope_freqs.weight" in tensors else None
        config["rope_scaling"] = _gguf_rope_scaling(reader, freqs, config, path)
    return ours, config, convert(t)
