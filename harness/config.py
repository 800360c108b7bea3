"""From the command line and config nodes to objects, with bad input as UserError.

`rewrite_argv` runs before Hydra sees the command line: `model=<path>` becomes
`model=checkpoint model.name=<path>` (so a checkpoint folder or .gguf file works like a registry
name), `model=hf:<folder or hub id>` becomes `model=hf model.name=<it>` (the transformers backend),
`model=ollama:<name>` / `model=openai:<name>` become `model=ollama|openai model.name=<name>` (a
model served elsewhere: models/ollama_lm.py, models/openai_lm.py), and an unknown task or model is
one line naming the valid ones instead of Hydra's report.
`instantiate` builds a config node (`_target_`) and unwraps Hydra's InstantiationException, so the
task's or model's own UserError reaches the CLI as it was raised.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from harness.cli import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _options(group: str, dirs: list[Path]) -> list[str]:
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def _looks_like_path(v: str) -> bool:
    return os.path.exists(v) or "/" in v or os.sep in v or v.endswith(".gguf")


def _quote(v: str) -> str:
    return v if re.fullmatch(r"[\w./~+@-]+", v) else "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rewrite_argv(argv: list[str], conf_dir: Path = CONF_DIR) -> list[str]:
    """`model=<path>` -> `model=checkpoint model.name=<path>`; an unknown task/model -> UserError.

    Comma lists (multirun sweeps) are checked element by element; extra config dirs given with
    `--config-dir/-cd` count as options too. Sweep functions like `glob(...)` are left to Hydra."""
    dirs, it = [conf_dir], iter(argv)
    for a in it:
        if a in ("-cd", "--config-dir"):
            dirs.append(Path(next(it, "")))
        elif a.startswith("--config-dir="):
            dirs.append(Path(a.split("=", 1)[1]))
    out = []
    for arg in argv:
        m = re.fullmatch(r"(task|model)=(.*)", arg, re.S)
        if not m or "(" in m.group(2):
            out.append(arg)
            continue
        group, value = m.groups()
        valid = _options(group, dirs)
        values = value.split(",")
        prefix = next((p for p in PREFIXES if group == "model" and any(v.startswith(p) for v in values)), None)
        if prefix:
            out += _prefixed_models(prefix, values)
            continue
        bad = [v for v in values if v not in valid and not (group == "model" and _looks_like_path(v))]
        if bad:
            names = [v for v in valid if v not in ("checkpoint", *(p.rstrip(":") for p in PREFIXES))]
            hint = (" (or a path to a checkpoint folder or .gguf file, hf:<folder or hub id>, "
                    "ollama:<served name> or openai:<served name>)"
                    if group == "model" else "")
            raise UserError(f"unknown {group} '{bad[0]}'; valid {group}s: {', '.join(names)}{hint}")
        if group == "model" and any(v not in valid for v in values):
            out += ["model=checkpoint", "model.name=" + ",".join(_quote(v) for v in values)]
        else:
            out.append(arg)
    return out


HF_PREFIX = "hf:"
# prefix -> (config in conf/model/, what follows the prefix): models this harness does not load itself
PREFIXES = {HF_PREFIX: "a folder or hub id, e.g. model=hf:path/to/folder",
            "ollama:": "the name the server lists, e.g. model=ollama:llama3.1:8b",
            "openai:": "the model id the server lists, e.g. model=openai:gpt-4o-mini"}


def _prefixed_models(prefix: str, values: list[str]) -> list[str]:
    """`model=hf:a[,hf:b]` -> `model=hf model.name=a[,b]` (a sweep), and so for ollama: and openai:."""
    names = [v[len(prefix):] for v in values if v.startswith(prefix)]
    if len(names) < len(values):
        raise UserError(f"model={','.join(values)}: a sweep cannot mix {prefix} models with others; run them separately")
    if not all(names):
        raise UserError(f"model={prefix} needs {PREFIXES[prefix]}")
    return [f"model={prefix.rstrip(':')}", "model.name=" + ",".join(_quote(n) for n in names)]


def instantiate(node, what: str):
    """hydra.utils.instantiate; a misspelt or missing constructor argument is a UserError naming the
    config group, and a UserError raised inside the constructor comes out unwrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    from harness.cli import user_errors

    try:
        return hydra_instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, TypeError) and _is_signature_error(cause):
            raise UserError(f"bad {what} config: {cause}") from cause
        if isinstance(cause, user_errors()):
            raise cause from None
        raise


def _is_signature_error(e: TypeError) -> bool:
    """A TypeError from calling the constructor with wrong keywords, not one raised inside it (a bug)."""
    text = str(e)
    return any(s in text for s in ("unexpected keyword argument", "missing 1 required", "required positional",
                                   "required keyword"))
