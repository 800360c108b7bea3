"""The real Gemma 3 270M (Q4_K_M GGUF, models/registry.py's "gemma3-270m") against transformers reading
the same file, fp32: logits on three prompts (one longer than the 512-token sliding window) and greedy
generation; then every task through the CLI, one small run each (`python -m harness task=...
model=gemma3-270m`): arc_easy, perplexity, mmlu, sms_spam zero-shot and the judged instruct task.
The commands run in this process (clitools.run_module) on the model this module loaded once through
the registry's own load_model: a fresh process would spend most of its 20-30 s importing torch and
loading the same file again. Skipped only when the file is absent and cannot be fetched."""
from __future__ import annotations

import json
import math
import time

import pandas as pd
import pytest
import torch

import models.registry as registry
from clitools import ENV, run_module
from llamacpp import assert_llama_cpp_agrees
from models.gguf_meta import read_metadata
from models.generate import generate_tokens
from models.gguf_export import vocab_from_gguf, write_gguf
from models.lm import end_of_turn_ids
from models.registry import MODELS, fetch, load_model
from models.requests import move_trailing_space
from models.tokenizer import gguf_tokenizer
from tasks.instruction_data import ALPACA_HEADER
from tasks.mmlu import MMLUTask
from test_judge import FakeOllama, chat_body

transformers = pytest.importorskip("transformers")
# one pytest-xdist worker runs this module (tests/conftest.py turns -n's --dist load into loadgroup):
# the model and transformers' reference are loaded once, not once per worker
pytestmark = pytest.mark.xdist_group("gemma3-270m")
NAME = "gemma3-270m"
PROMPTS = [
    "The capital of France is",
    "Question: Which gas do plants absorb from the air for photosynthesis?\nAnswer:",
    # about 700 tokens: the local layers' 512-token window is exceeded by half the prompt
    " ".join(f"Item {i}: the {w} of the river rose by {i % 7} feet." for i, w in
             zip(range(45), ["level", "water", "flow", "bank"] * 12)),
]


@pytest.fixture(scope="module")
def path():
    try:
        return fetch(NAME)
    except Exception as e:  # absent and not fetchable (offline)
        pytest.skip(f"{NAME} unavailable: {e}")


@pytest.fixture(scope="module")
def loaded(path):
    """load_model(NAME) once: (model, tokenizer, info)."""
    model, tokenizer, info = load_model(NAME)
    return model.eval(), tokenizer, info


@pytest.fixture(scope="module")
def ours(loaded):
    return loaded[:2]


@pytest.fixture
def cli(loaded, monkeypatch):
    """The CLI's model=gemma3-270m gets the loaded model (evaluation does not change its weights);
    every other name still goes through the registry."""
    real = registry.load_model
    monkeypatch.setattr(registry, "load_model", lambda name: loaded if name == NAME else real(name))
    return run_cli


@pytest.fixture(scope="module")
def models(path, ours):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    return *ours, hf


def encode(tokenizer, text: str) -> list[int]:
    assert tokenizer.add_bos, "Gemma needs BOS"   # TorchLM prepends it (models/lm.py), as lm-eval does
    return [tokenizer.bos_id] + tokenizer.encode(text)


def test_logits_and_greedy_generation_match_transformers(models):
    ours, tokenizer, hf = models
    deltas, lengths = [], []
    start = time.time()
    for text in PROMPTS:
        ids = torch.tensor([encode(tokenizer, text)])
        lengths.append(ids.shape[1])
        with torch.inference_mode():
            deltas.append((ours(ids) - hf(ids).logits).abs().max().item())
    print(f"\ngemma3-270m prompt lengths {lengths}: max |Δ logits| {[f'{d:.2e}' for d in deltas]} "
          f"({time.time() - start:.1f} s)")
    assert lengths[2] > 512 + 100
    assert max(deltas) <= 1e-3, deltas
    hf.generation_config.eos_token_id = None    # both run the full 16 tokens
    for text in PROMPTS[:2]:
        ids = encode(tokenizer, text)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        assert generate_tokens(ours, [ids], max_new_tokens=16, eos_ids=[-1])[0] == ref


