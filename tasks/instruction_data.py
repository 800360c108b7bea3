"""The book's ch07 instruction data: loading, the seeded 85/5/10 split, and the prompt formats.

Shared by the trainers (`harness/train/instruct.py`, `harness/train/dpo.py`) and the judged task
(`tasks/instruct.py`), so a checkpoint is only ever judged on entries it never trained on.

Split: shuffle the entries with a fixed seed, cut 85/5/10 into train/val/test by position. The file
holds 25 (instruction, input) pairs twice; a repeat goes to the split of its first occurrence, so
no test instruction was seen in training (944 / 52 / 104 entries instead of 935 / 55 / 110). The
preference file holds the same 1,100 entries in the same order, so both files split identically.

Prompt styles:
- `alpaca`: the book's format ("Below is an instruction ... ### Instruction: ... ### Response:\\n");
- `chat`:   the model's own chat template, the instruction (+ input) as the user turn;
- `auto`:   chat when the model has a chat template, else alpaca.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from harness.cli import UserError
from models.download import data_root, ensure_file, sha256_file
from tasks.base import TaskError

_RAW = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
FILES = {  # name -> (url, sha256 of rasbt/LLMs-from-scratch@28c65cdf)
    "instruction-data.json": (_RAW + "01_main-chapter-code/instruction-data.json",
                              "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"),
    "instruction-data-with-preference.json": (
        _RAW + "04_preference-tuning-with-dpo/instruction-data-with-preference.json",
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"),
}
SPLIT_VERSION = "instruction/split/v1"
PROMPT_STYLES = ("auto", "alpaca", "chat")
ALPACA_STOP = ("### Instruction", "\n\n### ")   # an Alpaca-style model starting another turn
ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class InstructionSplit:
    train: list[dict]
    val: list[dict]
    test: list[dict]
    signature: str          # version, seed, fractions, file sha256: equal signature, equal split

    def part(self, name: str) -> list[dict]:
        if name not in ("train", "val", "test"):
            raise TaskError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, name)


def instruction_file(name: str = "instruction-data.json") -> Path:
    """`$HARNESS_DATA/instruction/<name>`, downloaded from the book's repository when missing."""
    if name not in FILES:
        raise TaskError(f"unknown instruction data file {name!r}; known: {', '.join(FILES)}")
    url, sha = FILES[name]
    return ensure_file(data_root() / "instruction" / name, url, sha, f"instruction data {name}", "HARNESS_DATA")


def load_entries(path: str | Path, required: Sequence[str] = ("instruction", "input", "output")) -> list[dict]:
    """The JSON array of entries; every entry must have the `required` string fields."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise TaskError(f"{path}: expected a non-empty JSON array of {{{', '.join(required)}}} objects")
    for i, e in enumerate(entries):
        missing = [k for k in required if not isinstance(e, dict) or not isinstance(e.get(k), str)]
        if missing:
            raise TaskError(f"{path}: entry {i} lacks string field(s) {', '.join(missing)}")
    return entries


def instruction_split(path: str | Path | None = None, seed: int = 123,
                      fractions: Sequence[float] = (0.85, 0.05, 0.10),
                      required: Sequence[str] = ("instruction", "input", "output")) -> InstructionSplit:
    """Seeded train/val/test split of an instruction file (default: the staged instruction-data.json)."""
    path = Path(path) if path else instruction_file()
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise TaskError(f"fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    entries = load_entries(path, required)
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    n_train = int(len(entries) * fractions[0])
    n_val = int(len(entries) * fractions[1])
    parts: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    first_split: dict[tuple[str, str], str] = {}
    for pos, i in enumerate(order):
        by_position = "train" if pos < n_train else "val" if pos < n_train + n_val else "test"
        key = (entries[i]["instruction"].strip(), entries[i]["input"].strip())
        parts[first_split.setdefault(key, by_position)].append(entries[i])
    signature = (f"{SPLIT_VERSION} seed={seed} fractions={','.join(f'{f:g}' for f in fractions)} "
                 f"sha256={sha256_file(path)[:16]}")
    return InstructionSplit(parts["train"], parts["val"], parts["test"], signature)


def alpaca_prompt(entry: dict) -> str:
    """The book's `format_input` plus the response header: the text a response continues."""
    text = f"{ALPACA_HEADER}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text + "\n\n### Response:\n"


def user_message(entry: dict) -> str:
    """The instruction (and its input, when there is one) as one chat user turn."""
    return entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")


def resolve_style(style: str, has_chat_template: bool) -> str:
    """`auto` -> chat when the model has a chat template (`LM.has_chat_template`), else alpaca."""
    if style not in PROMPT_STYLES:
        raise UserError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if style == "auto":
        return "chat" if has_chat_template else "alpaca"
    if style == "chat" and not has_chat_template:
        raise UserError("prompt_style=chat, but this model's tokenizer has no chat template; use alpaca")
    return style


def stop_strings(resolved_style: str) -> tuple[str, ...]:
    """Where a response ends besides EOS: chat templates end turns with a token, Alpaca does not."""
    return ALPACA_STOP if resolved_style == "alpaca" else ()


ChatPrompt = Callable[[list[dict]], str]   # LM.chat_prompt, or a tokenizer's apply_chat_template


def chat_renderer(tokenizer) -> ChatPrompt | None:
    """What the trainers pass for `chat_prompt`: they hold a tokenizer, not an LM."""
    return tokenizer.apply_chat_template if tokenizer.chat_template else None


def build_prompt(entry: dict, chat_prompt: ChatPrompt | None, style: str = "auto") -> str:
    """The prompt text a response to `entry` follows, in the resolved style. `chat_prompt` renders
    chat messages (None: the model has no chat template); it is a function rather than the
    tokenizer so that tasks see only the LM protocol (models/protocol.py)."""
    if resolve_style(style, chat_prompt is not None) == "chat":
        return chat_prompt([{"role": "user", "content": user_message(entry)}])
    return alpaca_prompt(entry)
