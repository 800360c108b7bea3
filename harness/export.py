"""Export a model as one GGUF file that llama.cpp and Ollama load.

    python -m harness.export model=<registry name|checkpoint folder|.gguf> out=<file.gguf> \\
        [dtype=f32|f16|bf16] [overwrite=false]

    ollama create mine -f Modelfile        # a Modelfile holding: FROM ./file.gguf

GPT-2 models become llama.cpp's `gpt2` architecture, Llama-style ones (SmolLM2) `llama`; the
tokenizer (GPT-2's BPE, a GGUF file's own vocabulary or a checkpoint folder's tokenizer) and its
chat template go into the metadata. Weights are read in fp32 (quantized GGUF weights dequantized)
and written as `dtype`. Classifier checkpoints are refused: GGUF has no class heads.

Bad input prints one `error:` line on stderr and exits with status 2; the output file appears
only when complete (written to a temporary sibling, then renamed), and an existing one is
replaced only with overwrite=true.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from harness.cli import UserError, run_cli

log = logging.getLogger("harness.export")
USAGE = ("usage: python -m harness.export model=<registry name|checkpoint folder|.gguf> out=<file.gguf> "
         "[dtype=f32|f16|bf16] [overwrite=false]")


@dataclass
class ExportConfig:
    model: str = ""
    out: str = ""
    dtype: str = "f32"
    overwrite: bool = False


def _bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise UserError(f"{key}={value}: expected true or false")


def parse_args(argv: list[str]) -> ExportConfig:
    """key=value arguments (the same syntax as the other harness commands)."""
    cfg, known = ExportConfig(), {f.name for f in fields(ExportConfig)}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in known:
            raise UserError(f"unexpected argument {arg!r}; {USAGE[len('usage: '):]}")
        setattr(cfg, key, _bool(key, value) if key == "overwrite" else value)
    if not cfg.model or not cfg.out:
        raise UserError(f"model= and out= are required; {USAGE[len('usage: '):]}")
    if not cfg.out.endswith(".gguf"):
        raise UserError(f"out={cfg.out}: the output must be a .gguf file")
    return cfg


def _source_gguf(name: str) -> Path | None:
    """The GGUF file a model comes from (its tokenizer is copied from there), if any."""
    from models.registry import MODELS, fetch
    if name in MODELS:
        return fetch(name) if MODELS[name].kind == "gguf" else None
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" else None


def _label(name: str) -> str:
    return Path(name).stem if Path(name).expanduser().exists() else name


def export(cfg: ExportConfig, progress: bool = True) -> Path:
    from models.gguf_export import QTYPES, ExportError, gguf_vocab, vocab_from_gguf, write_gguf
    from models.gguf_meta import read_metadata
    from models.registry import load_model

    out = Path(cfg.out).expanduser()
    # Cheap checks first, so a typo costs no model load.
    if cfg.dtype not in QTYPES:
        raise UserError(f"unknown dtype {cfg.dtype!r}; use one of {', '.join(QTYPES)}")
    if out.is_dir():
        raise UserError(f"out={cfg.out} is a folder; name the .gguf file to write")
    if out.exists() and not cfg.overwrite:
        raise ExportError(f"{out} already exists; pass overwrite=true or choose another output file")
    model, tokenizer, _ = load_model(cfg.model)
    source = _source_gguf(cfg.model)
    if source is not None:  # copy a GGUF-born vocabulary and name field by field
        meta = read_metadata(source)
        vocab, name = vocab_from_gguf(meta), meta.get("general.name") or _label(cfg.model)
    else:
        vocab, name = gguf_vocab(tokenizer), _label(cfg.model)
    log.info("writing %s (%s, %s)", out, model.architecture, cfg.dtype)
    return write_gguf(out, model, vocab, dtype=cfg.dtype, name=name, overwrite=cfg.overwrite, progress=progress)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0

    def job() -> None:
        path = export(parse_args(argv))
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
