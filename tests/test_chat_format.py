"""task.apply_chat_template / task.fewshot_as_multiturn (tasks/chat.py) against lm-eval 0.4.13's own
--apply_chat_template, and ARC's seeded few-shot draw against lm-eval's arc tasks.

lm-eval's side is its own code throughout: its task objects build the prompts (fewshot_context and
construct_requests with apply_chat_template, fewshot_as_multiturn and chat_template), and the
chat_template they call is its HFLM.apply_chat_template over transformers' SmolLM2 tokenizer (read
from the same GGUF). Our side renders with the harness's own tokenizer and Jinja setup.
"""
from __future__ import annotations

import functools
import json
import types

import pandas as pd
import pytest
from clitools import run_module
from test_suite import LM_EVAL_YAML, lm_eval_hf, lm_eval_reference, our_task  # noqa: F401  (fixture)
from test_tasks import lm_eval_task, lm_eval_yaml

from models.download import data_root
from tasks.base import Sample, TaskError
from tasks.chat import ChatFormat, qa_turns, render_prompts
from tasks.mmlu import MMLUTask, read_mmlu_csv
from tasks.multiple_choice import MultipleChoiceTask, choice_requests

FORMATS = {"multiturn": True, "single": False}
SUITE_SHOTS = {"hellaswag": 3, "winogrande": 2, "truthfulqa_mc1": 2, "truthfulqa_mc2": 0, "piqa": 2, "boolq": 1}


@pytest.fixture(scope="module")
def hf_chat(smollm2_path):
    """lm-eval's HFLM.apply_chat_template, bound to transformers' tokenizer (no model needed)."""
    transformers = pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    holder = types.SimpleNamespace(tokenizer=tok, chat_template_args={})
    return functools.partial(HFLM.apply_chat_template, holder)


def lm_eval_chat_requests(ref, docs, n: int, multiturn: bool, chat) -> list[list[tuple]]:
    """Each doc's request args, as lm-eval's build_all_requests makes them under --apply_chat_template."""
    out = []
    for i, doc in enumerate(docs):
        ctx = ref.fewshot_context(doc, n, apply_chat_template=True, fewshot_as_multiturn=multiturn, chat_template=chat)
        instances = ref.construct_requests(doc, ctx, metadata=("t", i, 0), apply_chat_template=True, chat_template=chat)
        out.append([inst.args for inst in (instances if isinstance(instances, list) else [instances])])
    return out


# --- the turns and formats themselves -------------------------------------------------------------------

def test_plain_text_is_the_turns_joined_and_versions_only_change_under_a_chat():
    from lm_eval.api.utils import Message, multiturn_to_singleturn
    turns = qa_turns("About X.\n\n", [("Q1?", "A1"), ("Q2?", "")], "Q3?")
    ref = [Message("system", "About X.\n\n"), Message("user", "Q1?", " "), Message("assistant", "A1", "\n\n"),
           Message("user", "Q2?"), Message("user", "Q3?")]
    assert ChatFormat(True, True).messages(turns) == [m.to_dict() for m in ref]
    assert ChatFormat(True, False).messages(turns) == multiturn_to_singleturn(ref)
    assert ChatFormat.from_options(True) == ChatFormat(True, True)         # lm-eval 0.4.13's default
    assert ChatFormat.from_options(True, False) == ChatFormat(True, False)
    assert ChatFormat.from_options(False).version == ""
    with pytest.raises(TaskError, match="needs task.apply_chat_template=true"):
        ChatFormat.from_options(False, True)
    versions = {MMLUTask(subjects=["anatomy"], num_fewshot=1, apply_chat_template=a, fewshot_as_multiturn=m).version
                for a, m in ((False, None), (True, True), (True, False))}
    assert len(versions) == 3


# --- parity: the rendered requests are lm-eval's -------------------------------------------------------

@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("name", sorted(LM_EVAL_YAML))
def test_suite_chat_requests_equal_lm_evals(name, fmt, smollm2_lm, hf_chat, monkeypatch):
    n, multiturn = SUITE_SHOTS[name], FORMATS[fmt]
    task = our_task(name, monkeypatch, num_fewshot=n, apply_chat_template=True, fewshot_as_multiturn=multiturn)
    samples = render_prompts(smollm2_lm, task.samples(), "context", scored_as_text=True)
    ref = lm_eval_reference(name)
    expected = lm_eval_chat_requests(ref, list(ref.eval_docs), n, multiturn, hf_chat)
    assert [choice_requests(s.data) for s in samples] == expected
    assert all(s.data["extra"]["chat_format"] == f"chat-{fmt}" for s in samples)


