"""device=auto / dtype=auto: the best device here and the dtype it runs natively, resolved at load
time and written into every row (the rows' dtype and device are comparability keys)."""
from __future__ import annotations

import pytest
import torch

from harness.cli import UserError
from harness.train.loop import TrainSettings
from models.registry import check_device, load_lm, resolve_device, resolve_dtype


def test_auto_on_this_machine_is_what_it_has():
    here = resolve_device("auto")
    assert here == ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and resolve_dtype("float32", "cuda") == "float32"
    assert resolve_dtype("auto", "cpu") == "float32"             # CPU bf16 is opt-in


def test_auto_prefers_cuda_then_bf16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_device("auto") == "cuda" and resolve_dtype("auto", "cuda:1") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # e.g. a V100
    assert resolve_dtype("auto", "cuda") == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == "mps" and resolve_dtype("auto", "mps") == "float32"


def test_the_row_gets_the_resolved_device_and_dtype():
    lm = load_lm("gpt-tiny", progress=False)                       # the config default: auto / auto
    assert (lm.info["device"], lm.info["dtype"]) == (resolve_device("auto"), resolve_dtype("auto", resolve_device("auto")))
    assert next(lm.model.parameters()).device.type == lm.info["device"].split(":")[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_names_the_devices_here():
    with pytest.raises(UserError, match=r"^model.device=cuda: CUDA is not available on this machine; devices here: cpu"):
        check_device("cuda")


def test_training_precision_auto():
    assert TrainSettings(precision="auto", device="cpu").precision == "fp32"
    with pytest.raises(UserError, match="precision must be auto or one of fp32, bf16-mixed"):
        TrainSettings(precision="fp16")
