"""The rest of the standard suite: lm-eval 0.4 parity on fixture rows, the offline message, the suite run.

The fixtures (tests/fixtures/<name>/<split>.jsonl) are a dozen rows per split in each HF dataset's
own schema, written for these tests (HellaSwag's WikiHow rows carry its bracketed artefacts, some
ctx_b are empty, TruthfulQA's MC2 rows have one to three true answers). lm-eval's side is its own
code: ConfigurableTask built from its own YAML (!function tags resolved by its loader) over the
same rows, its sampler seeded as its evaluator seeds it, its hf backend (HFLM) around transformers'
SmolLM2, and its process_results on what that backend returns.
"""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import ENV, ROOT
from test_tasks import lm_eval_task

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LM_EVAL_YAML = {"hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml", "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
                "piqa": "piqa/piqa.yaml", "boolq": "super_glue/boolq/default.yaml"}
FOLDER = {"truthfulqa_mc1": "truthfulqa", "truthfulqa_mc2": "truthfulqa"}
# the Open LLM Leaderboard's counts where it has one; else 3 (TruthfulQA: shots from validation minus the question)
FEWSHOT = {"hellaswag": 10, "winogrande": 5, "truthfulqa_mc1": 3, "truthfulqa_mc2": 3, "piqa": 3, "boolq": 3}


def fixture_docs(name: str) -> dict[str, list[dict]]:
    from tasks.suite.hf_data import read_local
    folder = FIXTURES / FOLDER.get(name, name)
    return {p.stem: read_local(p) for p in sorted(folder.glob("*.jsonl"))}


def lm_eval_reference(name: str):
    """lm-eval's own task for `name` over the fixture rows, its few-shot sampler seeded as
    lm_eval.evaluator seeds it (fewshot_random_seed 1234)."""
    lm_eval = pytest.importorskip("lm_eval")
    load_yaml = pytest.importorskip("lm_eval.tasks._yaml_loader", reason="lm-eval 0.4.13's loader").load_yaml
    task = lm_eval_task(load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[name]), fixture_docs(name))
    task.set_fewshot_seed(1234)
    return task


def our_task(name: str, monkeypatch, **overrides):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    monkeypatch.setenv("HARNESS_DATA", str(FIXTURES))
    return instantiate(OmegaConf.load(ROOT / "conf" / "task" / f"{name}.yaml"), **overrides)


def lm_eval_requests(ref, num_fewshot: int, limit: int | None = None) -> list[tuple[dict, list]]:
    """(doc, its Instances) for the first `limit` evaluation docs, in lm-eval's order (the sampler's
    state runs on from one doc to the next, as in its build_all_requests)."""
    docs = list(ref.eval_docs)[:limit]
    return [(doc, ref.construct_requests(doc, ref.fewshot_context(doc, num_fewshot), metadata=(ref.task_name, i, 0)))
            for i, doc in enumerate(docs)]


@pytest.mark.parametrize("name", sorted(LM_EVAL_YAML))
@pytest.mark.parametrize("shots", ["zero", "leaderboard"])
def test_requests_equal_lm_evals_own_task(name, shots, monkeypatch):
    from tasks.multiple_choice import choice_requests
    n = 0 if shots == "zero" else FEWSHOT[name]
    samples = our_task(name, monkeypatch, num_fewshot=n).samples()
    ref = lm_eval_reference(name)
    expected = lm_eval_requests(ref, n)
    assert len(samples) == len(expected) == 12
    for sample, (doc, instances) in zip(samples, expected):
        assert choice_requests(sample.data) == [inst.args for inst in instances]
        # lm-eval's gold: doc_to_target, or doc_to_text for its multiple-input task (Winogrande)
        gold = ref.doc_to_text(doc) if name == "winogrande" else ref.doc_to_target(doc)
        assert sample.data["gold"] == gold


def test_hellaswag_preprocess_is_lm_evals():
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    from tasks.suite.benchmarks import hellaswag_preprocess
    for text in (" [header] How to go [title] Step one. [step] Go  on. ", "a [b] c [title] d", "no brackets  here"):
        assert hellaswag_preprocess(text) == utils.preprocess(text)


def test_few_shot_draws_follow_lm_evals_sampler():
    """Several documents in a row, a pool holding a copy of one: the same shots in the same order."""
    samplers = pytest.importorskip("lm_eval.api.samplers")
    from tasks.suite.task import lm_eval_shots
    pool = [{"q": i % 7} for i in range(9)]        # rows 0/7 and 1/8 are copies
    docs = [{"q": 0}, {"q": 3}, {"q": 1}, {"q": 99}]
    ref = samplers.ContextSampler(pool, rnd=None).set_rnd(1234)
    assert lm_eval_shots(pool, docs, 4, 1234) == [ref.sample(4, eval_doc=d) for d in docs]


