"""A checkpoint's provenance, walked and summarised for the leaderboard.

Every training recipe writes provenance.json into its checkpoint: the run `id`
("<recipe>-<UTC stamp>-<hex>"), `recipe`, the training `config`, `seed`, `steps`, losses and what it
trained on -- `data` (pretrain: [{path, sha256, tokens}]) or `split` (classify / instruct / DPO: the
split signature of tasks/sms_spam.py or tasks/instruction_data.py, which names the data file's
sha256) -- and its `parent`: {"name", "checkpoint_sha", "provenance"}, where "provenance" is the
parent's own provenance dict (models.registry.load_model hands recipes the full record), so the
whole lineage is inside one file. Checkpoints written when only the parent's id was recorded are
followed through the parent's folder on disk when it is still there.

    from harness.provenance import summarise
    summarise(json.loads(Path("out/dpo/provenance.json").read_text()))
    {"parent": "smollm2-135m-instruct > instruct:ab12cd > dpo:ef34gh",          # root first, itself last
     "trained_on": "instruction train split seed=123 fractions=0.85,0.05,0.1 (7e09a9af) > ...",
     "training_files": [("/data/instruction/instruction-data.json", "7e09a9af..."), ...]}

Models without provenance (registry names, GGUF / Hugging Face files) summarise to empty strings.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_DEPTH = 64            # a lineage deeper than this is a cycle in a hand-edited file
_RUN_ID = re.compile(r"(?P<recipe>.+)-\d{8}T\d{6}Z-(?P<hex>[0-9A-Za-z]+)")

# Datasets whose splits recipes record by signature "<name>/split/vN k=v ... sha256=<hex>":
# where their data file lives by default (relative to $HARNESS_DATA), and which config keys of
# the recording run may name another file.
SPLIT_FILES = {
    "sms_spam": ("sms_spam/SMSSpamCollection",),
    "instruction": ("instruction/instruction-data.json", "instruction/instruction-data-with-preference.json"),
}
_CONFIG_PATH_KEYS = ("path", "data", "data_path", "file")


@dataclass(frozen=True)
class SplitSignature:
    dataset: str              # "sms_spam", "instruction"
    version: str              # "v1"
    params: dict[str, str]    # seed, fractions, dedupe, ... as written
    sha256: str               # the data file's sha256 (instruction signatures keep a 16-hex prefix)
    text: str                 # the signature itself

    def describe(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.dataset} train split {args} ({self.sha256[:8]})".replace("  ", " ")


def parse_split(signature: str) -> SplitSignature | None:
    """'sms_spam/split/v1 seed=123 ... sha256=abc' -> SplitSignature; None for anything else."""
    head, _, rest = str(signature).partition(" ")
    m = re.fullmatch(r"(?P<dataset>[\w.-]+)/split/(?P<version>\w+)", head)
    if not m:
        return None
    params = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
    sha = params.pop("sha256", "")
    return SplitSignature(m["dataset"], m["version"], params, sha, str(signature))


def short_id(run_id: str, recipe: str | None = None) -> str:
    """'pretrain-20250101T000000Z-ab12cd' -> 'pretrain:ab12cd' (other ids are kept whole)."""
    m = _RUN_ID.fullmatch(run_id or "")
    if m:
        return f"{recipe or m['recipe']}:{m['hex']}"
    return f"{recipe}:{run_id}" if recipe and run_id else (run_id or recipe or "?")


def _parent_from_disk(name: Any, run_id: str) -> dict | None:
    """The provenance of a parent recorded by id only, read from its folder if it still holds that run."""
    if not isinstance(name, str) or not name:
        return None
    file = Path(name).expanduser() / "provenance.json"
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("id") == run_id else None


@dataclass
class Lineage:
    root: str                 # the named model the chain starts from ("" when trained from scratch)
    steps: list[dict]         # provenance dicts, root-most first; the checkpoint itself last


def lineage(provenance: Any) -> Lineage:
    """Walk the nested `parent` records. Never raises on missing or odd keys."""
    steps: list[dict] = []
    root, record = "", provenance
    while isinstance(record, dict) and record and len(steps) < MAX_DEPTH:
        steps.append(record)
        parent = record.get("parent")
        if not isinstance(parent, dict):
            break
        nested = parent.get("provenance")
        if isinstance(nested, str) and nested:     # an older checkpoint: the parent's id only
            found = _parent_from_disk(parent.get("name"), nested)
            if found is None:
                root = short_id(nested)
                break
            nested = found
        if isinstance(nested, dict) and nested:
            record = nested
            continue
        name = parent.get("name")   # a registry name, or the path of a model without provenance
        root = Path(name).name if isinstance(name, str) and name else str(parent.get("checkpoint_sha") or "")
        break
    steps.reverse()
    return Lineage(root, steps)


def _sha_of(path: Path) -> str:
    st = path.stat()
    return _sha_cached(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha_cached(path: str, size: int, mtime_ns: int) -> str:   # size/mtime: a changed file is re-hashed
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_data_file(step: dict, split: SplitSignature) -> Path | None:
    """The data file a split signature was cut from: a path in the run's `train` config or the
    dataset's default location, whichever has the recorded sha256 (prefix). None: not found."""
    from models.download import data_root

    train_cfg = (step.get("config") or {}).get("train") or {}
    named = [train_cfg.get(k) for k in _CONFIG_PATH_KEYS]
    named += [(train_cfg.get("split") or {}).get(k) for k in _CONFIG_PATH_KEYS] if isinstance(train_cfg.get("split"), dict) else []
    candidates = [Path(p).expanduser() for p in named if isinstance(p, str) and p]
    candidates = [c if c.is_absolute() else data_root() / c for c in candidates]
    candidates += [data_root() / rel for rel in SPLIT_FILES.get(split.dataset, ())]
    for path in candidates:
        if split.sha256 and path.is_file() and _sha_of(path).startswith(split.sha256):
            return path
    return None


