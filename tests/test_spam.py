"""SMS spam: the split, the task (plain LM and classifier), its metrics, LoRA, the classify_spam recipe.

Needs HARNESS_DATA (defaults to ../shared/data beside the repo) for the SMS Spam Collection.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HARNESS_DATA", str(ROOT.parent / "shared" / "data"))

from models.checkpoint import save_checkpoint  # noqa: E402
from models.lora import LoRALinear, apply_lora, merge_lora  # noqa: E402
from models.registry import load_lm, load_model  # noqa: E402
from tasks.base import Record, TaskError  # noqa: E402
from tasks.sms_spam import (LABELS, SmsSpamTask, confusion_cell, load_sms_spam, prompt,  # noqa: E402
                            spam_metrics, spam_split)
from harness.cli import UserError  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
for var, sub in (("HARNESS_DATA", "data"), ("HARNESS_MODELS", "models")):
    if (ROOT.parent / "shared" / sub).is_dir():
        ENV.setdefault(var, str(ROOT.parent / "shared" / sub))


@pytest.fixture(scope="module")
def split():
    return spam_split()


# --- data and split ------------------------------------------------------------------------------

def test_split_sizes_dedupe_balance(split):
    # 5,574 lines, 403 repeated -> 5,171 unique: 653 spam; ham undersampled to 653 -> 1,306
    assert (len(split.train), len(split.val), len(split.test)) == (914, 130, 262)
    everything = split.train + split.val + split.test
    assert len(set(everything)) == len(everything) == 1306
    assert Counter(label for _, label in everything) == {"ham": 653, "spam": 653}
    assert not {t for t, _ in split.test} & {t for t, _ in split.train + split.val}
    assert "seed=123" in split.signature and "fractions=0.7,0.1,0.2" in split.signature
    assert split.signature.endswith("7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d")


def test_split_is_deterministic_and_configurable(split):
    again = spam_split()
    assert again == split
    other = spam_split(seed=7)
    assert other.test != split.test and other.signature != split.signature
    raw = spam_split(dedupe=False, balance=False, fractions=(0.8, 0.0, 0.2))
    n = 5574
    assert (len(raw.train), len(raw.val), len(raw.test)) == (int(0.8 * n), 0, n - int(0.8 * n))
    assert Counter(label for _, label in raw.train + raw.test) == {"ham": 4827, "spam": 747}
    with pytest.raises(TaskError, match="fractions"):
        spam_split(fractions=(0.7, 0.2, 0.2))


def test_unknown_label_names_file_and_line(tmp_path):
    bad = tmp_path / "labels.tsv"
    bad.write_text("ham\thello\nspam\tWIN NOW\nphish\tclick here\n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"labels\.tsv:3: unknown label 'phish'"):
        load_sms_spam(bad)
    (tmp_path / "notab.tsv").write_text("ham hello\n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"notab\.tsv:1"):
        load_sms_spam(tmp_path / "notab.tsv")
    good = tmp_path / "good.tsv"
    good.write_text("ham\ta\tb\r\nspam\tc\n", encoding="utf-8")
    assert load_sms_spam(good) == [("a\tb", "ham"), ("c", "spam")]


def test_fetcher_names_the_folder_and_checks_sha256(tmp_path, monkeypatch):
    import io
    import zipfile

    from models.download import MissingFileError
    from tasks import data
    shared = data.sms_spam_file()
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))

    def fake(archive):
        def download(url, dest, sha256=None, timeout=60.0):
            assert url == data.SMS_SPAM_URL
            if archive is None:
                raise OSError("network unreachable")
            dest.write_bytes(archive)
            return dest
        return download

    monkeypatch.setattr(data, "download", fake(None))
    with pytest.raises(MissingFileError, match=str(tmp_path / "sms_spam")):
        data.sms_spam_file()
    for content, ok in ((b"ham\taltered\n", False), (shared.read_bytes(), True)):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("SMSSpamCollection", content)
            zf.writestr("readme", "r")
        monkeypatch.setattr(data, "download", fake(buf.getvalue()))
        if ok:
            assert data.sms_spam_file().read_bytes() == shared.read_bytes()
        else:
            with pytest.raises(MissingFileError, match="sha256"):
                data.sms_spam_file()
            assert not list(tmp_path.rglob("*"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["SMSSpamCollection", "sms_spam"]


# --- metrics ---------------------------------------------------------------------------------------

def _rec(i, pred, target):
    return Record(str(i), "h", pred, target, {"acc": float(pred == target)}, {"cell": confusion_cell(pred, target)})


def test_metrics_on_hand_made_records():
    pairs = [("spam", "spam")] * 3 + [("spam", "ham")] + [("ham", "spam")] * 2 + [("ham", "ham")] * 4
    records = [_rec(i, p, t) for i, (p, t) in enumerate(pairs)] + [Record("x", "h", None, "ham", {"acc": None})]
    m = spam_metrics(records)
    assert (m["tp"].value, m["fp"].value, m["fn"].value, m["tn"].value) == (3, 1, 2, 4)
    assert m["acc"].value == pytest.approx(0.7) and m["acc"].n == 10 and m["acc"].n_unscored == 1
    assert m["acc"].stderr == pytest.approx(math.sqrt(0.7 * 0.3 / 9))
    assert m["precision"].value == pytest.approx(3 / 4)
    assert m["recall"].value == pytest.approx(3 / 5)
    assert m["f1"].value == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert Counter(r.extra["cell"] for r in records[:10]) == {"tp": 3, "fp": 1, "fn": 2, "tn": 4}


# --- the task ------------------------------------------------------------------------------------

def test_plain_lm_zero_and_few_shot(split):
    task = SmsSpamTask(limit=8)
    samples = task.samples()
    assert [s.data["text"] for s in samples] == [t for t, _ in split.test[:8]]
    lm = load_lm("gpt-tiny", progress=False)
    calls = []
    real = lm.loglikelihood
    lm.loglikelihood = lambda reqs: calls.append(list(reqs)) or real(reqs)
    records = task.score(lm, samples)
    assert len(calls) == 1 and len(calls[0]) == 16                       # one call, " ham"/" spam" each
    assert calls[0][0] == (prompt(samples[0].data["text"]), " ham") and calls[0][1][1] == " spam"
    assert calls[0][0][0].endswith(f"Message: {samples[0].data['text']}\nLabel:")
    assert all(r.prediction in LABELS and r.extra["mode"] == "loglikelihood" for r in records)
    assert set(task.metrics(records)) >= {"acc", "precision", "recall", "f1"}

    few = SmsSpamTask(limit=2, num_fewshot=4)
    assert few.version != task.version and len(few.shots) == 4
    assert [lab for _, lab in few.shots] == ["spam", "ham", "spam", "ham"]
    assert set(few.shots) <= set(split.train)
    assert few.shots == SmsSpamTask(limit=2, num_fewshot=4).shots           # deterministic
    ctx = prompt(few.samples()[0].data["text"], few.shots)
    assert ctx.count("Message: ") == 5 and ctx.count("\nLabel: spam\n\n") == 2


def test_version_follows_the_split():
    assert SmsSpamTask(limit=1).version == SmsSpamTask(limit=3).version
    assert SmsSpamTask(limit=1).version != SmsSpamTask(limit=1, seed=5).version
    assert SmsSpamTask(limit=1).version != SmsSpamTask(limit=1, balance=False).version


def tiny_classifier(folder: Path, labels=("ham", "spam")) -> Path:
    from harness.train.classify import to_classifier
    model, tok, _ = load_model("gpt-tiny")
    to_classifier(model)
    return save_checkpoint(folder, model, tok, {"id": "test"}, labels=list(labels))


def test_classifier_checkpoint_scores_through_its_head(tmp_path):
    lm = load_lm(str(tiny_classifier(tmp_path / "clf")), progress=False)
    assert lm.labels == ["ham", "spam"]
    task = SmsSpamTask(limit=8)
    samples = task.samples()
    records = task.score(lm, samples)
    expected = lm.classify([s.data["text"] for s in samples])
    for r, row in zip(records, expected):
        assert r.extra["mode"] == "classify"
        assert r.prediction == LABELS[max(range(2), key=lambda i: (row[i], -i))]
        assert r.extra["cell"] == confusion_cell(r.prediction, r.target)
    bad = load_lm(str(tiny_classifier(tmp_path / "other", labels=("neg", "pos"))), progress=False)
    with pytest.raises(TaskError, match="ham and spam"):
        task.score(bad, samples)


# --- LoRA ----------------------------------------------------------------------------------------

def test_lora_merge_equals_unmerged():
    torch.manual_seed(0)
    model, _, _ = load_model("llama-tiny")
    x = torch.randint(0, 1000, (2, 9))
    before = model(x)
    names = apply_lora(model, rank=4, alpha=8, targets=["blocks.*"])
    assert names and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.allclose(model(x), before)                                   # B starts at zero
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).lora_b.normal_(std=0.05)
    adapted = model(x)
    assert not torch.allclose(adapted, before, atol=1e-4)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(load_model("llama-tiny")[0].state_dict())
    torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="no nn.Linear"):
        apply_lora(model, 2, 4, targets=["nothing.*"])


def test_frozen_prefix_cache_equals_class_logits():
    from harness.train.classify import encode, pad_states, prefix_states, set_trainable, suffix_class_logits, to_classifier
    from models.classifier import class_logits, pad_right
    for name in ("gpt-tiny", "llama-tiny"):
        model, tok, _ = load_model(name)
        to_classifier(model)
        info = set_trainable(model, 1)
        assert info["frozen_prefix"] == 1
        ids = [encode(tok, t) for t in ("hello there", "WIN a free prize, call 09061701461 now", "ok")]
        tokens, lengths = pad_right(ids, tok.eos_id, model.config.context_length)
        x, lens = pad_states(prefix_states(model, ids, 1, tok.eos_id, model.config.context_length, batch_size=2))
        torch.testing.assert_close(suffix_class_logits(model, x, lens, 1), class_logits(model, tokens, lengths),
                                   rtol=1e-5, atol=1e-5)


# --- the classify_spam recipe, end to end ----------------------------------------------------------

TINY_TRAIN = ["train=classify_spam", "model=gpt-tiny", "train.limit_train=48", "train.limit_val=16",
              "train.epochs=1", "train.eval_every=3", "train.sample_every=3", "train.lr=1e-3", "progress=false"]


def cli(module, *args, cwd=ROOT):
    # in this process (clitools.run_module): a fresh interpreter would add only a torch import
    from clitools import run_module
    return run_module(module, *args, cwd=cwd, env=ENV)


def test_train_then_score_end_to_end(tmp_path):
    import pandas as pd
    out = tmp_path / "spam"
    p = cli("harness.train", *TINY_TRAIN, f"output_dir={out}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "val acc" in p.stdout
    prov = __import__("json").loads((out / "provenance.json").read_text())
    assert prov["complete"] and prov["split"] == spam_split().signature and prov["steps"] == 6
    assert prov["labels"] == ["ham", "spam"] and prov["trainable"]["frozen_prefix"] == 1
    board = tmp_path / "lb.csv"
    p = cli("harness", "task=sms_spam", f"model={out}", "task.limit=12", f"leaderboard={board}",
            f"hydra.run.dir={tmp_path / 'eval'}")
    assert p.returncode == 0, p.stderr
    rows = pd.read_csv(board)
    acc = rows[rows.metric == "acc"].iloc[0]
    assert acc.n == 12 and 0 <= acc.value <= 1 and acc.task == "sms_spam"
    assert {"precision", "recall", "f1", "tp", "fp", "tn", "fn"} <= set(rows.metric)
    assert acc.task_version == SmsSpamTask().version


def test_lora_run_saves_a_plain_checkpoint(tmp_path):
    out = tmp_path / "lora"
    p = cli("harness.train", *TINY_TRAIN, "train.trainable_blocks=0", "train.lora={rank: 4, alpha: 8}",
            "train.limit_train=16", "train.limit_val=8", f"output_dir={out}")
    assert p.returncode == 0, p.stdout + p.stderr
    lm = load_lm(str(out), progress=False)                          # plain Linear layers: loads as usual
    assert lm.labels == ["ham", "spam"]
    prov = __import__("json").loads((out / "provenance.json").read_text())
    assert prov["trainable"]["lora_layers"] == 8 and prov["complete"]


def test_bad_label_file_one_error_line_nothing_overwritten(tmp_path):
    bad = tmp_path / "labels.tsv"
    bad.write_text("ham\thello\nspam\tWIN NOW\nmaybe\twho knows\n", encoding="utf-8")
    out = tmp_path / "existing"
    out.mkdir()
    (out / "run.json").write_text("{}")
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    p = cli("harness.train", *TINY_TRAIN, f"train.split.path={bad}", f"output_dir={out}", "overwrite=true")
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "labels.tsv:3: unknown label 'maybe'" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    p = cli("harness", "task=sms_spam", "model=gpt-tiny", f"task.path={bad}", f"leaderboard={tmp_path / 'lb.csv'}",
            f"hydra.run.dir={tmp_path / 'eval'}")
    assert p.returncode == 2 and "labels.tsv:3" in p.stderr and not (tmp_path / "lb.csv").exists()
