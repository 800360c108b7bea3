"""Loading and saving weights: our checkpoint folders, Hugging Face safetensors, and GGUF (read in
models/gguf_import.py). How an architecture's config and tensors are named in HF and GGUF files is
its model file's business, reached through its entry in models/architectures.py.

Every loader returns (architecture, config, state_dict in our tensor names), and checks the config
against the tensor shapes in the file's header (models/shapes.py) before it reads any tensor data:
a config that does not belong to its weights is refused before a model of its size is allocated.
Pickles are never loaded: a `.bin`/`.pt`/`.pth` file is refused with a message saying how to convert it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from harness import io
from harness.cli import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# How to fix a config that does not describe its weights, for the messages below.
RESTORE_CONFIG = "restore the config.json saved with these weights"
RESTORE_INDEX = "restore the index written with the shards"
HF_CONFIG = "use the config.json published with these weights"


class CheckpointError(UserError):
    """A model file that is corrupt, truncated, unsafe or does not fit the architecture."""


def build_model(architecture: str, config, source: str = "model config") -> torch.nn.Module:
    """A model of `config` (a mapping or the architecture's config dataclass), refused with a
    CheckpointError naming `source` when the architecture is unknown or a size is invalid."""
    from models.architectures import lookup   # not at the top: the model files import this module
    from models.shapes import make_config
    config = make_config(architecture, config, source)
    return lookup(architecture).build(config)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a message that names what does not fit (another architecture's checkpoint)."""
    from models.shapes import mismatch
    detail = mismatch(model.state_dict(), state)
    if detail:
        raise CheckpointError(f"{source} does not fit a {model.architecture} model of this config ({detail})")
    model.load_state_dict(state, strict=True)


def read_json(path: Path, fix: str) -> dict:
    return io.read_json(path, fix, CheckpointError)


def _read_safetensors(files: list[Path], header_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of `files`; header_only: meta tensors of their shapes, read from the headers alone."""
    from safetensors import safe_open
    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    state[k] = (torch.empty(st.get_slice(k).get_shape(), device="meta") if header_only
                                else st.get_tensor(k))
        except Exception as e:  # SafetensorError, OSError: truncated or not a safetensors file
            raise CheckpointError(f"cannot read {f}: {e} (truncated or not a safetensors file?)") from None
    return state


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, RESTORE_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor name -> shard file; {RESTORE_INDEX}")
        return [folder / s for s in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{folder} holds {pickles[0]}, a pickle; refusing to load pickles. Convert it with "
                              "safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')")
    raise CheckpointError(f"{folder} has no model.safetensors")


# --- our own checkpoint folder -------------------------------------------------------------------

def _native_meta(folder: Path) -> dict:
    meta = read_json(folder / "config.json", RESTORE_CONFIG)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{folder / 'config.json'} has no \"config\" object (the model's sizes); "
                              f"{RESTORE_CONFIG}")
    return meta


def read_labels(folder: Path) -> list[str] | None:
    return _native_meta(folder).get("labels")


def load_native(folder: Path, expect: torch.nn.Module | None = None):
    """(architecture, config, state_dict) of our checkpoint folder. Before any tensor is read, the
    safetensors header is checked against the config, or against `expect`, the model being resumed
    (whose `last/` may hold LoRA adapters that its config does not describe)."""
    from models.shapes import check_fits, mismatch
    meta, files = _native_meta(folder), _safetensors_files(folder)
    header, arch = _read_safetensors(files, header_only=True), meta.get("architecture")
    if expect is None:
        weights = files[0].name if len(files) == 1 else f"the {len(files)} shards of {folder}"
        check_fits(arch, meta["config"], header, str(folder / "config.json"), weights, RESTORE_CONFIG)
    elif detail := mismatch(expect.state_dict(), header):
        raise CheckpointError(f"{folder} holds a {arch} checkpoint that does not fit the {expect.architecture} "
                              f"model of this run ({detail})")
    return arch, meta["config"], _read_safetensors(files)


def save_checkpoint(folder: str | Path, model: torch.nn.Module, tokenizer, provenance: dict,
                    overwrite: bool = False, labels: list[str] | None = None, state: dict | None = None) -> Path:
    """Write model.safetensors + config.json + tokenizer files + provenance.json atomically: into a
    temporary sibling folder first, renamed into place only when complete. `state`: the weights to
    write instead of model.state_dict() (a sharded model's, gathered by the caller)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CheckpointError(f"{folder} already exists; choose another output folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if state is None else state).items()}
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


def float_or_raw(v):
    """float(v) for a number; anything else unchanged, for make_config to refuse by name."""
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


# --- Hugging Face safetensors folders ------------------------------------------------------------

def strip_prefix(state: dict, prefix: str) -> dict:
    """HF state_dicts name tensors with the wrapper's prefix ("transformer.", "model.") or not."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def from_hf_hook(config_from_hf: Callable[[dict], Any], convert_hf: Callable[[dict, Any], dict]):
    """The registry's from_hf hook (models/architectures.py) of a model file whose config_from_hf(HF
    config dict) gives its config dataclass and convert_hf(HF state_dict, that config) our tensors."""
    def from_hf(cfg: dict, folder) -> tuple[dict, Callable[[dict], dict]]:
        config = config_from_hf(cfg)
        return asdict(config), lambda state: convert_hf(state, config)
    return from_hf


def load_hf(folder: Path):
    """(architecture, config, state_dict) of an HF folder; the config is checked against the
    safetensors header before any tensor is read."""
    from models.architectures import by_hf_model_type
    from models.shapes import check_fits, make_config
    config_file = folder / "config.json"
    cfg = read_json(config_file, HF_CONFIG)
    files = _safetensors_files(folder)
    arch = by_hf_model_type(cfg.get("model_type"), str(folder))
    try:
        config, convert = arch.from_hf(cfg, folder)
    except KeyError as e:
        raise CheckpointError(f"{config_file}: key {e} missing for a {cfg.get('model_type')} checkpoint") from None

    def converted(state: dict) -> dict:
        try:
            return convert(state)
        except KeyError as e:
            raise CheckpointError(f"{folder}: tensor {e} missing for a {cfg.get('model_type')} checkpoint "
                                  f"of the sizes in {config_file.name}") from None
        except RuntimeError as e:  # torch.cat of q/k/v whose shapes disagree
            raise CheckpointError(f"{folder}: tensor shapes do not fit {config_file.name} ({e})") from None

    # The sizes first (a negative n_layer would convert to an empty state), then the header's shapes.
    make_config(arch.name, config, str(config_file), arch.hf_keys)
    weights = files[0].name if len(files) == 1 else f"the {len(files)} shards of {folder}"
    check_fits(arch.name, config, converted(_read_safetensors(files, header_only=True)), str(config_file), weights,
               HF_CONFIG, arch.hf_keys)
    return arch.name, config, converted(_read_safetensors(files))


# --- any of the above, or a GGUF file (read in models/gguf_import.py) ------------------------------

def load_any(path: str | Path):
    """(architecture, config dict, state_dict, kind) for a .gguf file, our folder, or an HF folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            from models.gguf_import import load_gguf
            return (*load_gguf(path), "gguf")
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path} is a pickle; refusing to load it. Save it as safetensors in a folder")
        raise CheckpointError(f"{path}: expected a .gguf file or a checkpoint folder")
    if not (path / "config.json").exists():
        _safetensors_files(path)  # a pickle-only folder gets the pickle message
        raise CheckpointError(f"{path} has no config.json")
    meta = read_json(path / "config.json", RESTORE_CONFIG)
    if "architecture" in meta:
        return (*load_native(path), "native")
    return (*load_hf(path), "hf")
