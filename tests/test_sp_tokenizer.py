"""models/sp_tokenizer.py, the SentencePiece ("llama") GGUF tokenizer, against transformers.

* Gemma 3 270M (the real file; fetched into ~/.cache/harness/models when absent, skipped when it cannot
  be): ids and decode round trips equal to transformers' on every line of the staged corpora.
* A small Llama-style vocabulary written here as a GGUF: the Metaspace prefix-space path, saving into a
  checkpoint folder and loading back, and a GGUFReader as the source.

The reference is the tokenizer class AutoTokenizer picks for the file's architecture
(TOKENIZER_MAPPING_NAMES: GemmaTokenizer for gemma3), built with `from_pretrained(dir, gguf_file=...)`.
Calling AutoTokenizer itself builds the identical backend (checked when this was written) but first
spends ~30 s parsing the whole file with gguf.GGUFReader to read the config it uses to pick the class.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import gguf
import pytest

from models.download import MissingFileError, data_root
from models.tokenizer import gguf_tokenizer, load_tokenizer

TEXT_FILES = ["pretrain/the-verdict.txt", "pretrain/tinyshakespeare.txt", "wikitext2/raw/wiki.test.raw"]
INSTRUCTIONS = "instruction/instruction-data.json"
MMLU_SUBJECTS = ["abstract_algebra", "college_chemistry", "high_school_world_history", "world_religions"]
EXTRA = [  # unicode, emoji, byte fallback, special and added tokens, whitespace runs
    "héllo wörld ½ 12345 ﬁ 🙂🦙👩🏽‍🚀", "日本語のテキストと中文文本", "مرحبا بالعالم", "Ελληνικά Кириллица",
    "𓀀𓁐 \U0010fffd \x00\x01\x7f control", "zero\u200bwidth\u00a0nbsp", "e\u0301 combining",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n", "<bos><eos><pad><unk><mask>",
    "<unused0><unused6241>[multimodal]<start_of_image>", "<0x41> literal <0xFF>", "  two   three    four",
    "\t\ttabs\t", "\n\n\nnewlines\r\n\r\n", " leading", "trailing ", "", " ", "▁already▁spelled",
]
GEMMA = "gemma3-270m"
# 165 + 40,000 + 4,358 lines of the three texts, 2,525 instruction strings, 608 MMLU questions
# (100 + 100 + 237 + 171), and EXTRA
EXPECTED_LINES = 165 + 40_000 + 4_358 + 2_525 + 608 + len(EXTRA)


def corpus_lines() -> list[str]:
    root = data_root()
    paths = [root / f for f in TEXT_FILES + [INSTRUCTIONS]] + [root / f"mmlu/test/{s}_test.csv" for s in MMLU_SUBJECTS]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"corpora absent (set HARNESS_DATA): {missing}")
    lines: list[str] = []
    for path in paths[:len(TEXT_FILES)]:
        with open(path, encoding="utf-8", newline="") as f:  # keep \r\n exactly as stored
            lines += f.read().splitlines(keepends=True)
    for entry in json.loads(paths[len(TEXT_FILES)].read_text(encoding="utf-8")):
        lines += [entry[k] for k in ("instruction", "input", "output") if entry.get(k)]
    for path in paths[len(TEXT_FILES) + 1:]:
        with open(path, encoding="utf-8", newline="") as f:
            lines += ["\n".join(row[:-1]) for row in csv.reader(f)]   # question and its four choices
    return lines + EXTRA


def reference(path: Path):
    """transformers' tokenizer for this GGUF: the class AutoTokenizer maps its architecture to."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    from models.gguf_meta import read_metadata
    transformers.logging.set_verbosity_error()
    arch = read_metadata(path)["general.architecture"]
    if arch not in TOKENIZER_MAPPING_NAMES:   # llama: AutoTokenizer's fallback, cheap on a small file
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cls = tokenizer_class_from_name(TOKENIZER_MAPPING_NAMES[arch])
    return cls.from_pretrained(str(path.parent), gguf_file=path.name)


def compare(tok, ref, lines: list[str]) -> dict:
    """Counts of lines whose ids differ and whose decode(encode(x)) differs from transformers'."""
    ours = tok.encode_batch(lines)
    theirs = ref(lines, add_special_tokens=False)["input_ids"]
    id_bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    back_ours = [tok.decode(ids) for ids in ours]
    back_theirs = ref.batch_decode(theirs)
    rt_bad = [i for i, (a, b) in enumerate(zip(back_ours, back_theirs)) if a != b]
    lossy = [i for i, (a, x) in enumerate(zip(back_ours, lines)) if a != x]
    return {"lines": len(lines), "tokens": sum(map(len, ours)), "id_mismatch": id_bad,
            "decode_mismatch": rt_bad, "lossy": lossy}


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    from models.registry import fetch
    try:
        return fetch(GEMMA)
    except MissingFileError as e:
        pytest.skip(f"{GEMMA} absent and not fetchable: {e}")