def test_export_keeps_the_sentencepiece_vocabulary_and_llama_cpp_agrees(path, ours, tmp_path):
    """What `harness.export model=gemma3-270m` writes (its steps, on the model already loaded here):
    the weights as f32 and the source file's SentencePiece vocabulary copied key for key; our
    tokenizer reads it back unchanged, and llama.cpp loads it, tokenizes as we do (BOS first) and
    ranks our top 10 next tokens. Its log-probs are a few 1e-3 off ours: ggml's CPU kernels
    over 18 layers, half of it its float16 GELU table (tests/test_new_arch_workflows.py)."""
    model, tokenizer = ours
    out = write_gguf(tmp_path / "gemma.gguf", model, vocab_from_gguf(read_metadata(path)), name="Gemma 3 270m",
                     progress=False)
    source, written = read_metadata(path), read_metadata(out)
    keys = {k for k in written if k.startswith("tokenizer.")}
    assert written["tokenizer.ggml.model"] == "llama" and written["tokenizer.ggml.add_space_prefix"] is False
    assert keys == {k for k in source if k.startswith("tokenizer.")} - {"tokenizer.ggml.add_sep_token"}
    assert all(written[k] == source[k] for k in keys)
    back = gguf_tokenizer(out)
    texts = PROMPTS[:2] + ["  two  spaces,\ttabs, <start_of_turn>user\nHi<end_of_turn>\n日本語 🙂"]
    assert all(back.encode(t) == tokenizer.encode(t) for t in texts)
    assert (back.eos_id, back.bos_id, back.add_bos, back.chat_template) == (1, 2, True, None)
    assert_llama_cpp_agrees(out, model, tokenizer, texts, tol=1e-2)


# --- every task through the CLI ------------------------------------------------------------------

def run_cli(tmp_path, task: str, *overrides: str, env: dict | None = None) -> tuple[list[dict], pd.DataFrame]:
    """`python -m harness task=<task> model=gemma3-270m <overrides>` into a fresh run folder and
    leaderboard: (its records, its leaderboard rows indexed by metric). Every row is this model's and
    task's, finite and with no unscored sample: nothing in these runs has a reason to leave one."""
    run, board = tmp_path / "run", tmp_path / "lb.csv"
    p = run_module("harness", f"task={task}", f"model={NAME}", *overrides, f"leaderboard={board}",
                   f"hydra.run.dir={run}", env=env or ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines() if line.strip()]
    rows = pd.read_csv(board)
    assert set(rows.model) == {NAME} and rows.run_id.nunique() == 1 and rows.metric.is_unique
    assert (rows.n_unscored == 0).all() and (rows.n == len(records)).all(), rows[["metric", "n", "n_unscored"]]
    assert all(math.isfinite(v) for v in rows.value), rows[["metric", "value"]]
    return records, rows.set_index("metric")


def test_arc_easy_through_the_cli(cli, tmp_path):
    assert NAME in MODELS
    records, rows = cli(tmp_path, "arc_easy", "task.limit=20")
    assert len(records) == 20 and set(rows.task) == {"arc_easy"}
    assert {"acc", "acc_norm"} <= set(rows.index)


def test_perplexity_through_the_cli(cli, tmp_path):
    # WikiText-2's first article (1,285 tokens) in 1,024-token windows: two windows, the first one
    # twice as long as the local layers' 512-token sliding window
    records, rows = cli(tmp_path, "perplexity", "task.limit=1", "task.max_length=1024")
    (record,) = records
    s = record["scores"]
    assert record["extra"]["title"] == "Robert Boulter" and s["tokens"] > 1024
    assert math.isfinite(s["loglikelihood"]) and s["loglikelihood"] < 0
    assert set(rows.task) == {"wikitext2"}
    for unit in ("tokens", "words", "bytes"):
        metric = f"{unit.removesuffix('s')}_perplexity"
        assert rows.value[metric] == pytest.approx(math.exp(-s["loglikelihood"] / s[unit]), rel=1e-9)
    assert rows.value["bits_per_byte"] == pytest.approx(math.log2(rows.value["byte_perplexity"]), rel=1e-9)
    assert 2 < rows.value["token_perplexity"] < 100     # the model reads English (about 16 with full context)


def loglikelihood(model, tokenizer, context: str, continuation: str, cache: dict) -> float:
    """log p(continuation | context) from one forward over the whole text without a KV cache, the
    texts paired as TorchLM pairs them (models/requests.py); `cache` keeps hidden states of forwards
    already run (MMLU's four answers share one)."""
    context, continuation = move_trailing_space(context, continuation)
    ctx, whole = encode(tokenizer, context), encode(tokenizer, context + continuation)
    assert whole[:len(ctx)] == ctx
    key = tuple(whole[:-1])
    with torch.inference_mode():
        if key not in cache:
            cache[key] = model.hidden_states(torch.tensor([key]))[0]
        logprobs = model.logits(cache[key][len(ctx) - 1:]).double().log_softmax(-1)
    return sum(logprobs[j, t].item() for j, t in enumerate(whole[len(ctx):]))


