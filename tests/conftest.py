"""Shared fixtures: the staged SmolLM2 GGUF and its reference implementation (transformers)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
