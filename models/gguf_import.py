"""Reading GGUF files (llama.cpp's format) into our models: the inverse of models/gguf_export.py.

The metadata gives the config, the header the tensor shapes; both are checked against each other
(models/shapes.py) before any tensor is dequantized, so inconsistent metadata cannot allocate a model
of its size. What every layout shares (the sizes, token_embd, output) is read here; the rest comes
from the architecture's hooks (models/architectures.py), torch ops that meta tensors go through too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.architectures import by_gguf_name
from models.checkpoint import CheckpointError
from models.gguf_meta import read_gguf


@dataclass
class GGUFHeader:
    """What an architecture's gguf_config hook reads: metadata and tensor shapes, no tensor data."""
    path: Path
    metadata: dict                   # key -> value (models/gguf_meta.py)
    arch: str                        # general.architecture
    shapes: dict[str, tuple]         # tensor name -> shape, [out, in] like ours

    def get(self, key: str, default=None):
        """The architecture's own key: get("context_length") reads "<arch>.context_length"."""
        return self.metadata.get(f"{self.arch}.{key}", default)

    def field(self, key: str, default=None):
        return self.metadata.get(key, default)


def _common_config(h: GGUFHeader) -> dict:
    return dict(vocab_size=int(h.shapes["token_embd.weight"][0]), context_length=h.get("context_length"),
                d_model=h.get("embedding_length"), n_layers=h.get("block_count"), n_heads=h.get("attention.head_count"),
                tie_embeddings="output.weight" not in h.shapes)


def load_gguf(path: Path):
    """(architecture, config, state_dict) of a GGUF file. Its metadata is checked against the tensor
    shapes in its header (the tensor data is memory-mapped, not read) before anything is dequantized."""
    from gguf.quants import dequantize

    from models.shapes import check_fits, make_config
    file = read_gguf(path)
    gguf_arch = file.metadata.get("general.architecture")
    arch = by_gguf_name(gguf_arch, str(path))
    shapes = {name: t.shape for name, t in file.tensors.items()}  # numpy order: [out, in]
    header = GGUFHeader(path, file.metadata, gguf_arch, shapes)
    names = {k: f"{gguf_arch}.{v}" for k, v in (
        ("context_length", "context_length"), ("d_model", "embedding_length"), ("n_layers", "block_count"),
        ("n_heads", "attention.head_count"), ("n_kv_heads", "attention.head_count_kv"),
        ("d_ff", "feed_forward_length"), ("rope_base", "rope.freq_base"))} | {"vocab_size": "token_embd.weight rows"}

    def convert(t):
        try:
            state = {"tok_emb.weight": t("token_embd.weight")}
            if not config["tie_embeddings"]:
                state["head.weight"] = t("output.weight")
            return state | arch.gguf_state(config, t)
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {e} missing from a {gguf_arch} GGUF") from None
        except RuntimeError as e:  # q/k rows that do not split into heads, or parts that do not concatenate
            raise CheckpointError(f"{path}: tensor shapes do not fit its metadata ({e})") from None

    try:
        config = arch.gguf_config(header, _common_config(header))
    except KeyError as e:
        raise CheckpointError(f"{path}: tensor {e} missing from a {gguf_arch} GGUF") from None
    make_config(arch.name, config, str(path), names)  # sizes first: the conversion loops over n_layers
    meta = {n: torch.empty(shape, device="meta") for n, shape in shapes.items()}
    check_fits(arch.name, config, convert(meta.__getitem__), f"{path}'s metadata", "its tensor data",
               "convert or export the file again", names)
    try:
        tensors = {name: dequantize(file.data(name), t.ggml_type) for name, t in file.tensors.items()}
    except Exception as e:
        raise CheckpointError(f"cannot dequantize {path}: {e}") from None
    # np.require copies read-only F32 memmaps, which torch cannot wrap.
    t = lambda name: torch.from_numpy(np.require(tensors[name], np.float32, ["C", "W"]))  # noqa: E731
    if arch.gguf_check:
        arch.gguf_check(config, t, header)
    return arch.name, config, convert(t)
