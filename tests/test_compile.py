"""compile=true (models/compile.py): compiled scoring, decoding and training agree with eager to
rounding, compile a bounded number of graphs (not one per decode step or per layer), and leave
checkpoints as eager runs write them. Tiny models: each compile takes seconds on a small CPU."""
import json
import math

import pytest
import torch

from models.registry import load_lm
from tests.test_train import assert_ok, metrics, train_cli, weights

CONTEXT = "The quick brown fox jumps over the lazy dog. " * 6      # long enough for a shared-prefix cache


@pytest.fixture(scope="module")
def eager_and_compiled():
    torch._dynamo.reset()
    return load_lm("llama-tiny", progress=False), load_lm("llama-tiny", progress=False, compile=True)


def test_scoring_matches_eager(eager_and_compiled):
    eager, compiled = eager_and_compiled
    assert compiled.info["compile"] is True and "compile" not in eager.info
    requests = [(CONTEXT + f"Question {i}:", c) for i in range(3) for c in (" yes", " no", " maybe so")]
    requests.append(("", "A text scored from the start."))
    a, b = eager.loglikelihood(requests), compiled.loglikelihood(requests)
    assert all(math.isfinite(x) for x in b)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    rolling = ["A longer text, scored in rolling windows. " * 8]
    assert abs(eager.loglikelihood_rolling(rolling)[0] - compiled.loglikelihood_rolling(rolling)[0]) < 1e-3


def test_greedy_decoding_matches_eager_without_recompiling_per_step(eager_and_compiled):
    from torch._dynamo.utils import counters

    eager, compiled = eager_and_compiled
    prompts = ["Once upon a time", "A much longer prompt, so that the batch is left-padded: one two three"]
    kw = dict(max_new_tokens=24, temperature=0.0)
    assert compiled.generate(prompts[:1], **kw) == eager.generate(prompts[:1], **kw)
    graphs = counters["stats"]["unique_graphs"]
    assert compiled.generate(prompts, **kw) == eager.generate(prompts, **kw)
    more = ["Another prompt of yet another length, decoded for longer"]
    assert compiled.generate(more, max_new_tokens=40, temperature=0.0) == eager.generate(more, max_new_tokens=40,
                                                                                       temperature=0.0)
    # prefill and decode graphs, and the padded variants: a handful in all, never one per step or length
    assert counters["stats"]["unique_graphs"] - graphs <= 4


def test_training_compiled_matches_eager_and_writes_the_same_checkpoint(tmp_path):
    args = ["train.max_steps=4", "train.eval_every=2", "train.sample_every=0"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert_ok(train_cli(*args, f"output_dir={eager}"))
    p = train_cli(*args, f"output_dir={compiled}", "compile=true")
    assert_ok(p)
    assert "compile=true: each block is compiled" in p.stdout + p.stderr
    a, b = metrics(eager), metrics(compiled)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-4 * max(1.0, abs(x["train_loss"]))
    wa, wb = weights(eager), weights(compiled)
    assert wa.keys() == wb.keys()                                  # no _orig_mod. prefixes
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3
    prov = json.loads((compiled / "provenance.json").read_text())
    assert prov["config"]["compile"] is True