def mmlu_docs(subject: str, split: str) -> list[dict]:
    return [{"question": i.question, "subject": subject, "choices": list(i.choices), "answer": i.gold}
            for i in read_mmlu_csv(data_root() / "mmlu" / split / f"{subject}_{split}.csv")]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_mmlu_chat_requests_equal_lm_evals(fmt, smollm2_lm, hf_chat):
    """The description becomes the system turn; the answer letter is scored with no leading space."""
    subject = "anatomy"
    ref = lm_eval_task(lm_eval_yaml("mmlu", "default", f"mmlu_{subject}.yaml"),
                       {"test": mmlu_docs(subject, "test"), "dev": mmlu_docs(subject, "dev")})
    task = MMLUTask(subjects=[subject], num_fewshot=5, limit=3, apply_chat_template=True,
                    fewshot_as_multiturn=FORMATS[fmt])
    samples = render_prompts(smollm2_lm, task.samples(), "context", scored_as_text=True)
    expected = lm_eval_chat_requests(ref, list(ref.test_docs())[:3], 5, FORMATS[fmt], hf_chat)
    assert [choice_requests(s.data) for s in samples] == expected
    assert expected[0][0][1] == "A" and "<|im_start|>system\nThe following are" in expected[0][0][0]


def arc_hf_docs(folder: str, split: str) -> list[dict]:
    """ARC rows in the HF dataset's layout (allenai/ai2_arc), which lm-eval's arc tasks read."""
    rows = [json.loads(line) for line in (data_root() / "arc" / folder / f"{folder}-{split}.jsonl").open()]
    return [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]


@pytest.mark.parametrize("fmt", ["plain", "multiturn"])
def test_arc_25_shot_draws_and_prompts_equal_lm_evals(fmt, smollm2_lm, hf_chat):
    """lm-eval's arc_challenge draws shots from its training split with one seeded generator for the
    whole run; the staged data has no Train file, so both sides take the Dev rows as that split."""
    n, limit = 25, 12
    ref = lm_eval_task(lm_eval_yaml("arc", "arc_challenge.yaml"),
                       {"test": arc_hf_docs("ARC-Challenge", "Test")[:limit],
                        "train": arc_hf_docs("ARC-Challenge", "Dev"), "validation": []})
    ref.set_fewshot_seed(1234)
    chat = fmt != "plain"
    task = MultipleChoiceTask(
        name="arc_challenge", path="arc/ARC-Challenge/ARC-Challenge-Test.jsonl", template="cloze",
        question="question.stem", choices="question.choices[].text", labels="question.choices[].label",
        answer="answerKey", id_field="id", fewshot_path="arc/ARC-Challenge/ARC-Challenge-Dev.jsonl",
        fewshot_sampler="random", num_fewshot=n, limit=limit, apply_chat_template=chat)
    samples = render_prompts(smollm2_lm, task.samples(), "context", scored_as_text=True)
    docs = list(ref.test_docs())
    if chat:
        expected = lm_eval_chat_requests(ref, docs, n, True, hf_chat)
    else:
        expected = [[i.args for i in ref.construct_requests(d, ref.fewshot_context(d, n), metadata=("t", k, 0))]
                    for k, d in enumerate(docs)]
    assert [choice_requests(s.data) for s in samples] == expected
    assert len({s.data["context"][:400] for s in samples}) == limit   # each document its own draw


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_gsm8k_chat_prompts_equal_lm_evals(fmt, smollm2_lm, hf_chat):
    from test_generative import lm_eval_gsm8k
    from test_generative import our_task as our_generative
    n_docs = 5
    ref, _ = lm_eval_gsm8k(n_docs)
    ref.set_fewshot_seed(1234)
    ref.build_all_requests(limit=n_docs, apply_chat_template=True, fewshot_as_multiturn=FORMATS[fmt],
                           chat_template=hf_chat, rewrite_requests_cache=True)
    task = our_generative("gsm8k", limit=n_docs, apply_chat_template=True, fewshot_as_multiturn=FORMATS[fmt])
    samples = render_prompts(smollm2_lm, task.samples(), "prompt")
    assert [s.data["prompt"] for s in samples] == [inst.args[0] for inst in ref.instances]
    assert samples[0].data["prompt"].endswith("<|im_start|>assistant\n")


