"""Tasks: prompts equal lm-eval's own rendering, data parsing/counts, metric math, scoring plumbing.

lm-eval parity renders the installed lm_eval's task configs on local docs (its `custom_dataset`
hook, so no HF download). Needs HARNESS_DATA (defaults to ../shared/data beside the repo).
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HARNESS_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

from models.download import MissingFileError, data_root  # noqa: E402
from tasks import data  # noqa: E402
from tasks.base import Record, TaskError  # noqa: E402
from tasks.mmlu import MMLUTask, description, read_mmlu_csv  # noqa: E402
from tasks.multiple_choice import MultipleChoiceTask, mean_metric  # noqa: E402
from tasks.perplexity import PerplexityTask, split_wikitext_pages, wikitext_detokenize  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "task"


class ScriptedLMTestDouble:
    """TEST DOUBLE, not a model: prefers one continuation, scores text by its byte length, and
    remembers every call. Only for checking how tasks build requests and aggregate results."""
    name = "test-double"

    def __init__(self, favourite: str = " A"):
        self.favourite, self.calls, self.rolling_kwargs = favourite, [], []

    def loglikelihood(self, requests):
        self.calls.append(list(requests))
        return [0.0 if cont == self.favourite else -1.0 for _, cont in requests]

    def loglikelihood_rolling(self, texts, *, max_length=None, stride=None):
        self.rolling_kwargs.append((max_length, stride))
        return [-0.5 * len(t.encode()) for t in texts]

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, prompts, **kwargs):
        raise NotImplementedError


def lm_eval_task(config: dict, docs: dict[str, list[dict]]):
    """Build lm-eval's ConfigurableTask from a task config over local docs (no network)."""
    pytest.importorskip("lm_eval")
    datasets = pytest.importorskip("datasets")
    from lm_eval.api.task import ConfigurableTask

    def build(**_):
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in docs.items()})
    config = {k: v for k, v in config.items() if k not in ("include", "tag", "dataset_path")}
    return ConfigurableTask(config={**config, "custom_dataset": build})


def lm_eval_yaml(*parts: str) -> dict:
    """An lm-eval task yaml, its `include` merged in underneath (no !function tags needed here)."""
    lm_eval = pytest.importorskip("lm_eval")
    import yaml
    path = (Path(lm_eval.__file__).parent / "tasks").joinpath(*parts)
    config = yaml.safe_load(path.read_text())
    if "include" in config:
        config = {**lm_eval_yaml(*parts[:-1], config["include"]), **config}
    return config


# --- MMLU --------------------------------------------------------------------------------------

def test_mmlu_csv_counts():
    counts = {}
    for split in ("dev", "val", "test"):
        subjects = data.mmlu_subjects(split)
        assert len(subjects) == 57
        counts[split] = sum(len(read_mmlu_csv(data.mmlu_dir() / split / f"{s}_{split}.csv")) for s in subjects)
    assert counts == {"dev": 285, "val": 1531, "test": 14042}


def test_mmlu_csv_quirks_and_malformed_rows(tmp_path):
    good = tmp_path / "x_test.csv"
    good.write_bytes(b'"two\nlines",a,b,"c, d",e,B\r\nq2,1,2,3,4,D')   # quoted newline, CRLF, no final \n
    items = read_mmlu_csv(good)
    assert [i.question for i in items] == ["two\nlines", "q2"]
    assert items[0].choices == ("a", "b", "c, d", "e") and [i.gold for i in items] == [1, 3]
    bad = tmp_path / "y_test.csv"
    bad.write_text("q1,a,b,c,d,A\nq2,a,b,c,D\n")
    with pytest.raises(TaskError, match=r"y_test\.csv:2"):
        read_mmlu_csv(bad)
    bad.write_text("q1,a,b,c,d,E\n")
    with pytest.raises(TaskError, match=r"y_test\.csv:1"):
        read_mmlu_csv(bad)


def test_mmlu_unknown_subject_lists_valid_ones():
    with pytest.raises(TaskError, match="astronomy.*world_religions"):
        MMLUTask(subjects=["astrology"])


