"""The served model's metadata for /api/tags, /api/show and /api/ps (a ModelCard): weights files,
digest, parameter count, quantization. Apart from harness/serve/engine.py, which runs the model."""
from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from pathlib import Path

from harness.serve.ollama_api import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, ModelCard
from models.architectures import lookup

def weights_files(source: str) -> list[Path]:
    """The files holding a model's weights ([] for the registry's random-init test models)."""
    from models.registry import MODELS, fetch
    if source in MODELS:
        if MODELS[source].kind == "init":
            return []
        path = fetch(source)
    else:
        path = Path(source).expanduser()
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def weights_digest(files: list[Path], fallback: str, known: dict[str, str] | None = None) -> str:
    """sha256 hex of the weights file; of the files' digests, in order, for sharded folders. `known`:
    digests load_model already computed ({path: sha256}), so a large file is not read twice."""
    from models.download import sha256_file
    if not files:
        return hashlib.sha256(fallback.encode()).hexdigest()
    digests = [(known or {}).get(str(f)) or sha256_file(f) for f in files]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def parameter_count(model) -> int:
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    n = sum(unique.values())
    if getattr(model.config, "tie_embeddings", False) and model.head is not None:
        n -= model.head.weight.numel()   # the fp32 inference layout's copy of the tied embedding
    return n


def _human(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _gguf_quantization(path: Path) -> str | None:
    import gguf

    from models.gguf_meta import read_metadata
    file_type = read_metadata(path).get("general.file_type")
    try:
        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return None


def describe_model(lm, source: str, name: str, num_ctx: int) -> ModelCard:
    """The served model's metadata for /api/tags, /api/show and /api/ps."""
    cfg, model = lm.model.config, lm.model
    files = weights_files(source)
    arch = lookup(model.architecture)
    family = arch.family   # Ollama names a model's family by its GGUF architecture
    dtype = str(lm.info.get("dtype", "float32"))
    fmt = "gguf" if files and files[0].suffix == ".gguf" else "safetensors" if files else "random-init"
    quant = (_gguf_quantization(files[0]) if fmt == "gguf" else None) or {"bfloat16": "BF16"}.get(dtype, "F32")
    n_params = parameter_count(model)
    size = sum(f.stat().st_size for f in files) or sum(p.numel() * p.element_size() for p in model.parameters())
    info = {
        "general.architecture": family, "general.parameter_count": n_params,
        f"{family}.context_length": cfg.context_length, f"{family}.embedding_length": cfg.d_model,
        f"{family}.block_count": cfg.n_layers, f"{family}.attention.head_count": cfg.n_heads,
        f"{family}.vocab_size": cfg.vocab_size, "tokenizer.ggml.eos_token_id": lm.eos_id,
        "harness.source": source, "harness.dtype": dtype, "harness.device": str(lm.device),
    }
    info.update({f"{family}.{key}": value for key, value in arch.model_info(cfg).items()})
    details = {"parent_model": "", "format": fmt, "family": family, "families": [family],
               "parameter_size": _human(n_params), "quantization_level": quant}
    ctx = min(num_ctx, cfg.context_length)
    parameters = "\n".join(f"{k:<30} {v}" for k, v in
                           (("num_ctx", ctx), ("temperature", DEFAULT_TEMPERATURE),
                            ("top_k", DEFAULT_TOP_K), ("top_p", DEFAULT_TOP_P)))
    return ModelCard(
        name=name, digest=weights_digest(files, str(lm.info.get("checkpoint_sha", name)), lm.info.get("weights_sha256")), size=size,
        modified_at=_iso(files[0].stat().st_mtime if files else time.time()), details=details,
        model_info=info, template=lm.chat_template or "{{ .Prompt }}", parameters=parameters,
        context_length=ctx, size_vram=size if lm.device.type == "cuda" else 0)
