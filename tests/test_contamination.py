"""harness.contamination: GPT-3-style 13-gram overlap between a task's samples and the training data
in a checkpoint's provenance. End to end on gpt-tiny checkpoints pretrained for one step on a corpus
with MMLU questions planted in it, and on the clean the-verdict.txt."""
from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

import harness.contamination as C
from tasks.base import Sample

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SUBJECT = "high_school_physics"   # its first 40 test questions each have >= 13 words and share no 13-gram


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    for var, sub in (("HARNESS_DATA", "data"), ("HARNESS_MODELS", "models")):
        if not os.environ.get(var) and (SHARED / sub).is_dir():
            monkeypatch.setenv(var, str(SHARED / sub))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))


def cli(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    from clitools import run_module   # in this process: a fresh interpreter would add only a torch import
    p = run_module(module, *args, cwd=cwd, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def pretrain(out: Path, corpus: Path) -> dict:
    cli("harness.train", "train=pretrain_tiny", "progress=false", "train.max_steps=1", f"output_dir={out}",
        f"train.data=[{corpus}]")
    return json.loads((out / "provenance.json").read_text())


def verdict() -> Path:
    return Path(os.environ["HARNESS_DATA"]) / "pretrain/the-verdict.txt"


# --- normalization and hashing ----------------------------------------------------------------------

def test_normalization_is_gpt3s():
    assert C.normalize("Don't STOP: the (with answers)\tcafé_au-lait,  2+2=4!\n") == \
        ["dont", "stop", "the", "with", "answers", "caféaulait", "224"]
    words = [f"w{i}" for i in range(13)]
    one = C.ngram_hashes(words, 13)
    assert len(one) == 1 and len(C.ngram_hashes(words[:12], 13)) == 0 and len(C.ngram_hashes(words, 12)) == 2
    # case, punctuation and spacing do not matter; word order does
    assert C.ngram_hashes(C.normalize("W0, w1 W2 " + " ".join(words[3:]) + "."), 13)[0] == one[0]
    assert C.ngram_hashes(words[::-1], 13)[0] != one[0]
    sample = Sample("s", {"context": "Q?", "choices": [" A", {"deep": "B"}], "gold": 1, "none": None})
    assert C.sample_text(sample) == "Q?\n A\nB"


def test_a_chunked_file_hashes_like_the_whole_text(tmp_path, monkeypatch):
    text = "".join(f"line {i} of a text that is long enough to span several read chunks\n" for i in range(3000))
    (path := tmp_path / "big.txt").write_text(text)
    monkeypatch.setattr(C, "CHUNK_BYTES", 4096)         # ~50 chunks; n-grams must cross their edges
    from models.download import sha256_file
    chunked = C.training_ngrams(C.Source(sha256_file(path), "big", lambda: [C._file_chunks(path, sha256_file(path))]), 13)
    import numpy as np
    assert np.array_equal(chunked, np.unique(C.ngram_hashes(C.normalize(text), 13)))


# --- end to end --------------------------------------------------------------------------------------

def test_planted_mmlu_questions_are_found_and_cached(tmp_path, caplog):
    from tasks.mmlu import MMLUTask, mmlu_dir, read_mmlu_csv
    questions = read_mmlu_csv(mmlu_dir() / "test" / f"{SUBJECT}_test.csv")
    assert all(len(C.normalize(q.question)) >= 13 for q in questions[:40])
    planted = [q.question for q in questions[5:35]]      # 30 of the first 40, verbatim
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(verdict().read_text() + "\n" + "\n\n".join(planted) + "\n")
    prov = pretrain(tmp_path / "dirty", corpus)

    board, cache = tmp_path / "lb.csv", tmp_path / "cache" / "contamination"
    args = ["task=mmlu", f"task.subjects=[{SUBJECT}]", "task.limit=40", f"model={tmp_path / 'dirty'}",
            f"leaderboard={board}"]
    first = cli("harness", *args, f"hydra.run.dir={tmp_path / 'e1'}", cwd=tmp_path)
    import pandas as pd
    rows = pd.read_csv(board, keep_default_na=False)
    assert len(rows) == 3 and (rows.contamination == 0.75).all()         # exactly 30 / 40
    assert (rows.split == "test").all() and (rows.provenance == prov["id"]).all()
    assert (rows.parent == "pretrain:" + prov["id"].rsplit("-", 1)[1]).all()
    assert (rows.trained_on == f"corpus.txt({prov['data'][0]['sha256'][:8]})").all()
    assert "hashing the 13-grams of corpus.txt" in first.stdout + first.stderr
    assert len(list(cache.glob("ngrams-*.npy"))) == 1 and len(list(cache.glob("fraction-*.json"))) == 1

    # the same eval again: the cached fraction, nothing re-hashed
    again = cli("harness", *args, f"hydra.run.dir={tmp_path / 'e2'}", cwd=tmp_path)
    log = again.stdout + again.stderr
    assert "hashing the" not in log and "30 of 40 mmlu samples (0.7500) share" in log and "(cached)" in log
    assert (pd.read_csv(board, keep_default_na=False).contamination == 0.75).all()

    # another sample set: a new fraction from the cached training n-grams (no file is read)
    hashed = []
    real = C._hash_document
    C._hash_document = lambda *a: hashed.append(1) or real(*a)
    try:
        caplog.set_level(logging.INFO, logger="harness")
        assert C.contamination_cell(prov, MMLUTask([SUBJECT], limit=10)) == 0.5     # questions 5..9 of 0..9
        assert C.contamination_cell(prov, MMLUTask([SUBJECT], limit=10), n=0) == ""  # disabled
    finally:
        C._hash_document = real
    assert hashed == [] and "hashing" not in caplog.text
    assert len(list(cache.glob("fraction-*.json"))) == 2


def test_clean_pretraining_data_shows_zero(tmp_path):
    from tasks.mmlu import MMLUTask
    prov = pretrain(tmp_path / "clean", verdict())
    board = tmp_path / "lb.csv"
    cli("harness", "task=mmlu", f"task.subjects=[{SUBJECT}]", "task.limit=20", f"model={tmp_path / 'clean'}",
        f"leaderboard={board}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    import pandas as pd
    assert (pd.read_csv(board, keep_default_na=False).contamination == 0.0).all()
    # the eval of the training text itself is all contamination
    from tasks.perplexity import PerplexityTask
    assert C.contamination_cell(prov, PerplexityTask(path=str(verdict()))) == 1.0
    assert C.contamination_cell(prov, MMLUTask([SUBJECT], limit=20), n=5) == 0.0


def test_models_without_provenance_get_an_empty_cell(tmp_path):
    board = tmp_path / "lb.csv"
    cli("harness", "task=mmlu", f"task.subjects=[{SUBJECT}]", "task.limit=3", "model=gpt-tiny",
        f"leaderboard={board}", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    import pandas as pd
    rows = pd.read_csv(board, keep_default_na=False)
    assert (rows.contamination == "").all() and (rows.parent == "").all() and not (tmp_path / "cache").exists()


# --- unavailable data: a warning and an empty cell, never an error ----------------------------------

def test_gone_or_changed_training_files_give_an_empty_cell(tmp_path, caplog):
    from models.download import sha256_file
    from tasks.perplexity import PerplexityTask
    (data := tmp_path / "data.txt").write_text(verdict().read_text())
    prov = {"id": "pretrain-20250101T000000Z-abcdef", "recipe": "pretrain", "parent": None,
            "data": [{"path": str(data), "sha256": sha256_file(data)}]}
    task = PerplexityTask(path=str(verdict()))
    caplog.set_level(logging.WARNING, logger="harness")
    data.write_text("edited after training " * 20)
    assert C.contamination_cell(prov, task) == "" and "changed since training" in caplog.text
    assert not list((tmp_path / "cache" / "contamination").glob("ngrams-*"))   # nothing cached for it
    data.unlink()
    assert C.contamination_cell(prov, task) == "" and "is gone" in caplog.text
    assert C.contamination_cell({"id": "x", "recipe": "pretrain"}, task) == "" and "records no training data" in caplog.text
    assert C.contamination_cell({"id": "x", "split": "mystery/split/v1 seed=1 sha256=00"}, task) == ""
    assert C.contamination_cell("", task) == "" and C.contamination_cell({}, task) == ""


# --- split signatures map back to their data -------------------------------------------------------

def test_spam_split_signature_uses_the_train_part_only():
    from tasks.sms_spam import SmsSpamTask, spam_split
    split = spam_split()
    prov = {"id": "classify_spam-20250101T000000Z-abcdef", "recipe": "classify_spam", "split": split.signature,
            "config": {"train": {"split": {"path": None}, "limit_train": 48}},
            "parent": {"name": "gpt-tiny", "checkpoint_sha": "init", "provenance": None}}
    seen = SmsSpamTask(split="train", limit=48)
    # the trained-on messages: dirty exactly when long enough to hold a 13-gram of the message itself
    # (a sample's text also holds its label, which the training messages do not)
    want = sum(len(C.normalize(t)) >= 13 for t, _ in split.train[:48]) / 48
    assert 0 < want < 1 and C.contamination_cell(prov, seen) == round(want, 6)
    unseen = SmsSpamTask(split="train")          # messages 48.. were not trained on (limit_train=48)
    assert C.measure(prov, unseen.samples()[48:], "rest").n_contaminated < C.measure(prov, seen.samples(), "seen").n_contaminated


def test_instruction_split_signature_is_recut():
    from tasks.instruction_data import instruction_split
    split = instruction_split()
    prov = {"id": "instruct-20250101T000000Z-abcdef", "recipe": "instruct", "split": split.signature,
            "parent": {"name": "smollm2-135m-instruct", "provenance": None}}
    as_samples = lambda entries: [Sample(str(i), dict(e)) for i, e in enumerate(entries)]   # noqa: E731
    train = C.measure(prov, as_samples(split.train[:50]), "instruction-train")
    assert train.n_contaminated == sum(len(C.normalize("\n".join(e.values()))) >= 13 for e in split.train[:50])
    test = C.measure(prov, as_samples(split.test), "instruction-test")
    assert test.fraction < 0.1       # the split keeps repeated instructions together; outputs may echo