def test_mmlu_two_shot_through_the_cli(cli, ours, tmp_path):
    """Two shots make the questions share a long prompt prefix, scored once into the KV cache and
    expanded over the batch: the CLI's log-likelihoods are those of a plain forward over each text."""
    records, rows = cli(tmp_path, "mmlu", "task.subjects=[astronomy]", "task.num_fewshot=2", "task.limit=4")
    assert len(records) == 4 and set(rows.task) == {"mmlu"} and set(rows.split) == {"test"}
    assert set(rows.index) == {"acc", "acc_macro", "acc/astronomy"} and (rows.num_fewshot == 2).all()
    assert rows.value["acc"] == sum(r["scores"]["acc"] for r in records) / 4
    model, tokenizer = ours
    samples, cache = MMLUTask(subjects=["astronomy"], num_fewshot=2, limit=4).samples(), {}
    for sample, record in zip(samples, records):
        assert record["sample_id"] == sample.id and record["target"] == "ABCD"[sample.data["gold"]]
        got = record["extra"]["loglikelihoods"]
        want = [loglikelihood(model, tokenizer, sample.data["context"], c, cache) for c in sample.data["continuations"]]
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4, (got, want)
        assert record["prediction"] == "ABCD"[max(range(4), key=lambda i: (got[i], -i))]


def test_sms_spam_zero_shot_through_the_cli(cli, tmp_path):
    # the test split's first 14 messages: 12 spam, 2 ham
    records, rows = cli(tmp_path, "sms_spam", "task.limit=14")
    assert len(records) == 14 and set(rows.task) == {"sms_spam"}
    assert sorted(r["target"] for r in records) == ["ham"] * 2 + ["spam"] * 12
    for r in records:
        lp = r["extra"]["logprobs"]
        assert r["extra"]["mode"] == "loglikelihood" and all(math.isfinite(v) and v < 0 for v in lp.values())
        assert r["prediction"] == max(lp, key=lp.get) and r["scores"]["acc"] == (r["prediction"] == r["target"])
    cells = {c: rows.value[c] for c in ("tp", "fp", "tn", "fn")}
    assert sum(cells.values()) == 14 and rows.value["acc"] == pytest.approx((cells["tp"] + cells["tn"]) / 14)


def test_end_of_turn_ends_a_generation(ours):
    """The GGUF's EOS is <eos> (1); a turn ends with <end_of_turn> (106), where llama.cpp stops too."""
    _, tokenizer = ours
    assert tokenizer.eos_id == 1 and end_of_turn_ids(tokenizer) == [106]


def test_instruct_through_the_cli(cli, tmp_path):
    """A base model: no chat template, so the Alpaca prompt; the judge is a stand-in Ollama server on
    127.0.0.1 that gives the n-th request a score of 40 + 10 n and keeps what it was asked."""
    asked = []

    def judge(n, request):
        asked.append(request["messages"][-1]["content"])
        return 200, chat_body(str(40 + 10 * n))

    server = FakeOllama(judge)
    try:
        records, rows = cli(tmp_path, "instruct", f"judge.host={server.url}", "judge.model=judge",
                                "task.limit=3", "task.max_new_tokens=32",
                                env=dict(ENV, HARNESS_CACHE=str(tmp_path / "cache")))
    finally:
        server.kill()
    assert len(records) == 3 and len(asked) == 3 and set(rows.task) == {"instruct"}
    for r, question in zip(records, asked):
        prompt, response = r["extra"]["prompt"], r["prediction"]
        assert r["extra"]["prompt_style"] == "alpaca" and prompt.startswith(ALPACA_HEADER)
        assert prompt.endswith("### Response:\n") and r["extra"]["error"] is None
        assert response and response == response.strip() and "\n\n### " not in response
        assert "<end_of_turn>" not in response and "<eos>" not in response
        assert response in question and r["target"] in question    # the judge graded this response
    assert sorted(r["scores"]["score"] for r in records) == [40, 50, 60]
    assert rows.value["score"] == 50 and rows.value["score_ci95_low"] <= 50 <= rows.value["score_ci95_high"]
    assert set(rows.judge_model) == {"judge"}