def test_mmlu_descriptions_match_lm_eval_yaml():
    for subject in data.mmlu_subjects():
        assert description(subject) == lm_eval_yaml("mmlu", "default", f"mmlu_{subject}.yaml")["description"]


@pytest.mark.parametrize("num_fewshot", [0, 5])
def test_mmlu_prompts_equal_lm_eval_rendering(num_fewshot):
    for subject in ("anatomy", "high_school_european_history"):
        def docs(split):
            return [{"question": i.question, "subject": subject, "choices": list(i.choices), "answer": i.gold}
                    for i in read_mmlu_csv(data.mmlu_dir() / split / f"{subject}_{split}.csv")]
        config = lm_eval_yaml("mmlu", "default", f"mmlu_{subject}.yaml")
        ref = lm_eval_task(config, {"test": docs("test"), "dev": docs("dev")})
        ours = MMLUTask(subjects=[subject], num_fewshot=num_fewshot, limit=4).samples()
        for doc, sample in zip(ref.test_docs(), ours):
            ctx = ref.fewshot_context(doc, num_fewshot)
            requests = ref.construct_requests(doc, ctx, metadata=(subject, 0, 0))
            assert [r.args for r in requests] == [(sample.data["context"], c) for c in sample.data["continuations"]]
            assert ref.doc_to_target(doc) == sample.data["gold"]


def test_mmlu_scores_in_one_call_and_aggregates():
    task = MMLUTask(subjects=["anatomy", "astronomy", "virology"], limit=10)
    samples = task.samples()
    lm = ScriptedLMTestDouble(" A")
    records = task.score(lm, samples)
    assert len(lm.calls) == 1 and len(lm.calls[0]) == 4 * 30 and len(records) == 30
    is_a = [r.target == "A" for r in records]
    assert all(r.prediction == "A" and r.scores["acc"] == float(a) for r, a in zip(records, is_a))
    assert records[0].extra["subject"] == "anatomy" and records[0].extra["loglikelihoods"] == [0.0, -1.0, -1.0, -1.0]
    m = task.metrics(records)
    p = sum(is_a) / 30
    assert m["acc"].value == pytest.approx(p) and m["acc"].n == 30
    assert m["acc"].stderr == pytest.approx(math.sqrt(p * (1 - p) / 29))
    per_subject = [sum(is_a[i:i + 10]) / 10 for i in (0, 10, 20)]
    assert m["acc/astronomy"].value == pytest.approx(per_subject[1])
    assert m["acc_macro"].value == pytest.approx(sum(per_subject) / 3)


def test_mmlu_version_tracks_settings():
    base = MMLUTask(subjects=["anatomy"])
    assert base.version == MMLUTask(subjects=["anatomy"], limit=2).version
    assert base.version != MMLUTask(subjects=["anatomy"], num_fewshot=5).version
    assert base.version != MMLUTask(subjects=["anatomy"], split="val").version


# --- metric math -------------------------------------------------------------------------------

def test_mean_metric_matches_lm_eval_stderr_and_counts_unscored():
    m = mean_metric([1.0, 0.0, 1.0, 1.0, None])
    assert (m.value, m.n, m.n_unscored) == (0.75, 4, 1)
    assert m.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    metrics = pytest.importorskip("lm_eval.api.metrics")
    assert m.stderr == pytest.approx(metrics.mean_stderr([1.0, 0.0, 1.0, 1.0]))
    assert mean_metric([None]).n == 0 and mean_metric([1.0]).stderr is None


def test_perplexity_metrics_on_hand_made_records():
    def rec(ll, words, nbytes, tokens):
        return Record("s", "h", None, None, {"loglikelihood": ll, "words": words, "bytes": nbytes, "tokens": tokens})
    records = [rec(-10.0, 4, 20, 5), rec(-30.0, 6, 60, 15), rec(None, 3, 9, 2)]
    m = PerplexityTask(path=str(data.local_path("pretrain/the-verdict.txt"))).metrics(records)
    assert m["word_perplexity"].value == pytest.approx(math.exp(40 / 10))
    assert m["byte_perplexity"].value == pytest.approx(math.exp(40 / 80))
    assert m["token_perplexity"].value == pytest.approx(math.exp(40 / 20))
    assert m["bits_per_byte"].value == pytest.approx(40 / (80 * math.log(2)))
    assert (m["bits_per_byte"].n, m["bits_per_byte"].n_unscored, m["bits_per_byte"].stderr) == (2, 1, None)
    metrics = pytest.importorskip("lm_eval.api.metrics")   # lm-eval's own aggregations agree
    assert m["word_perplexity"].value == pytest.approx(metrics.weighted_perplexity([(-10.0, 4), (-30.0, 6)]))
    assert m["bits_per_byte"].value == pytest.approx(metrics.bits_per_byte([(-10.0, 20), (-30.0, 60)]))


