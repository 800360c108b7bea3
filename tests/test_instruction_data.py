"""The ch07 instruction split shared by the SFT/DPO trainers and the judged task."""
from __future__ import annotations

import json

import pytest

from tasks.base import TaskError
from tasks.instruction_data import alpaca_prompt, build_prompt, chat_renderer, instruction_file, instruction_split
from models.tokenizer import gpt2_tokenizer

from harness.cli import UserError


def _key(e):
    return e["instruction"].strip(), e["input"].strip()


def test_split_is_seeded_disjoint_and_complete():
    path = instruction_file()
    a, b = instruction_split(path, seed=123), instruction_split(path, seed=123)
    assert a == b
    assert (len(a.train), len(a.val), len(a.test)) == (944, 52, 104)   # 935/55/110 before repeats moved
    assert len(a.train) + len(a.val) + len(a.test) == 1100
    train_keys = {_key(e) for e in a.train}
    assert not train_keys & {_key(e) for e in a.test + a.val}     # no test instruction was trained on
    assert instruction_split(path, seed=7).test != a.test
    assert "seed=123" in a.signature and a.signature != instruction_split(path, seed=7).signature


def test_preference_file_splits_like_the_instruction_file():
    plain = instruction_split(instruction_file(), seed=123)
    pref = instruction_split(instruction_file("instruction-data-with-preference.json"), seed=123,
                             required=("instruction", "input", "output", "chosen", "rejected"))
    assert [_key(e) for e in pref.test] == [_key(e) for e in plain.test]


def test_bad_files_and_fractions_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    with pytest.raises(TaskError, match="entry 0 lacks string field"):
        instruction_split(bad)
    bad.write_text("{not json")
    with pytest.raises(TaskError, match="not a readable JSON"):
        instruction_split(bad)
    with pytest.raises(TaskError, match="fractions"):
        instruction_split(instruction_file(), fractions=(0.5, 0.5, 0.5))


def test_alpaca_prompt_is_the_books_format():
    entry = {"instruction": "Rewrite the sentence.", "input": "It is cold.", "output": "x"}
    assert alpaca_prompt(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nIt is cold."
        "\n\n### Response:\n")
    assert "### Input" not in alpaca_prompt({**entry, "input": ""})
    tok = gpt2_tokenizer()                      # no chat template: auto means alpaca
    assert build_prompt(entry, chat_renderer(tok)) == alpaca_prompt(entry)
    with pytest.raises(UserError, match="no chat template"):
        build_prompt(entry, chat_renderer(tok), "chat")
