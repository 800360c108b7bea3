"""Loading and saving weights: our checkpoint folders, Hugging Face safetensors, and GGUF.

Every loader returns (architecture, config dataclass, state_dict in our tensor names). Pickles are
never loaded: a `.bin`/`.pt`/`.pth` file is refused with a message saying how to convert it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness.cli import UserError
from models.gpt import GPT, GPTConfig
from models.llama import Llama, LlamaConfig

ARCHITECTURES = {"gpt": (GPTConfig, GPT), "llama": (LlamaConfig, Llama)}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(UserError):
    """A model file that is corrupt, truncated, unsafe or does not fit the architecture."""


def build_model(architecture: str, config: dict | GPTConfig | LlamaConfig) -> torch.nn.Module:
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    config_cls, model_cls = ARCHITECTURES[architecture]
    if isinstance(config, dict):
        config = config_cls(**config)
    return model_cls(config)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a message that names what does not fit (another architecture's checkpoint)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names
        )
        raise CheckpointError(f"{source} does not fit a {model.architecture} model of this config ({detail})")
    model.load_state_dict(state, strict=True)


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # SafetensorError, OSError: truncated or not a safetensors file
            raise CheckpointError(f"cannot read {f}: {e} (truncated or not a safetensors file?)") from None
    return state


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{folder} holds {pickles[0]}, a pickle; refusing to load pickles. Convert it with "
                              "safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')")
    raise CheckpointError(f"{folder} has no model.safetensors")


# --- our own checkpoint folder -------------------------------------------------------------------

def read_labels(folder: Path) -> list[str] | None:
    meta = json.loads((folder / "config.json").read_text())
    return meta.get("labels")


def load_native(folder: Path):
    meta = json.loads((folder / "config.json").read_text())
    return meta["architecture"], meta["config"], _read_safetensors(_safetensors_files(folder))


def save_checkpoint(folder: str | Path, model: torch.nn.Module, tokenizer, provenance: dict,
                    overwrite: bool = False, labels: list[str] | None = None) -> Path:
    """Write model.safetensors + config.json + tokenizer files + provenance.json atomically: into a
    temporary sibling folder first, renamed into place only when complete."""
    from dataclasses import asdict
    from safetensors.torch import save_file
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CheckpointError(f"{folder} already exists; choose another output folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        meta = {"architecture": model.architecture, "config": asdict(model.config)}
        if labels:  # a classifier's class names, in head order
            meta["labels"] = list(labels)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        tokenizer.save(tmp)
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


# --- Hugging Face safetensors folders ------------------------------------------------------------

def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def convert_hf_gpt2(hf: dict, n_layers: int) -> dict[str, torch.Tensor]:
    """HF GPT-2 stores Linear layers as Conv1D ([in, out]); ours are nn.Linear ([out, in])."""
    hf = _strip(hf, "transformer.")
    out = {"tok_emb.weight": hf["wte.weight"], "pos_emb.weight": hf["wpe.weight"],
           "final_norm.weight": hf["ln_f.weight"], "final_norm.bias": hf["ln_f.bias"]}
    pairs = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
             "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    for i in range(n_layers):
        for theirs, ours in pairs.items():
            w = hf[f"h.{i}.{theirs}.weight"]
            out[f"blocks.{i}.{ours}.weight"] = w if theirs.startswith("ln") else w.t().contiguous()
            out[f"blocks.{i}.{ours}.bias"] = hf[f"h.{i}.{theirs}.bias"]
    return out


def convert_hf_llama(hf: dict, n_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    hf = _strip(hf, "model.")
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


def load_hf(folder: Path):
    cfg = json.loads((folder / "config.json").read_text())
    state = _read_safetensors(_safetensors_files(folder))
    kind = cfg.get("model_type")
    try:
        if kind == "gpt2":
            config = dict(vocab_size=cfg["vocab_size"], context_length=cfg["n_positions"], d_model=cfg["n_embd"],
                          n_layers=cfg["n_layer"], n_heads=cfg["n_head"], norm_eps=cfg.get("layer_norm_epsilon", 1e-5))
            return "gpt", config, convert_hf_gpt2(state, cfg["n_layer"])
        if kind in ("llama", "mistral"):
            # transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling.
            rope = cfg.get("rope_parameters") or {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 10000.0)}
            scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
            if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
                raise CheckpointError(f"{folder}: rope_scaling {scaling} is not supported (only llama3)")
            if scaling:
                scaling = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor")} | {
                    "original_context_length": scaling["original_max_position_embeddings"]}
            tied = bool(cfg.get("tie_word_embeddings", False))
            config = dict(vocab_size=cfg["vocab_size"], context_length=cfg["max_position_embeddings"],
                          d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                          n_heads=cfg["num_attention_heads"],
                          n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                          d_ff=cfg["intermediate_size"], rope_base=float(rope.get("rope_theta", 10000.0)),
                          rope_scaling=scaling, norm_eps=cfg.get("rms_norm_eps", 1e-5),
                          tie_embeddings=tied, attn_bias=bool(cfg.get("attention_bias", False)))
            return "llama", config, convert_hf_llama(state, cfg["num_hidden_layers"], tied)
    except KeyError as e:
        raise CheckpointError(f"{folder}: tensor or config key {e} missing for a {kind} checkpoint") from None
    raise CheckpointError(f"{folder}: model_type {kind!r} is not supported (gpt2, llama, mistral)")


# --- GGUF ----------------------------------------------------------------------------------------

def open_gguf(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated files fail inside numpy memmap / struct parsing
        raise CheckpointError(f"cannot read GGUF file {path}: {e} (truncated or not a GGUF file?)") from None


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves q/k rows for its RoPE; undo it for the half-split layout."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_rope_scaling(reader, tensors: dict, config: dict, path: Path) -> dict | None:
    """Llama-3 RoPE scaling. llama.cpp keeps only per-frequency factors (rope_freqs); files from
    models/gguf_export.py also carry the parameters (harness.rope_scaling.*), checked against them."""
    if "rope_freqs.weight" not in tensors:
        return None
    from models.llama import rope_frequencies
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")
    scaling = {k: gguf_field(reader, f"harness.rope_scaling.{k}") for k in keys}
    if any(v is None for v in scaling.values()):
        raise CheckpointError(f"{path}: GGUF rope frequency factors (Llama 3.1 long context) are not supported yet")
    scaling["original_context_length"] = int(scaling["original_context_length"])
    cfg = LlamaConfig(**config, rope_scaling=scaling)
    factors = rope_frequencies(LlamaConfig(**config)) / rope_frequencies(cfg)
    if not np.allclose(tensors["rope_freqs.weight"], factors.numpy(), rtol=1e-5):
        raise CheckpointError(f"{path}: rope_freqs does not match its harness.rope_scaling parameters")
    return scaling


def _gguf_gpt2(g, tensors: dict, t) -> tuple[str, dict, dict]:
    """llama.cpp's gpt2 layout: fused attn_qkv, Linear weights [out, in] as ours, biases everywhere."""
    n_layers, tied = g("block_count"), "output.weight" not in tensors
    config = dict(vocab_size=int(tensors["token_embd.weight"].shape[0]), context_length=g("context_length"),
                  d_model=g("embedding_length"), n_layers=n_layers, n_heads=g("attention.head_count"),
                  norm_eps=float(g("attention.layer_norm_epsilon", 1e-5)), tie_embeddings=tied)
    state = {"tok_emb.weight": t("token_embd.weight"), "pos_emb.weight": t("position_embd.weight"),
             "final_norm.weight": t("output_norm.weight"), "final_norm.bias": t("output_norm.bias")}
    if not tied:
        state["head.weight"] = t("output.weight")
    pairs = {"attn_norm": "ln1", "attn_qkv": "attn.qkv", "attn_output": "attn.proj",
             "ffn_norm": "ln2", "ffn_up": "mlp.fc", "ffn_down": "mlp.proj"}
    for i in range(n_layers):
        for theirs, ours in pairs.items():
            for p in ("weight", "bias"):
                state[f"blocks.{i}.{ours}.{p}"] = t(f"blk.{i}.{theirs}.{p}")
    return "gpt", config, state