def _data_records(step: dict) -> list[dict]:
    """The step's `data` list of {path, sha256} (pretraining corpora); [] when absent or malformed."""
    data = step.get("data")
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def step_files(step: dict) -> list[tuple[str, str]]:
    """(path, sha256) of the data files one step trained on, as recorded (splits: their source file;
    its path is "" when it cannot be found, the sha256 is the recorded one)."""
    files = [(str(d.get("path", "")), str(d.get("sha256", ""))) for d in _data_records(step)]
    split = parse_split(step.get("split") or "")
    if split:
        path = split_data_file(step, split)
        files.append((str(path or ""), split.sha256))
    return files


def describe_step(step: dict) -> str:
    """What one step trained on, short: 'the-verdict.txt(b41e41a6)+x.txt(...)' or a split."""
    data = _data_records(step)
    if data:
        return "+".join(f"{Path(str(d.get('path', '?'))).name}({str(d.get('sha256', ''))[:8]})" for d in data)
    split = parse_split(step.get("split") or "")
    if split:
        return split.describe()
    return str(step.get("split") or "")


def summarise(provenance: Any) -> dict:
    """{"parent": lineage string, "trained_on": data text, "training_files": [(path, sha256), ...]}
    over the whole chain, root first. Empty strings / list for models without provenance."""
    chain = lineage(provenance)
    if not chain.steps:
        return {"parent": "", "trained_on": "", "training_files": []}
    labels = [short_id(str(s.get("id") or ""), s.get("recipe")) for s in chain.steps]
    data = [d for d in (describe_step(s) for s in chain.steps) if d]
    files = [f for s in chain.steps for f in step_files(s)]
    return {"parent": " > ".join(([chain.root] if chain.root else []) + labels),
            "trained_on": " > ".join(data), "training_files": files}
