"""harness.provenance: lineage strings and training data from provenance.json, hand-written and from
real tiny training runs (python -m harness.train, gpt-tiny, one or two steps)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.provenance import lineage, parse_split, short_id, summarise

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SMS_SHA = "7d039a24" + "0" * 56
INSTR_SIG = "instruction/split/v1 seed=123 fractions=0.85,0.05,0.1 sha256=7e09a9af353722ca"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    if not os.environ.get("HARNESS_DATA") and (SHARED / "data").is_dir():
        monkeypatch.setenv("HARNESS_DATA", str(SHARED / "data"))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def train(out: Path, *args: str) -> dict:
    from clitools import run_module   # in this process: a fresh interpreter would add only a torch import
    p = run_module("harness.train", "train=pretrain_tiny", "progress=false", f"output_dir={out}",
                   "train.max_steps=1", *args, env=env())
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads((out / "provenance.json").read_text())


def test_nested_chain_from_a_named_model():
    instruct = {"id": "instruct-20250101T000000Z-ab12cd", "recipe": "instruct", "split": INSTR_SIG,
                "parent": {"name": "smollm2-135m-instruct", "checkpoint_sha": "b179c9523d0e", "provenance": None}}
    dpo = {"id": "dpo-20250102T000000Z-ef34gh", "recipe": "dpo", "split": INSTR_SIG,
           "parent": {"name": "/runs/instruct", "checkpoint_sha": "aaaa", "provenance": instruct}}
    s = summarise(dpo)
    assert s["parent"] == "smollm2-135m-instruct > instruct:ab12cd > dpo:ef34gh"
    described = "instruction train split seed=123 fractions=0.85,0.05,0.1 (7e09a9af)"
    assert s["trained_on"] == f"{described} > {described}"
    # the split's source file is found by its recorded sha256 (prefix) in $HARNESS_DATA
    staged = Path(os.environ["HARNESS_DATA"]) / "instruction/instruction-data.json"
    want = str(staged) if staged.exists() else ""
    assert s["training_files"] == [(want, "7e09a9af353722ca")] * 2


def test_pretrain_then_classify_chain_lists_every_file():
    pre = {"id": "pretrain-20250101T000000Z-111111", "recipe": "pretrain", "parent": None,
           "data": [{"path": "/d/the-verdict.txt", "sha256": "b41e41a6" + "1" * 56, "tokens": 5145},
                    {"path": "/d/tinyshakespeare.txt", "sha256": "86c4e6aa" + "2" * 56}]}
    spam_sig = f"sms_spam/split/v1 seed=123 dedupe=True balance=True fractions=0.7,0.1,0.2 sha256={SMS_SHA}"
    clf = {"id": "classify_spam-20250103T000000Z-222222", "recipe": "classify_spam", "split": spam_sig,
           "config": {"train": {"split": {"path": "/nowhere/SMSSpamCollection"}}},
           "parent": {"name": "/runs/pre", "checkpoint_sha": "c0ffee", "provenance": pre}}
    s = summarise(clf)
    assert s["parent"] == "pretrain:111111 > classify_spam:222222"
    assert s["trained_on"] == ("the-verdict.txt(b41e41a6)+tinyshakespeare.txt(86c4e6aa) > sms_spam train split "
                               "seed=123 dedupe=True balance=True fractions=0.7,0.1,0.2 (7d039a24)")
    # no file on disk has that made-up sha256: the path is unknown, the recorded hash is kept
    assert s["training_files"] == [("/d/the-verdict.txt", pre["data"][0]["sha256"]),
                                   ("/d/tinyshakespeare.txt", pre["data"][1]["sha256"]), ("", SMS_SHA)]


@pytest.mark.parametrize("prov", [None, "", {}, "pretrain-20250101T000000Z-aa", [], 3])
def test_models_without_provenance_summarise_to_empty(prov):
    assert summarise(prov) == {"parent": "", "trained_on": "", "training_files": []}


def test_missing_and_odd_keys_do_not_raise():
    assert summarise({"id": "unit-test"})["parent"] == "unit-test"
    assert summarise({"recipe": "pretrain"}) == {"parent": "pretrain", "trained_on": "", "training_files": []}
    odd = {"id": "x", "parent": {"name": None}, "data": ["not a dict", {"path": "a.txt"}], "split": 7}
    assert summarise(odd) == {"parent": "x", "trained_on": "a.txt()", "training_files": [("a.txt", "")]}
    looped = {"id": "loop"}
    looped["parent"] = {"name": "self", "provenance": looped}
    assert len(lineage(looped).steps) == 64           # a cycle stops at MAX_DEPTH
    assert short_id("classify_spam-20250103T000000Z-abc123") == "classify_spam:abc123"
    assert parse_split("not a signature") is None


def test_parent_recorded_by_id_only_is_read_from_its_folder(tmp_path):
    base = {"id": "pretrain-20250101T000000Z-0a0a0a", "recipe": "pretrain", "parent": None,
            "data": [{"path": "/d/x.txt", "sha256": "ab" * 32}]}
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "provenance.json").write_text(json.dumps(base))
    child = {"id": "pretrain-20250102T000000Z-0b0b0b", "recipe": "pretrain", "data": [],
             "parent": {"name": str(tmp_path / "base"), "checkpoint_sha": "1", "provenance": base["id"]}}
    assert summarise(child)["parent"] == "pretrain:0a0a0a > pretrain:0b0b0b"
    assert summarise(child)["training_files"] == [("/d/x.txt", "ab" * 32)]
    (tmp_path / "base" / "provenance.json").unlink()          # gone: the id is all that is known
    assert summarise(child)["parent"] == "pretrain:0a0a0a > pretrain:0b0b0b"
    assert summarise(child)["training_files"] == []


def test_real_pretrain_and_continuation_carry_the_whole_chain(tmp_path):
    verdict = Path(os.environ["HARNESS_DATA"]) / "pretrain/the-verdict.txt"
    extra = tmp_path / "extra.txt"
    extra.write_text("A small second corpus file, so the first run records two data files.\n" * 40)
    base = train(tmp_path / "base", f"train.data=[{verdict},{extra}]")
    cont = train(tmp_path / "cont", f"train.init_from={tmp_path / 'base'}", "train.model.arch=null",
                 f"train.data=[{extra}]")
    assert cont["parent"]["provenance"] == base          # load_model handed the recipe the full record
    s = summarise(cont)
    base_id, cont_id = (p["id"].rsplit("-", 1)[1] for p in (base, cont))
    assert s["parent"] == f"pretrain:{base_id} > pretrain:{cont_id}"
    sha = {f["path"]: f["sha256"] for f in base["data"]}
    assert s["trained_on"] == (f"the-verdict.txt({sha[str(verdict.resolve())][:8]})+extra.txt"
                               f"({sha[str(extra.resolve())][:8]}) > extra.txt({sha[str(extra.resolve())][:8]})")
    assert s["training_files"] == [(str(verdict.resolve()), sha[str(verdict.resolve())]),
                                   (str(extra.resolve()), sha[str(extra.resolve())]),
                                   (str(extra.resolve()), sha[str(extra.resolve())])]

    # the leaderboard row of an eval of the continuation
    from harness.evaluate import EvalResult, rows_for
    from models.registry import load_lm
    from tasks.base import Metric
    from tasks.mmlu import MMLUTask
    lm = load_lm(str(tmp_path / "cont"), progress=False)
    task = MMLUTask(["anatomy"], limit=2)
    rows = rows_for(task, lm, EvalResult({"acc": Metric(0.5, 0.5, 2)}, 0.1, 2, 0, "run"), 1234, 0.25)
    assert rows[0]["provenance"] == cont["id"] and rows[0]["split"] == "test"
    assert rows[0]["parent"] == s["parent"] and rows[0]["trained_on"] == s["trained_on"]
    assert rows[0]["contamination"] == 0.25
    plain = rows_for(task, load_lm("gpt-tiny", progress=False), EvalResult({"acc": Metric(0.5, 0.5, 2)}, 0, 2, 0, "r"), 1)
    assert [plain[0][k] for k in ("provenance", "parent", "trained_on", "contamination")] == ["", "", "", ""]