# --- perplexity / wikitext ------------------------------------------------------------------------

def raw_wikitext() -> str:
    return data.wikitext2_raw().read_text(encoding="utf-8")


def test_wikitext_has_62_documents_that_rebuild_the_file():
    raw = raw_wikitext()
    pages = split_wikitext_pages(raw)
    assert len(pages) == 62
    assert pages[0].startswith(" = Robert Boulter = \n") and pages[1].startswith(" = Du Fu = \n")
    assert all(re.match(r" = [^=].* = $", p.split("\n")[0]) for p in pages)
    assert "\n".join([" "] + pages) == raw     # nothing lost: only the file's leading blank line
    task = PerplexityTask(limit=3)
    assert [s.data["title"] for s in task.samples()] == ["Robert Boulter", "Du Fu", "Kiss You ( One Direction song )"]
    assert len({s.id for s in PerplexityTask().samples()}) == 62


def test_wikitext_detokenizer_cases():
    tokenized = " = = Career = = \n In 1 @,@ 000 @.@ 5 , a well @-@ known ( big ) \" man \" 's dogs ' toys ."
    assert wikitext_detokenize(tokenized) == " == Career ==\nIn 1,000.5, a well-known (big) \"man\"'s dogs' toys ."
    assert wikitext_detokenize("3 \u00b0 C and N people") == "3\u00b0C and 1 people"


def test_wikitext_matches_lm_eval_preprocess():
    pre = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    for sample, page in zip(PerplexityTask().samples(), split_wikitext_pages(raw_wikitext())):
        assert sample.data["text"] == pre.wikitext_detokenizer({"page": page})
        expected = pre.process_results({"page": page}, [-1.0])
        assert expected["word_perplexity"] == (-1.0, sample.data["words"])
        assert expected["bits_per_byte"] == (-1.0, sample.data["bytes"])


def test_perplexity_on_a_file_passes_window_settings(tmp_path):
    text = "Héllo  world.\nSecond line \n"
    f = tmp_path / "doc.txt"
    f.write_text(text, encoding="utf-8")
    task = PerplexityTask(path=str(f), max_length=64, stride=16)
    samples = task.samples()
    assert task.name == "perplexity:doc" and task.num_fewshot == 0 and len(samples) == 1
    assert samples[0].data["text"] == text     # arbitrary files are scored as they are
    lm = ScriptedLMTestDouble()
    records = task.score(lm, samples)
    assert lm.rolling_kwargs == [(64, 16)]
    assert records[0].scores == {"loglikelihood": -0.5 * 28, "words": 5, "bytes": 28, "tokens": 4}
    assert task.metrics(records)["bits_per_byte"].value == pytest.approx(0.5 / math.log(2))
    assert task.version != PerplexityTask(path=str(f), max_length=64, stride=32).version
    assert task.version != PerplexityTask(path=str(f)).version


# --- generic multiple choice (ARC) ----------------------------------------------------------------

ARC_ROW = {"id": "q1", "question": {"stem": "Pick two.", "choices": [
    {"text": "one", "label": "1"}, {"text": "two", "label": "2"}, {"text": "three", "label": "3"}]},
    "answerKey": "2"}