def load_gguf(path: Path):
    from gguf.quants import dequantize
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in ("llama", "gpt2"):
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama, gpt2)")
    g = lambda key, default=None: gguf_field(reader, f"{arch}.{key}", default)  # noqa: E731
    try:
        tensors = {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors}
    except Exception as e:
        raise CheckpointError(f"cannot dequantize {path}: {e}") from None
    t = lambda name: torch.from_numpy(np.require(tensors[name], np.float32, ["C", "W"]))  # noqa: E731  (copies read-only F32 memmaps)
    if arch == "gpt2":
        try:
            return _gguf_gpt2(g, tensors, t)
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {e} missing from a gpt2 GGUF") from None
    n_layers, n_heads = g("block_count"), g("attention.head_count")
    n_kv = g("attention.head_count_kv", n_heads)
    tied = "output.weight" not in tensors
    config = dict(vocab_size=int(tensors["token_embd.weight"].shape[0]), context_length=g("context_length"),
                  d_model=g("embedding_length"), n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                  d_ff=g("feed_forward_length"), rope_base=float(g("rope.freq_base", 10000.0)),
                  norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), tie_embeddings=tied,
                  attn_bias="blk.0.attn_q.bias" in tensors)
    config["rope_scaling"] = _gguf_rope_scaling(reader, tensors, config, path)
    try:
        state = {"tok_emb.weight": t("token_embd.weight"), "final_norm.weight": t("output_norm.weight")}
        if not tied:
            state["head.weight"] = t("output.weight")
        for i in range(n_layers):
            b = f"blk.{i}."
            tensors[b + "attn_q.weight"] = _unpermute(tensors[b + "attn_q.weight"], n_heads)
            tensors[b + "attn_k.weight"] = _unpermute(tensors[b + "attn_k.weight"], n_kv)
            state[f"blocks.{i}.attn_norm.weight"] = t(b + "attn_norm.weight")
            state[f"blocks.{i}.ffn_norm.weight"] = t(b + "ffn_norm.weight")
            state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([t(b + f"attn_{x}.weight") for x in "qkv"])
            if config["attn_bias"]:
                tensors[b + "attn_q.bias"] = _unpermute(tensors[b + "attn_q.bias"], n_heads)
                tensors[b + "attn_k.bias"] = _unpermute(tensors[b + "attn_k.bias"], n_kv)
                state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([t(b + f"attn_{x}.bias") for x in "qkv"])
            state[f"blocks.{i}.attn.o_proj.weight"] = t(b + "attn_output.weight")
            state[f"blocks.{i}.ffn.gate_up.weight"] = torch.cat([t(b + "ffn_gate.weight"), t(b + "ffn_up.weight")])
            state[f"blocks.{i}.ffn.down.weight"] = t(b + "ffn_down.weight")
    except KeyError as e:
        raise CheckpointError(f"{path}: tensor {e} missing from a llama GGUF") from None
    return "llama", config, state


def load_any(path: str | Path):
    """(architecture, config dict, state_dict, kind) for a .gguf file, our folder, or an HF folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return (*load_gguf(path), "gguf")
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path} is a pickle; refusing to load it. Save it as safetensors in a folder")
        raise CheckpointError(f"{path}: expected a .gguf file or a checkpoint folder")
    if not (path / "config.json").exists():
        _safetensors_files(path)  # a pickle-only folder gets the pickle message
        raise CheckpointError(f"{path} has no config.json")
    meta = json.loads((path / "config.json").read_text())
    if "architecture" in meta:
        return (*load_native(path), "native")
    return (*load_hf(path), "hf")
