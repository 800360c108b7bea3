"""Shared fixtures: the staged SmolLM2 GGUF and its reference implementation (transformers)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: one torch thread each, or the workers'
    # thread pools fight over the same cores (set before any test imports torch).
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config):
    """`-n N` alone distributes with --dist load; make it loadgroup, which is load for every test
    without an `xdist_group` mark, so a module marked with one (a heavy module-scoped model, e.g.
    tests/test_gemma3_270m.py) runs on one worker that loads it once, instead of on every worker that
    happens to receive one of its tests. An explicit --dist other than load is left alone."""
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


def pytest_terminal_summary(terminalreporter):
    """The screenshots the browser tests took (tests/test_view.py), so a person can look at what the
    tests saw: their paths are printed at the end of every run, quiet or not."""
    shots = [value for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
             for key, value in getattr(report, "user_properties", ()) if key == "screenshot"]
    if shots:
        terminalreporter.write_sep("-", f"{len(shots)} screenshots of the results viewer")
        for path in sorted(set(shots)):
            terminalreporter.write_line(path)


def models_dir() -> Path:
    return Path(os.environ.get("HARNESS_MODELS", Path.home() / ".cache/harness/models"))


def data_dir() -> Path:
    return Path(os.environ.get("HARNESS_DATA", Path.home() / ".cache/harness/data"))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = models_dir() / GGUF_NAME
    if not path.exists():
        pytest.skip(f"{path} is absent (set HARNESS_MODELS to a folder holding {GGUF_NAME})")
    return path


@pytest.fixture(scope="session")
def smollm2_lm(smollm2_path):
    from models.registry import load_lm
    return load_lm("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_path):
    """transformers' own Llama loaded from the same GGUF: the independent implementation."""
    transformers = pytest.importorskip("transformers")
    import torch
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32)
    return model.eval()


# ----------------------------------------------------------------------------- Ollama-compatible server

@pytest.fixture(scope="session")
def ollama_server(smollm2_path, tmp_path_factory):
    """`python -m harness.serve model=smollm2-135m-instruct host=127.0.0.1 port=0` in a subprocess,
    for the session. Yields an object with `.url` ("http://127.0.0.1:<port>") and `.model` (the
    served name); `.log` is the server's stderr (request log). Terminated at the end."""
    from types import SimpleNamespace

    from harness.serve.process import ServerStartError, spawn_server

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, HARNESS_MODELS=str(models_dir()), HARNESS_DATA=str(data_dir()),
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    log = tmp_path_factory.mktemp("ollama_server") / "stderr.log"
    try:
        with open(log, "w") as err:
            server = spawn_server(["model=smollm2-135m-instruct", "host=127.0.0.1", "port=0"], env=env, cwd=root,
                                  stderr=err, timeout=120)
    except ServerStartError as e:
        pytest.fail(f"{e}:\n{log.read_text()[-3000:]}")
    assert server.url.startswith("http://127.0.0.1:"), server.url      # loopback only
    yield SimpleNamespace(url=server.url, model=server.model, log=log, process=server.process)
    server.stop()
