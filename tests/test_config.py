"""Every config composes for every task x model; tasks and the tiny models instantiate."""
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
for var, sub in (("HARNESS_DATA", "data"), ("HARNESS_MODELS", "models")):
    if (ROOT.parent / "shared" / sub).is_dir():
        os.environ.setdefault(var, str(ROOT.parent / "shared" / sub))

TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
REGISTRY = ["smollm2-135m-instruct", "gpt2-124m", "gpt2-355m", "gpt2-774m", "gpt2-1558m",
            "gpt-tiny", "llama-tiny", "gemma3-270m"]


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def test_groups_are_complete():
    assert {"mmlu", "perplexity"} <= set(TASKS)
    assert set(REGISTRY) | {"checkpoint", "hf"} <= set(MODELS)
    from models.registry import MODELS as registered

    assert set(registered) <= set(MODELS), "every registered model needs a conf/model/<name>.yaml"
    assert (CONF / "__init__.py").exists()


def test_defaults():
    cfg = _compose()
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.seed == 1234
    assert cfg.task._target_ == "tasks.mmlu.MMLUTask"
    assert cfg.leaderboard == "results/leaderboard.csv"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_model_pair_composes(task, model):
    # name comes from model=<path> / model=hf:<x> / model=ollama:<x> / model=openai:<x>
    path_config = model in ("checkpoint", "hf", "ollama", "openai")
    extra = ["model.name=/tmp/some/checkpoint"] if path_config else []
    cfg = _compose(f"task={task}", f"model={model}", *extra)
    assert cfg.task._target_.startswith("tasks.")
    served = {"ollama": "models.ollama_lm.load_ollama_lm", "openai": "models.openai_lm.load_openai_lm"}
    if model in served:                            # a model an API serves: no dtype or device here
        assert cfg.model._target_ == served[model]
        return
    assert cfg.model._target_ == ("models.hf.load_hf_lm" if model == "hf" else "models.registry.load_lm")
    assert cfg.model.dtype == "auto" and cfg.model.device == "auto"   # resolved at load (registry.resolve_device)
    if not path_config:
        assert cfg.model.name == model


def test_hydra_dirs_and_chdir():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", return_hydra_config=True)
    raw = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert raw["job"]["chdir"] is False
    assert "${hydra:runtime.choices.task}" in raw["run"]["dir"]
    assert raw["sweep"]["subdir"].startswith("${hydra.job.num}")


@pytest.mark.parametrize("task", TASKS)
def test_every_task_instantiates(task, monkeypatch):
    node = _compose(f"task={task}").task
    if node._target_ == "tasks.suite.task.SuiteTask":   # HF datasets not staged: the fixture rows
        monkeypatch.setenv("HARNESS_DATA", str(Path(__file__).parent / "fixtures"))
    obj = instantiate(node)
    assert obj.name and isinstance(obj.version, str) and obj.version
    assert isinstance(obj.num_fewshot, int)
    for attr in ("samples", "score", "metrics"):
        assert callable(getattr(obj, attr))


@pytest.mark.parametrize("model", ["gpt-tiny", "llama-tiny"])
def test_tiny_models_instantiate(model):
    lm = instantiate(_compose(f"model={model}").model)
    assert lm.name
    assert {"model", "checkpoint_sha", "dtype", "device", "batch_size", "provenance"} <= set(lm.info)
    assert len(lm.loglikelihood([("Hello", " world")])) == 1


@pytest.mark.parametrize("judge", sorted(p.stem for p in (CONF / "judge").glob("*.yaml")))
def test_every_judge_instantiates_without_contacting_its_server(judge):
    obj = instantiate(_compose(f"judge={judge}", "task=instruct").judge)
    assert obj.model and obj.style == "zero_to_hundred" and obj.harden and not obj.self_consistency
    assert obj.where.startswith(("judge.host=", "judge.base_url="))
