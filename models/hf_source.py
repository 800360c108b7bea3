"""Where a `model=hf:<x>` comes from, checked before anything large is read.

`x` is a local folder (what `save_pretrained` writes, or a folder holding a GGUF named by
`model.gguf_file`) or a hub id, downloaded once into the Hugging Face cache. Every way this can go
wrong is one `error:` line naming the folder or id and what to do (`HFModelError`), instead of a
transformers traceback after a long load; what transformers would import from a hub repo's own code
(`trust_remote_code`) is never run.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from harness.cli import UserError
from models.download import sha256_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a model needs from a hub repo: config, weights (safetensors only: no pickles), tokenizer files.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
DEFAULT_MAX_LENGTH = 2048         # lm-eval's when neither config nor tokenizer names a context length
TOKENIZER_INFINITY = int(1e30)    # transformers' model_max_length for "not set"


class HFModelError(UserError):
    """A `model=hf:` folder or hub id that cannot be loaded as a causal LM."""


class HubDownloadError(HFModelError):
    """A hub id that could not be fetched (offline, unknown, gated)."""


def _is_local(name: str) -> bool:
    """A path, not a hub id ("org/name" or "name"): absolute, relative with ./ or ../, ~, or deeper."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve_folder(name: str, gguf_file: str | None = None) -> tuple[Path, str]:
    """(local folder, label for the leaderboard's model column) of a folder path or hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path, path.resolve().name
    if path.exists():
        raise HFModelError(f"{path} is a file; model=hf: takes a folder (for a .gguf file: model=hf:<its folder> "
                           f"model.gguf_file={path.name}, or model={path} for the native loader)")
    if _is_local(name) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise HFModelError(f"model=hf:{name}: no such folder (and not a hub id like org/name)")
    return _download(name, gguf_file), name


def _download(repo_id: str, gguf_file: str | None) -> Path:
    from huggingface_hub import snapshot_download
    patterns = HUB_FILES + ([gguf_file] if gguf_file else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:   # offline, unknown or gated repo, network: all mean "not here"
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise HubDownloadError(
            f"model=hf:{repo_id}: could not download {repo_id} from the Hugging Face hub ({type(e).__name__}: "
            f"{reason}); where there is network run `hf download {repo_id} --local-dir <folder>` (or save_pretrained "
            "it) and pass model=hf:<folder>") from None


def check_causal_lm(folder: Path, gguf_file: str | None = None):
    """The folder's transformers config, refused unless AutoModelForCausalLM can build it from
    weights that are there. Reads only small files."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if gguf_file:
        if not (folder / gguf_file).is_file():
            have = ", ".join(p.name for p in sorted(folder.glob("*.gguf"))) or "none"
            raise HFModelError(f"{folder / gguf_file} not found (model.gguf_file={gguf_file}; "
                               f".gguf files there: {have})")
    elif not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = (f"; it holds {ggufs[0].name}: pass model.gguf_file={ggufs[0].name}" if ggufs else
                "; point model=hf: at a folder written by save_pretrained (config.json, *.safetensors, "
                "tokenizer files)")
        raise HFModelError(f"{folder} has no config.json, so it is not a Hugging Face model folder{hint}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        where = folder / (gguf_file or "config.json")
        raise HFModelError(f"{where} cannot be read by transformers {transformers.__version__} "
                           f"({' '.join(str(e).split())[:300]}); restore it or upgrade transformers") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise HFModelError(f"{folder} holds a {config.model_type!r} model ({archs}), not a causal language model; "
                           "model=hf: takes what AutoModelForCausalLM loads (GPT-2, Llama, Qwen, Gemma, ...)")
    if not gguf_file and not list(folder.glob("*.safetensors")):
        raise HFModelError(f"{folder} holds no *.safetensors weights (pickled *.bin checkpoints are not loaded); "
                           "save the model with save_pretrained, which writes safetensors")
    return config


def weights_files(folder: Path, gguf_file: str | None = None) -> list[Path]:
    return [folder / gguf_file] if gguf_file else sorted(folder.glob("*.safetensors"))


def weights_digest(folder: Path, gguf_file: str | None = None) -> tuple[str, dict[str, str]]:
    """(sha256 hex of the weights: the file's own, or of the shards' digests in name order, as
    harness.serve's digest), {file: sha256})."""
    per_file = {str(f): sha256_file(f) for f in weights_files(folder, gguf_file)}
    digests = list(per_file.values())
    whole = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
    return whole, per_file


def context_length(config, tokenizer, default: int = DEFAULT_MAX_LENGTH) -> int:
    """lm-eval's resolve_max_length: the (text) config's n_positions / max_position_embeddings /
    n_ctx, else the tokenizer's model_max_length when set, else 2048."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < TOKENIZER_INFINITY else default
