"""Our checkpoint folders round-trip; unsafe or mismatched files fail with one clear error."""
from __future__ import annotations

import json

import pytest
import torch

from models.checkpoint import CheckpointError, save_checkpoint
from models.registry import load_model
from models.tokenizer import gpt2_tokenizer


def test_native_checkpoint_round_trip(tmp_path):
    model, tok, _ = load_model("llama-tiny")
    folder = save_checkpoint(tmp_path / "ckpt", model, tok, {"id": "unit-test", "seed": 0})
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "provenance.json", "tokenizer_config.json"]
    loaded, tok2, info = load_model(str(folder))
    ids = torch.tensor([tok.encode("round trip")])
    with torch.inference_mode():
        assert torch.equal(loaded(ids), model(ids))
    assert info["provenance"] == {"id": "unit-test", "seed": 0} and tok2.name == "gpt2"


def test_save_refuses_to_overwrite_and_leaves_no_partial_folder(tmp_path):
    model, tok, _ = load_model("gpt-tiny")
    save_checkpoint(tmp_path / "ckpt", model, tok, {})
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path / "ckpt", model, tok, {})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]   # no temporary folder left behind


def test_pickle_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(str(tmp_path))
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(str(tmp_path / "pytorch_model.bin"))


def test_tokenizer_that_does_not_belong_to_the_model(tmp_path):
    from models.checkpoint import build_model
    small_vocab = build_model("gpt", dict(vocab_size=1000, context_length=64, d_model=32, n_layers=1, n_heads=2))
    folder = save_checkpoint(tmp_path / "ckpt", small_vocab, gpt2_tokenizer(), {})
    with pytest.raises(CheckpointError, match="tokenizer has 50257 tokens"):
        load_model(str(folder))


def test_checkpoint_of_another_architecture_is_named(tmp_path):
    model, tok, _ = load_model("gpt-tiny")
    folder = save_checkpoint(tmp_path / "ckpt", model, tok, {})
    meta = json.loads((folder / "config.json").read_text())
    meta["architecture"] = "llama"
    meta["config"] = dict(vocab_size=50257, context_length=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128)
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit a llama model"):
        load_model(str(folder))