@pytest.fixture(scope="module")
def lm_eval_hf(smollm2_path, smollm2_reference):
    """lm-eval's hf backend around transformers' SmolLM2 (the same GGUF our native backend reads)."""
    transformers = pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    return HFLM(pretrained=smollm2_reference, tokenizer=tokenizer, batch_size=16, device="cpu")


SHOTS_SCORED = {"winogrande": 2}   # few-shot where it changes the requests' shape (one context per choice)


@pytest.mark.parametrize("name", sorted(LM_EVAL_YAML))
def test_scores_per_row_equal_lm_eval_on_smollm2(name, smollm2_lm, monkeypatch):
    """Every fixture row: our task scored by our native backend, and lm-eval's process_results on
    the same loglikelihoods for its own requests (which equal ours: the test above). That the
    loglikelihoods are transformers' to 1e-4 is the next test's business."""
    num_fewshot = SHOTS_SCORED.get(name, 0)
    task = our_task(name, monkeypatch, num_fewshot=num_fewshot)
    records = task.score(smollm2_lm, task.samples())
    ref = lm_eval_reference(name)
    for record, (doc, instances) in zip(records, lm_eval_requests(ref, num_fewshot), strict=True):
        lls = record.extra["loglikelihoods"]
        assert len(lls) == len(instances)
        expected = ref.process_results(doc, [(ll, False) for ll in lls])
        assert set(record.scores) == {m["metric"] for m in ref.config.metric_list}
        for metric, value in record.scores.items():
            assert value == pytest.approx(float(expected[metric]), rel=1e-12, abs=1e-12), (record.sample_id, metric)


def test_loglikelihoods_equal_lm_evals_hf_backend(lm_eval_hf, smollm2_lm, monkeypatch):
    """Our native backend on the GGUF against lm-eval's hf backend on transformers' reading of it:
    the first row of every task (Winogrande with its few-shot block), every choice, within 1e-4."""
    requests = []
    for name in sorted(LM_EVAL_YAML):
        ref = lm_eval_reference(name)
        requests += [inst for _, instances in lm_eval_requests(ref, SHOTS_SCORED.get(name, 0), limit=1)
                     for inst in instances]
    ours = smollm2_lm.loglikelihood([inst.args for inst in requests])
    theirs = [ll for ll, _ in lm_eval_hf.loglikelihood(requests, disable_tqdm=True)]
    gap = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    print(f"{len(requests)} requests, largest loglikelihood gap {gap:.2e}")
    assert gap < 1e-4


@pytest.mark.parametrize("name", sorted(LM_EVAL_YAML))
def test_each_dataset_is_lm_evals_at_a_pinned_hub_commit(name):
    """The repo and config lm-eval 0.4.13 loads, at a fixed commit (lm-eval reads the hub's main)."""
    import re

    import yaml
    lm_eval = pytest.importorskip("lm_eval")
    load_yaml = pytest.importorskip("lm_eval.tasks._yaml_loader", reason="lm-eval 0.4.13's loader").load_yaml
    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[name])
    ours = yaml.safe_load((ROOT / "conf" / "task" / f"{name}.yaml").read_text())["dataset"]
    assert (ours["repo"], ours["name"]) == (theirs["dataset_path"], theirs.get("dataset_name"))
    assert re.fullmatch(r"[0-9a-f]{40}", ours["revision"]), ours["revision"]


def test_without_a_local_copy_the_hf_dataset_is_loaded_at_the_configured_revision(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(repo, name=None, revision=None, split=None):
        calls.append((repo, name, revision, split))
        return datasets.Dataset.from_list(fixture_docs("winogrande")[split])
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))     # empty: no local copy
    cfg = OmegaConf.load(ROOT / "conf" / "task" / "winogrande.yaml")
    cfg.dataset.revision = "0123abc"
    task = instantiate(cfg, num_fewshot=2)
    assert calls == [("allenai/winogrande", "winogrande_xl", "0123abc", "validation"),
                     ("allenai/winogrande", "winogrande_xl", "0123abc", "train")]
    local = our_task("winogrande", monkeypatch, num_fewshot=2)
    assert [s.data for s in task.samples()] == [s.data for s in local.samples()]
    assert task.version != local.version


