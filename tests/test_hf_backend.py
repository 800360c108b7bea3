"""`model=hf:<folder>`: the transformers backend scores what lm-eval's own `hf` backend scores.

The folder is the staged SmolLM2 GGUF as transformers dequantizes it, written by save_pretrained
once per session. Three implementations score the same MMLU requests: ours over transformers
(models/hf.py), lm-eval's HFLM over the same folder, and the native backend over the GGUF.
"""
from __future__ import annotations

import csv
import json

import pytest

from clitools import run_module

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from harness.cli import UserError  # noqa: E402
from harness.config import rewrite_argv  # noqa: E402
from models.download import sha256_file  # noqa: E402
from models.protocol import LM  # noqa: E402
from tasks.mmlu import MMLUTask  # noqa: E402
from tasks.multiple_choice import first_argmax  # noqa: E402

SUBJECTS = ["anatomy", "astronomy"]
TEXT = "The quick brown fox jumps over the lazy dog. It was 1984, and 42 clocks were striking thirteen."


@pytest.fixture(scope="session")
def hf_folder(smollm2_path, smollm2_reference, tmp_path_factory):
    """save_pretrained of transformers' model + tokenizer from the GGUF (the reference model is
    reused; its GGUF quantizer is set aside only while saving, and dropped from config.json)."""
    folder = tmp_path_factory.mktemp("smollm2_hf")
    quantizer, smollm2_reference.hf_quantizer = smollm2_reference.hf_quantizer, None
    try:
        smollm2_reference.save_pretrained(folder)
    finally:
        smollm2_reference.hf_quantizer = quantizer
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_lm(hf_folder):
    from models.hf import load_hf_lm
    return load_hf_lm(str(hf_folder), progress=False)


@pytest.fixture(scope="module")
def lmeval(hf_folder):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=str(hf_folder), batch_size=8, device="cpu")


def lmeval_loglikelihood(hflm, requests):
    from lm_eval.api.instance import Instance
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
    return [ll for ll, _ in hflm.loglikelihood(inst, disable_tqdm=True)]


def predictions(samples, lls):
    out, at = [], 0
    for s in samples:
        k = len(s.data["continuations"])
        out.append(first_argmax(lls[at:at + k]))
        at += k
    return out


def test_is_the_lm_protocol_with_a_digest_of_its_weights(hf_lm, hf_folder):
    assert isinstance(hf_lm, LM) and hf_lm.has_chat_template and hf_lm.labels is None
    assert hf_lm.info["checkpoint_sha"] == sha256_file(hf_folder / "model.safetensors")[:12]
    assert hf_lm.info["model"] == f"hf:{hf_folder.name}" and hf_lm.info["dtype"] == "float32"
    assert hf_lm.info["device"] == "cpu" and hf_lm.max_length == 8192


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_mmlu_equals_lm_eval_hf_and_the_native_backend(hf_lm, lmeval, smollm2_lm, num_fewshot, monkeypatch):
    samples = MMLUTask(SUBJECTS, num_fewshot=num_fewshot, limit=3).samples()
    requests = [(s.data["context"], c) for s in samples for c in s.data["continuations"]]
    prefixes = []
    build = hf_lm._prefix_cache
    monkeypatch.setattr(hf_lm, "_prefix_cache", lambda toks: prefixes.append(len(toks)) or build(toks))
    ours = hf_lm.loglikelihood(requests)
    ref = lmeval_loglikelihood(lmeval, requests)
    native = smollm2_lm.loglikelihood(requests)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-4
    assert predictions(samples, ours) == predictions(samples, ref) == predictions(samples, native)
    if num_fewshot:   # the few-shot block was run once per subject, its KV cache shared
        assert len(prefixes) == len(SUBJECTS) and min(prefixes) >= 64


def test_rolling_windows_and_empty_context_equal_lm_eval(hf_lm, lmeval):
    from lm_eval.api.instance import Instance
    saved, lmeval._max_length = lmeval._max_length, 16   # several disjoint windows
    try:
        ref = lmeval.loglikelihood_rolling(
            [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(TEXT,), idx=0)], disable_tqdm=True)
    finally:
        lmeval._max_length = saved
    assert hf_lm.loglikelihood_rolling([TEXT], max_length=16)[0] == pytest.approx(ref[0], abs=1e-4)
    assert hf_lm.loglikelihood_rolling([""]) == [0.0]
    pairs = [("", "Hello world"), ("Question: 2+2?\nAnswer: ", "4")]   # BOS-predicted; trailing space moves
    for a, b in zip(hf_lm.loglikelihood(pairs), lmeval_loglikelihood(lmeval, pairs)):
        assert a == pytest.approx(b, abs=1e-4)


def test_generation_chat_template_and_stop_strings(hf_lm, smollm2_lm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = hf_lm.chat_prompt(messages)
    assert prompt == smollm2_lm.chat_prompt(messages)
    assert hf_lm.generate([prompt], max_new_tokens=20) == ["The capital of France is Paris."]
    assert hf_lm.generate([prompt, "1, 2, 3,"], max_new_tokens=20, stop=["Paris", " 6"]) == \
        ["The capital of France is ", " 4, 5,"]
    assert hf_lm.count_tokens(TEXT) == len(hf_lm.tokenizer.encode(TEXT, add_special_tokens=False))


def test_rewrite_argv_selects_the_hf_config():
    assert rewrite_argv(["model=hf:org/name", "task=mmlu"]) == ["model=hf", "model.name=org/name", "task=mmlu"]
    assert rewrite_argv(["-m", "model=hf:/a/b,hf:c/d"]) == ["-m", "model=hf", "model.name=/a/b,c/d"]
    with pytest.raises(UserError, match="cannot mix hf: models"):
        rewrite_argv(["model=hf:/a/b,gpt-tiny"])
    with pytest.raises(UserError, match="needs a folder or hub id"):
        rewrite_argv(["model=hf:"])


def test_cli_scores_mmlu_through_the_hf_backend(hf_folder, tmp_path):
    board = tmp_path / "lb.csv"
    p = run_module("harness", "task=mmlu", f"model=hf:{hf_folder}", "task.subjects=[anatomy]", "task.limit=3",
                   f"leaderboard={board}", f"hydra.run.dir={tmp_path / 'run'}")   # in-process: same status, output
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(board.open()))
    acc = next(r for r in rows if r["metric"] == "acc")
    assert acc["model"] == f"hf:{hf_folder.name}" and acc["n"] == "3" and acc["dtype"] == "float32"
    assert acc["checkpoint_sha"] == sha256_file(hf_folder / "model.safetensors")[:12]
    assert len((tmp_path / "run" / "records.jsonl").read_text().splitlines()) == 3
