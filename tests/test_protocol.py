"""The LM protocol is torch-free: the engine and the tasks import, and score, with torch unimportable.

A backend that is not torch (a remote API, another runtime) implements models/protocol.py and
nothing else; this proves no task or engine module pulls torch in behind its back.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from clitools import ENV, ROOT
from models.requests import loglikelihood_units, rolling_units

BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")
sys.meta_path.insert(0, NoTorch())
"""

ENGINE_WITHOUT_TORCH = BLOCK_TORCH + """
import harness.evaluate, tasks.mmlu, tasks.instruct, tasks.multiple_choice, tasks.perplexity, tasks.sms_spam
import models.protocol
from harness.evaluate import evaluate
from models.protocol import LM
from tasks.mmlu import MMLUTask
from tasks.instruction_data import build_prompt, resolve_style

class Letters:
    '''A pure-Python LM: " A" always likeliest; a chat template of its own.'''
    name, info, has_chat_template = "letters", {"model": "letters"}, True
    def loglikelihood(self, requests):
        return [0.0 if cont == " A" else -1.0 for _, cont in requests]
    def loglikelihood_rolling(self, texts, *, max_length=None, stride=None):
        return [-float(len(t)) for t in texts]
    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, seed=None):
        return ["ok"] * len(prompts)
    def count_tokens(self, text):
        return len(text.split())
    def chat_prompt(self, messages, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

lm = Letters()
assert isinstance(lm, LM)
result = evaluate(MMLUTask(["anatomy"], limit=3), lm, sys.argv[1], chunk_size=2)
assert result.n_samples == 3 and result.metrics["acc"].n == 3, result
entry = {"instruction": "Say hi.", "input": ""}
assert build_prompt(entry, lm.chat_prompt, resolve_style("auto", lm.has_chat_template)) == "<user>Say hi.<assistant>"
assert "torch" not in sys.modules
print("engine ran without torch")
"""


def test_engine_and_tasks_run_with_torch_unimportable(tmp_path):
    p = subprocess.run([sys.executable, "-c", ENGINE_WITHOUT_TORCH, str(tmp_path / "run")], cwd=ROOT, env=ENV,
                       text=True, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "engine ran without torch" in p.stdout
    assert len((tmp_path / "run" / "records.jsonl").read_text().splitlines()) == 3


def test_blocking_torch_really_blocks_it():
    p = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import models.lm"], cwd=ROOT, env=ENV, text=True,
                       capture_output=True, timeout=60)
    assert p.returncode != 0 and "torch is blocked" in p.stderr


@pytest.mark.parametrize("n", [1, 5, 16, 17, 33, 40])
def test_rolling_units_are_lm_evals_disjoint_windows(n):
    """models/requests.py (both torch backends) against lm-eval's own window functions."""
    utils = pytest.importorskip("lm_eval.utils")
    toks = list(range(100, 100 + n))
    windows = [utils.make_disjoint_window(w) for w in
               utils.get_rolling_token_windows(token_list=toks, prefix_token=7, max_seq_len=16, context_len=1)]
    ours = rolling_units([toks], prefix_token=7, max_length=16)
    assert [(list(u.tokens), u.targets) for u in ours] == [((ctx + cont)[:-1], [(0, cont)]) for ctx, cont in windows]
    assert sum(len(u.targets[0][1]) for u in ours) == n   # every token scored exactly once


def test_loglikelihood_units_share_one_forward_per_distinct_input():
    pairs = [([1, 2, 3], [4]), ([1, 2, 3], [5]), ([1, 2], [3, 6]), ([9] * 10, [8])]
    units = loglikelihood_units(pairs, max_length=4)
    assert [(u.tokens, u.targets) for u in units] == [
        ((1, 2, 3), [(0, [4]), (1, [5]), (2, [3, 6])]),    # " A".." D" after one context: one pass
        ((9, 9, 9, 9), [(3, [8])])]                         # lm-eval's left truncation to max_length