# --- what the model sees: the same tokens, the same log-likelihoods -------------------------------------

def test_chat_requests_score_as_lm_evals_hf_backend(lm_eval_hf, smollm2_lm, monkeypatch):  # noqa: F811
    """Special tokens in the rendered text (<|im_start|>) are single tokens on both sides, and the
    log-likelihoods of chat-formatted requests agree with lm-eval's hf backend within 1e-4."""
    task = our_task("hellaswag", monkeypatch, num_fewshot=1, limit=2, apply_chat_template=True)
    samples = render_prompts(smollm2_lm, task.samples(), "context", scored_as_text=True)
    requests = [pair for s in samples for pair in choice_requests(s.data)]
    context = requests[0][0]
    assert smollm2_lm.encode(context) == lm_eval_hf.tok_encode(context)
    ours = smollm2_lm.loglikelihood(requests)
    from lm_eval.api.instance import Instance
    instances = [Instance("loglikelihood", {}, pair, k) for k, pair in enumerate(requests)]
    theirs = [ll for ll, _ in lm_eval_hf.loglikelihood(instances, disable_tqdm=True)]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4


SYSTEMLESS_TEMPLATE = (   # a Gemma-1/2-style template: a system turn is an error
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_a_template_without_a_system_role_drops_it_as_lm_eval_does(smollm2_lm, hf_chat, monkeypatch):
    monkeypatch.setattr(smollm2_lm.tokenizer, "chat_template", SYSTEMLESS_TEMPLATE)
    monkeypatch.setattr(hf_chat.args[0].tokenizer, "chat_template", SYSTEMLESS_TEMPLATE)
    subject = "anatomy"
    ref = lm_eval_task(lm_eval_yaml("mmlu", "default", f"mmlu_{subject}.yaml"),
                       {"test": mmlu_docs(subject, "test"), "dev": mmlu_docs(subject, "dev")})
    task = MMLUTask(subjects=[subject], num_fewshot=1, limit=2, apply_chat_template=True)
    samples = render_prompts(smollm2_lm, task.samples(), "context", scored_as_text=True)
    assert [choice_requests(s.data) for s in samples] == \
        lm_eval_chat_requests(ref, list(ref.test_docs())[:2], 1, True, hf_chat)
    assert samples[0].data["extra"]["system_dropped"] is True
    assert "The following are" not in samples[0].data["context"]


class ServerRenderedChatTestDouble:
    """TEST DOUBLE of an API-served model (models/api_lm.py): its chat prompts are ChatPrompt values
    the server renders, so the harness never holds their text."""
    name, has_chat_template = "api-test-double", True

    def chat_prompt(self, messages, add_generation_prompt=True):
        from models.api_lm import ChatPrompt
        return ChatPrompt(messages)


def test_loglikelihood_tasks_refuse_a_template_only_the_server_can_render():
    from harness.cli import UserError
    sample = Sample("s", {"context": "Q?", "continuations": ["A"], "extra": {},
                          "chat": {"format": "chat-multiturn", "messages": [{"role": "user", "content": "Q?"}]}})
    with pytest.raises(UserError, match="drop task.apply_chat_template"):
        render_prompts(ServerRenderedChatTestDouble(), [sample], "context", scored_as_text=True)
    rendered = render_prompts(ServerRenderedChatTestDouble(), [sample], "prompt")   # generation: the server's
    assert rendered[0].data["prompt"].messages == [{"role": "user", "content": "Q?"}]


# --- from the command line -----------------------------------------------------------------------------

def test_chat_formatted_run_from_the_command_line(smollm2_path, tmp_path):
    """task=arc_easy on SmolLM2-Instruct through its template: records carry the rendered prompt and
    the format, the leaderboard row's task version differs from the plain run's."""
    board = tmp_path / "board.csv"
    for fmt, extra in (("plain", []), ("chat", ["task.apply_chat_template=true"])):
        done = run_module("harness", "task=arc_easy", "task.limit=3", "model=smollm2-135m-instruct",
                          f"leaderboard={board}", f"hydra.run.dir={tmp_path / fmt}", *extra)
        assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "chat" / "records.jsonl").open()]
    assert len(records) == 3 and all(r["extra"]["chat_format"] == "chat-multiturn" for r in records)
    assert records[0]["extra"]["prompt"].startswith("<|im_start|>system\n")   # SmolLM2's default system turn
    rows = pd.read_csv(board)
    assert rows.task_version.nunique() == 2 and set(rows.task) == {"arc_easy"}