def test_gemma_matches_transformers_on_the_corpora(gemma_path):
    lines = corpus_lines()
    tok, ref = gguf_tokenizer(gemma_path), reference(gemma_path)
    got = compare(tok, ref, lines)
    print(f"\ngemma3 parity: {got['lines']} lines, {got['tokens']} tokens, "
          f"{len(got['id_mismatch'])} id mismatches, {len(got['decode_mismatch'])} decode mismatches, "
          f"{len(got['lossy'])} lines whose round trip is not the input")
    assert got["lines"] == EXPECTED_LINES
    assert [lines[i] for i in got["id_mismatch"][:5]] == []
    assert [lines[i] for i in got["decode_mismatch"][:5]] == []
    # byte fallback loses nothing; only a literal ▁ comes back as a space (in transformers too)
    assert [lines[i] for i in got["lossy"]] == ["▁already▁spelled"]
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.add_bos) == (262144, 1, 2, True)
    assert (ref.eos_token_id, ref.bos_token_id, ref.add_bos_token) == (1, 2, True)
    assert tok.encode("<start_of_turn>user\n") == [105, 2364, 107]
    assert tok.decode([tok.encode("é")[0]]) == "é" and tok.encode("\x00") == [238]   # <0x00>
    assert tok.chat_template is None   # this base-model GGUF carries no tokenizer.chat_template


# ----------------------------------------------------------------------------- a small Llama-style file

PIECES = ["▁", "▁t", "he", "▁the", "▁a", "an", "▁an", "d", "▁and", "a", "t", "h", "e", "n", "▁c", "at",
          "▁cat", "s", "▁is", "i", "▁h", "ap", "p", "y", "▁happy", "o", "l", "▁hello", "ll", "lo", "▁w",
          "or", "ld", "▁world", "r", "w", "c", "▁▁", "<|user|>", "<think>"]
TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory) -> Path:
    """<unk> <s> </s>, 256 byte tokens, then PIECES scored best-first; <|user|> control, <think>
    user-defined."""
    path = tmp_path_factory.mktemp("spm") / "tiny-spm.gguf"
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * (len(PIECES) - 2) + [3, 4]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(PIECES))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(TEMPLATE)
    for add in (w.add_block_count, w.add_context_length, w.add_embedding_length, w.add_head_count):
        add(8)   # transformers reads a config before the tokenizer
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


LLAMA_SAMPLES = ["the cat is happy", " hello world", "and  the\nZ 🙂", "<|user|>hi <s></s><unk>", "x",
                 "<think>and</think>", "", "  ", "héllo"]


def test_llama_style_matches_transformers(llama_gguf):
    tok, ref = gguf_tokenizer(llama_gguf), reference(llama_gguf)
    got = compare(tok, ref, LLAMA_SAMPLES)
    assert (got["id_mismatch"], got["decode_mismatch"]) == ([], [])
    ours, theirs = json.loads(tok.backend.to_str()), json.loads(ref.backend_tokenizer.to_str())
    ours.pop("post_processor"), theirs.pop("post_processor")   # BOS is the caller's (tok.add_bos)
    assert ours == theirs
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 259 + len(PIECES))
    assert tok.encode("the cat")[0] == PIECES.index("▁the") + 259   # SentencePiece's prefix space


def test_save_load_and_reader_source(llama_gguf, tmp_path):
    tok = gguf_tokenizer(llama_gguf)
    same = gguf_tokenizer(gguf.GGUFReader(str(llama_gguf)))
    tok.save(tmp_path / "ckpt")
    back = load_tokenizer(tmp_path / "ckpt")
    for other in (same, back):
        assert [other.encode(s) for s in LLAMA_SAMPLES] == [tok.encode(s) for s in LLAMA_SAMPLES]
        assert (other.bos_id, other.eos_id, other.add_bos, other.vocab_size, other.chat_template) == \
               (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size, TEMPLATE)
    assert back.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>hi"


def test_unknown_tokenizer_model_names_the_file(llama_gguf, tmp_path):
    from harness.cli import UserError

    bad = tmp_path / "bad.gguf"
    data = llama_gguf.read_bytes()
    value = b"tokenizer.ggml.model" + (8).to_bytes(4, "little") + (5).to_bytes(8, "little")
    assert data.count(value + b"llama") == 1
    bad.write_bytes(data.replace(value + b"llama", value + b"bert!"))
    with pytest.raises(UserError, match=f"{bad}.*'bert!'"):
        gguf_tokenizer(bad)