def test_multiple_choice_maps_numeric_labels_and_3_choices(tmp_path):
    f = tmp_path / "arc.jsonl"
    f.write_text(json.dumps(ARC_ROW) + "\n\n")
    common = dict(name="t", path=str(f), question="question.stem", choices="question.choices[].text",
                  labels="question.choices[].label", answer="answerKey", id_field="id")
    lettered = MultipleChoiceTask(**common).samples()[0]
    assert lettered.id == "q1" and lettered.data["gold"] == 1
    assert lettered.data["context"] == "Pick two.\n1. one\n2. two\n3. three\nAnswer:"
    assert lettered.data["continuations"] == [" 1", " 2", " 3"]
    cloze_task = MultipleChoiceTask(**common, template="cloze")
    cloze = cloze_task.samples()[0]
    assert cloze.data["context"] == "Question: Pick two.\nAnswer:"
    assert cloze.data["continuations"] == [" one", " two", " three"]
    records = cloze_task.score(ScriptedLMTestDouble(" two"), [cloze])
    assert (records[0].prediction, records[0].target, records[0].scores) == ("2", "2", {"acc": 1.0, "acc_norm": 1.0})
    assert set(cloze_task.metrics(records)) == {"acc", "acc_norm"}
    f.write_text(json.dumps({**ARC_ROW, "answerKey": "7"}) + "\n")
    with pytest.raises(TaskError, match=r"arc\.jsonl:1"):
        MultipleChoiceTask(**common).samples()


def test_multiple_choice_csv_with_field_list_and_text_answers(tmp_path):
    f = tmp_path / "b.csv"
    f.write_text('q,w,x,y,z,ans\n"Sky?",red,blue,green,grey,blue\n')
    task = MultipleChoiceTask(name="b", path=str(f), format="csv", question="q",
                              choices=["w", "x", "y", "z"], answer="ans", answer_type="text")
    assert task.samples()[0].data["gold"] == 1 and task.samples()[0].data["labels"] == ["A", "B", "C", "D"]


def test_arc_configs_equal_lm_eval_arc_rendering():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    for name, folder in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        task = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
        rows = [json.loads(line) for line in (data_root() / "arc" / folder / f"{folder}-Test.jsonl").open()]
        samples = task.samples()
        assert len(samples) == len(rows) == {"arc_easy": 2376, "arc_challenge": 1172}[name]
        # lm-eval's HF layout of the same rows; check all odd ones (numeric labels, 3 or 5 choices)
        docs = [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]
        picked = [i for i, d in enumerate(docs) if d["choices"]["label"][0] == "1" or len(d["choices"]["label"]) != 4]
        picked += list(range(5))
        assert len(picked) > 20
        some = [docs[i] for i in picked]   # lm-eval also wants its train/validation splits to exist
        ref = lm_eval_task(lm_eval_yaml("arc", f"{name}.yaml"), {"test": some, "train": some, "validation": some})
        for doc, i in zip(ref.test_docs(), picked):
            requests = ref.construct_requests(doc, ref.fewshot_context(doc, 0), metadata=(name, 0, 0))
            ours = samples[i].data
            assert [r.args for r in requests] == [(ours["context"], c) for c in ours["continuations"]]
            assert ref.doc_to_target(doc) == samples[i].data["gold"] and samples[i].id == doc["id"]


def test_every_task_config_instantiates(monkeypatch):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    judge = OmegaConf.load(CONF.parent / "judge" / "ollama.yaml")   # `judge: ${judge}` of judged tasks
    shared = str(data_root())
    for f in sorted(CONF.glob("*.yaml")):
        root = OmegaConf.create({"judge": judge, "task": OmegaConf.load(f)})
        # the suite's HF datasets are not staged: their tasks read the HF-schema fixture rows
        suite_task = root.task.get("_target_") == "tasks.suite.task.SuiteTask"
        monkeypatch.setenv("HARNESS_DATA", str(Path(__file__).parent / "fixtures") if suite_task else shared)
        task = instantiate(root.task, limit=2)
        assert isinstance(task.name, str) and len(task.version) == 16
        assert task.num_fewshot == root.task.get("num_fewshot", 0)   # 0 except GSM8K's lm-eval defaults
        assert 1 <= len(task.samples()) <= 2 * 57


# --- fetchers (download replaced by a local copy: no network in tests) -------------------------------

def fake_download(archive: bytes | None):
    def download(url, dest, sha256=None, timeout=60.0):
        if archive is None:
            raise OSError("network unreachable")
        dest.write_bytes(archive)
        return dest
    return download