def offline_run(module: str, *args, data: Path) -> subprocess.CompletedProcess:
    """`python -m module args` offline, in a subprocess: huggingface_hub and datasets read
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when first imported, which this test process did already."""
    env = dict(ENV, HARNESS_DATA=str(data), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_missing_data_is_one_error_line(tmp_path):
    done = offline_run("harness", "task=hellaswag", "model=gpt-tiny", f"hydra.run.dir={tmp_path / 'run'}",
                       f"leaderboard={tmp_path / 'board.csv'}", data=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: dataset Rowan/hellaswag"), done.stderr
    assert "internet" in lines[0] and f"{tmp_path}/hellaswag/validation.jsonl" in lines[0]
    assert not (tmp_path / "board.csv").exists()


def test_openllm_suite_on_fixtures(tmp_path):
    """Winogrande's rows left out (missing, named); the other fixture sets, and ARC and MMLU from the
    shared data, run at limit=2; the average is over the members that ran and says it is partial."""
    shared = Path(ENV.get("HARNESS_DATA", ""))
    if not (shared / "arc").is_dir() or not (shared / "mmlu").is_dir():
        pytest.skip("needs ARC and MMLU under HARNESS_DATA (../shared/data)")
    data = tmp_path / "data"
    for folder in ("hellaswag", "truthfulqa", "piqa", "boolq"):
        shutil.copytree(FIXTURES / folder, data / folder)
    for folder in ("mmlu", "gsm8k"):
        if (shared / folder).is_dir():
            (data / folder).symlink_to(shared / folder)
    # ARC's 25 shots come from its train split, which is not staged: the Dev rows stand in for it
    arc = data / "arc" / "ARC-Challenge"
    arc.mkdir(parents=True)
    for split in ("Test", "Dev"):
        (arc / f"ARC-Challenge-{split}.jsonl").symlink_to(shared / "arc" / "ARC-Challenge" / f"ARC-Challenge-{split}.jsonl")
    shutil.copy(arc / "ARC-Challenge-Dev.jsonl", arc / "ARC-Challenge-Train.jsonl")
    board, suite_dir = tmp_path / "board.csv", tmp_path / "suite"
    done = offline_run("harness.suite", "suite=openllm", "model=gpt-tiny", "limit=2", f"leaderboard={board}",
                       f"hydra.run.dir={suite_dir}", data=data)
    assert done.returncode == 0, done.stderr[-3000:]
    table = {r["task"]: r for r in csv.DictReader((suite_dir / "suite.csv").open())}
    assert table["winogrande"]["status"] == "missing" and "allenai/winogrande" in table["winogrande"]["reason"]
    has_gsm8k = (ROOT / "conf" / "task" / "gsm8k.yaml").exists()
    if not has_gsm8k:
        assert table["gsm8k"]["status"] == "missing" and "conf/task/gsm8k.yaml" in table["gsm8k"]["reason"]
    ran = [t for t in ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "gsm8k") if table[t]["status"] == "ran"]
    assert set(ran) >= {"arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"}
    assert table["piqa"]["status"] == table["boolq"]["status"] == "ran" and table["piqa"]["counts"] == "extra"
    label = next(t for t in table if t.startswith("average"))
    assert "partial" in label and "winogrande" in label and table[label]["status"] == "partial"
    mean = sum(float(table[t]["score"]) for t in ran) / len(ran)
    assert float(table[label]["score"]) == pytest.approx(mean, abs=1e-4)
    rows = list(csv.DictReader(board.open()))
    leaderboard_counts = {("arc_challenge", "25"), ("hellaswag", "10"), ("mmlu", "5"), ("truthfulqa_mc2", "0"),
                          ("piqa", "0"), ("boolq", "0")}
    assert {(r["task"], r["num_fewshot"]) for r in rows} >= leaderboard_counts
    assert "winogrande" not in {r["task"] for r in rows}
    markdown = (suite_dir / "suite.md").read_text()
    assert (suite_dir / "hellaswag" / "records.jsonl").exists() and "| average" in markdown
    assert markdown.startswith("## Suite openllm (plain-text prompts)")
    assert "winogrande" in done.stdout and "missing" in done.stdout


def test_the_suite_passes_its_prompt_format_to_every_member(monkeypatch):
    """`apply_chat_template=true` on the suite reaches every member's task config, and the table's
    title says how the prompts were shown."""
    from hydra import compose, initialize_config_dir

    from harness.suite import member_config, prompt_format, read_members
    monkeypatch.setenv("HARNESS_DATA", str(FIXTURES))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="suite_eval", overrides=["apply_chat_template=true", "fewshot_as_multiturn=false"])
        members = read_members(cfg)
        jobs = [member_config(cfg, m).task for m in members]
        assert all(j.apply_chat_template is True and j.fewshot_as_multiturn is False for j in jobs)
        piqa = next(m for m in members if m.task == "piqa")
        piqa.built, piqa.status = our_task("piqa", monkeypatch, apply_chat_template=True, fewshot_as_multiturn=False), "ran"
        assert prompt_format(members) == "chat template"
        piqa.built = our_task("piqa", monkeypatch)
        assert prompt_format(members) == "plain-text prompts"