def test_fetchers_report_folder_to_fill_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    monkeypatch.setattr(data, "download", fake_download(None))
    for fetch, folder in ((data.mmlu_dir, "mmlu"), (data.wikitext2_raw, "wikitext2/raw"), (data.arc_dir, "arc")):
        with pytest.raises(MissingFileError, match=re.escape(str(tmp_path / folder))):
            fetch()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:   # a wrong MMLU archive fails its sha256 check
        member = tarfile.TarInfo("data/dev/x_dev.csv")
        member.size = 12
        tar.addfile(member, io.BytesIO(b"q,a,b,c,d,A\n"))
    monkeypatch.setattr(data, "download", fake_download(buf.getvalue()))
    with pytest.raises(MissingFileError, match="sha256"):
        data.mmlu_dir()
    assert [p.name for p in tmp_path.rglob("*")] == []


def test_fetchers_extract_archives_atomically(tmp_path, monkeypatch):
    shared = data_root()
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for rel in data.ARC_SHA256:
            zf.write(shared / "arc" / rel, f"ARC-V1-Feb2018-2/{rel}")
        zf.writestr("ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Train.jsonl", "{}")
    monkeypatch.setattr(data, "download", fake_download(buf.getvalue()))
    assert data.local_path("arc/ARC-Easy/ARC-Easy-Dev.jsonl").read_bytes() == \
        (shared / "arc/ARC-Easy/ARC-Easy-Dev.jsonl").read_bytes()
    assert sorted(p.name for p in (tmp_path / "arc").rglob("*.jsonl")) == sorted(Path(r).name for r in data.ARC_SHA256)
    assert not list(tmp_path.glob(".staging-*"))
    # the train split (lm-eval's few-shot pool) only when a task asks for it
    assert data.local_path("arc/ARC-Easy/ARC-Easy-Train.jsonl").read_text() == "{}"
    assert not (tmp_path / "arc/ARC-Challenge/ARC-Challenge-Train.jsonl").exists()


def test_an_absent_arc_train_split_names_the_dev_rows_as_the_offline_fix(tmp_path, monkeypatch):
    shared = data_root()
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    for rel in data.ARC_SHA256:
        (tmp_path / "arc" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "arc" / rel).symlink_to(shared / "arc" / rel)
    monkeypatch.setattr(data, "download", fake_download(None))
    MultipleChoiceTask(**yaml_task("arc_challenge"), limit=2).samples()        # 0-shot: no train split needed
    with pytest.raises(MissingFileError) as err:
        MultipleChoiceTask(**yaml_task("arc_challenge"), num_fewshot=25)
    assert "ARC-Challenge-Train.jsonl" in str(err.value)
    assert "task.fewshot_path=arc/ARC-Challenge/ARC-Challenge-Dev.jsonl task.fewshot_sampler=first_n" in str(err.value)
    task = MultipleChoiceTask(**{**yaml_task("arc_challenge"), "fewshot_path": "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl",
                                 "fewshot_sampler": "first_n"}, num_fewshot=2, limit=1)
    assert task.samples()[0].data["context"].count("Question:") == 3


def yaml_task(name: str) -> dict:
    import yaml
    config = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    config.pop("_target_")
    return {k: v for k, v in config.items() if k not in ("limit", "num_fewshot")}


# --- a real (tiny, randomly initialised) model, when the registry is there ----------------------------

def test_real_tiny_model_scores_mmlu_and_perplexity(tmp_path):
    registry = pytest.importorskip("models.registry")
    lm = registry.load_lm("gpt-tiny")
    mmlu = MMLUTask(subjects=["anatomy", "astronomy"], limit=3)
    records = mmlu.score(lm, mmlu.samples())
    assert len(records) == 6 and 0.0 <= mmlu.metrics(records)["acc"].value <= 1.0
    assert all(len(r.extra["loglikelihoods"]) == 4 for r in records)
    f = tmp_path / "small.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    ppl = PerplexityTask(path=str(f), max_length=32, stride=16)
    metrics = ppl.metrics(ppl.score(lm, ppl.samples()))
    assert all(math.isfinite(m.value) and m.value > 0 for m in metrics.values())
