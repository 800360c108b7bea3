"""Model files whose config does not fit their weights, bad sizes, corrupt JSON and absent devices:
each is refused with one CheckpointError / ValueError naming the file and key, before the model is
allocated or any tensor data is read."""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import models.checkpoint as ckpt
from clitools import ENV, ROOT, run_module
from harness.cli import UserError
from models.checkpoint import CheckpointError, save_checkpoint
from models.gpt import GPT
from models.llama import Llama
from models.registry import available_devices, load_lm, load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """gpt-tiny and llama-tiny (seed-0 init) as our checkpoint folders, written once."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name in ("gpt-tiny", "llama-tiny"):
        model, tok, _ = load_model(name)
        out[name] = save_checkpoint(root / name, model, tok, {"id": name})
    return out


def variant(src: Path, dest: Path, config=None, weights: dict | None = None) -> Path:
    """A copy of checkpoint folder `src` with config.json replaced by `config` (an object is written as
    JSON, a str as is) and/or the weights replaced by `weights`."""
    shutil.copytree(src, dest)
    if config is not None:
        (dest / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        save_file(weights, str(dest / "model.safetensors"))
    return dest


def native_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture
def no_allocation(monkeypatch):
    """Fails the test if a model is built off the meta device or tensor data is read."""
    devices = []
    for cls in (GPT, Llama):
        init = cls.__init__
        monkeypatch.setattr(cls, "__init__", lambda self, cfg, init=init: (
            devices.append(str(torch.get_default_device())), init(self, cfg))[1])
    read = ckpt._read_safetensors

    def header_only(files, header_only=False):
        assert header_only, "tensor data was read before the config was checked"
        return read(files, header_only)
    monkeypatch.setattr(ckpt, "_read_safetensors", header_only)
    yield devices
    assert set(devices) <= {"meta"}, devices


# --- 1. the config is checked against the file's shapes before anything is allocated ------------

def test_default_config_beside_small_weights_names_both_sizes(saved, tmp_path, no_allocation):
    folder = variant(saved["gpt-tiny"], tmp_path / "ck", {"architecture": "llama", "config": {}})
    with pytest.raises(CheckpointError) as e:
        load_model(str(folder))
    assert str(e.value).startswith(f"{folder}/config.json describes a llama model of 6.74B parameters but "
                                   "model.safetensors holds 3.33M")
    assert "restore the config.json" in str(e.value)
    assert no_allocation and set(no_allocation) == {"meta"}   # the shapes came from meta models


def test_same_count_but_wrong_shapes_is_refused_before_reading(saved, tmp_path, no_allocation):
    meta = native_config(saved["gpt-tiny"])
    meta["config"] |= {"vocab_size": meta["config"]["vocab_size"] - 1, "context_length": 257}  # same count
    folder = variant(saved["gpt-tiny"], tmp_path / "ck", meta)
    with pytest.raises(CheckpointError, match=r"does not fit a gpt model .*wrong shape: pos_emb.weight, tok_emb"):
        load_model(str(folder))


def test_missing_and_unexpected_tensors_are_refused_before_reading(saved, tmp_path):
    state = load_file(str(saved["gpt-tiny"] / "model.safetensors"))
    state["final_norm.shift"] = state.pop("final_norm.bias")
    folder = variant(saved["gpt-tiny"], tmp_path / "ck", weights=state)
    with pytest.raises(CheckpointError, match="missing: final_norm.bias; unexpected: final_norm.shift"):
        load_model(str(folder))


def test_sharded_checkpoint_is_checked_and_loads(saved, tmp_path):
    folder = variant(saved["gpt-tiny"], tmp_path / "ck")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _, _ = load_model(str(folder))
    assert torch.equal(model.tok_emb.weight, state["tok_emb.weight"])
    meta = native_config(folder) | {"config": {"n_layers": 3, "d_model": 64, "n_heads": 4, "context_length": 256}}
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="but the 2 shards of .* holds 3.33M"):
        load_model(str(folder))


# --- 2. sizes no model can have; unknown keys ----------------------------------------------------

@pytest.mark.parametrize("name,key", [(n, k) for n, keys in (
    ("gpt-tiny", ("d_model", "n_layers", "n_heads", "vocab_size", "context_length")),
    ("llama-tiny", ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "context_length")))
    for k in keys])
@pytest.mark.parametrize("value", [0, -8])
def test_non_positive_size_names_file_and_key(saved, tmp_path, no_allocation, name, key, value):
    meta = native_config(saved[name])
    meta["config"][key] = value
    folder = variant(saved[name], tmp_path / "ck", meta)
    with pytest.raises(CheckpointError, match=rf"^{folder}/config.json: {key}={value} is not valid; it must be a "
                                              "whole number >= 1$"):
        load_model(str(folder))


@pytest.mark.parametrize("change,needle", [
    ({"d_modle": 64}, "unknown gpt config key 'd_modle'; known keys: vocab_size"),
    ({"n_heads": 5}, "d_model=64 is not valid; it must be a multiple of n_heads=5"),
    ({"d_model": 64.5}, "d_model=64.5 is not valid"),
    ({"dropout": 1.5}, "dropout=1.5 is not valid; it must be a number in [0, 1)"),
    ({"tie_embeddings": "no"}, "tie_embeddings='no' is not valid; it must be true or false"),
])
def test_bad_gpt_config_values(saved, tmp_path, change, needle):
    meta = native_config(saved["gpt-tiny"])
    meta["config"] |= change
    folder = variant(saved["gpt-tiny"], tmp_path / "ck", meta)
    with pytest.raises(CheckpointError) as e:
        load_model(str(folder))
    assert str(e.value).startswith(f"{folder}/config.json: ") and needle in str(e.value)


def test_llama_heads_that_do_not_group(saved, tmp_path):
    meta = native_config(saved["llama-tiny"])
    meta["config"]["n_kv_heads"] = 3
    folder = variant(saved["llama-tiny"], tmp_path / "ck", meta)
    with pytest.raises(CheckpointError, match="n_heads=4 is not valid; it must be a multiple of n_kv_heads=3"):
        load_model(str(folder))


def test_llama_context_whose_rope_tables_outgrow_the_weights(saved, tmp_path, no_allocation):
    meta = native_config(saved["llama-tiny"])
    meta["config"]["context_length"] = 10**9       # not a parameter: only the RoPE tables grow with it
    folder = variant(saved["llama-tiny"], tmp_path / "ck", meta)
    with pytest.raises(CheckpointError, match="context_length=1000000000 needs RoPE tables larger than"):
        load_model(str(folder))


# --- Hugging Face folders: the file's own key names ------------------------------------------------

GPT2_PAIRS = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
              "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}


@pytest.fixture(scope="module")
def hf_gpt2(saved, tmp_path_factory) -> Path:
    """gpt-tiny as an HF GPT-2 folder (Conv1D weights stored [in, out])."""
    ours = load_file(str(saved["gpt-tiny"] / "model.safetensors"))
    hf = {"wte.weight": ours["tok_emb.weight"], "wpe.weight": ours["pos_emb.weight"],
          "ln_f.weight": ours["final_norm.weight"], "ln_f.bias": ours["final_norm.bias"]}
    for i in range(2):
        for theirs, mine in GPT2_PAIRS.items():
            w = ours[f"blocks.{i}.{mine}.weight"]
            hf[f"h.{i}.{theirs}.weight"] = w if theirs.startswith("ln") else w.t().contiguous()
            hf[f"h.{i}.{theirs}.bias"] = ours[f"blocks.{i}.{mine}.bias"]
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    folder.mkdir()
    save_file(hf, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 256, "n_embd": 64, "n_layer": 2, "n_head": 4}))
    return folder


@pytest.fixture(scope="module")
def hf_llama(saved, tmp_path_factory) -> Path:
    """llama-tiny as an HF Llama folder (separate q/k/v and gate/up projections)."""
    ours = load_file(str(saved["llama-tiny"] / "model.safetensors"))
    hf = {"model.embed_tokens.weight": ours["tok_emb.weight"], "model.norm.weight": ours["final_norm.weight"]}
    for i in range(2):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        q, k, v = ours[b + "attn.qkv.weight"].split([64, 32, 32])
        gate, up = ours[b + "ffn.gate_up.weight"].chunk(2)
        hf |= {p + "input_layernorm.weight": ours[b + "attn_norm.weight"],
               p + "post_attention_layernorm.weight": ours[b + "ffn_norm.weight"],
               p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
               p + "self_attn.o_proj.weight": ours[b + "attn.o_proj.weight"],
               p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
               p + "mlp.down_proj.weight": ours[b + "ffn.down.weight"]}
    folder = tmp_path_factory.mktemp("hf") / "llama"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"))
    shutil.copy(saved["llama-tiny"] / "tokenizer_config.json", folder)
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": 50257, "max_position_embeddings": 256, "hidden_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 176,
         "rope_theta": 500000.0, "tie_word_embeddings": True,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}}))
    return folder


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_hf_folder_loads_the_same_model(hf_gpt2, hf_llama, name):
    folder = hf_gpt2 if name == "gpt-tiny" else hf_llama
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(load_model(str(folder))[0](ids), load_model(name)[0](ids))


@pytest.mark.parametrize("kind,key", [("gpt2", k) for k in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions")]
                         + [("llama", k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "intermediate_size", "vocab_size",
                                                   "max_position_embeddings")])
def test_hf_non_positive_size_names_the_hf_key(hf_gpt2, hf_llama, tmp_path, no_allocation, kind, key):
    folder = variant(hf_gpt2 if kind == "gpt2" else hf_llama, tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text()) | {key: -1}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"^{folder}/config.json: {key}=-1 is not valid"):
        load_model(str(folder))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_config_of_another_size(hf_gpt2, hf_llama, tmp_path, no_allocation, kind):
    folder = variant(hf_gpt2 if kind == "gpt2" else hf_llama, tmp_path / "hf")
    width = "n_embd" if kind == "gpt2" else "hidden_size"
    cfg = json.loads((folder / "config.json").read_text()) | {width: 4096}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"^{folder}/config.json describes a \w+ model of [\d.]+[MB] parameters "
                                              r"but model.safetensors holds 3.3\dM"):
        load_model(str(folder))


# --- GGUF: metadata against the tensor shapes in the header ----------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from models.gguf_export import gguf_vocab, write_gguf
    model, tok, _ = load_model("llama-tiny")
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, gguf_vocab(tok), progress=False)


def patched_gguf(src: Path, dest: Path, **fields: int) -> Path:
    shutil.copy(src, dest)
    reader = gguf.GGUFReader(str(dest), "r+")
    for key, value in fields.items():
        field = reader.fields[f"llama.{key}"]
        field.parts[field.data[0]][0] = value
    del reader   # flushes the memory map
    return dest


def test_gguf_metadata_of_another_size(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr("gguf.quants.dequantize", lambda *a: pytest.fail("dequantized before the check"))
    path = patched_gguf(tiny_gguf, tmp_path / "big.gguf", embedding_length=4096)
    with pytest.raises(CheckpointError, match=rf"^{path}'s metadata describes a llama model of 311M parameters "
                                              "but its tensor data holds 3.31M"):
        load_model(str(path))
    path = patched_gguf(tiny_gguf, tmp_path / "zero.gguf", block_count=0)
    with pytest.raises(CheckpointError, match=rf"^{path}: llama.block_count=0 is not valid"):
        load_model(str(path))


# --- 3. JSON that is not what it should be -------------------------------------------------------

@pytest.mark.parametrize("content,needle", [
    (b"{not json", "cannot read {}: Expecting property name"),
    (b"\xff\xfe", "cannot read {}: 'utf-8' codec can't decode"),
    (b"[1, 2]", "{} holds a JSON list, not an object"),
    (b'{"architecture": "gpt"}', '{} has no "config" object'),
    (b'{"architecture": "gpt", "config": [64]}', '{} has no "config" object'),
])
def test_bad_config_json_names_the_file(saved, tmp_path, content, needle):
    folder = variant(saved["gpt-tiny"], tmp_path / "ck")
    (folder / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_model(str(folder))
    assert needle.format(folder / "config.json") in str(e.value)


def test_bad_hf_config_json_names_the_file(hf_gpt2, tmp_path):
    folder = variant(hf_gpt2, tmp_path / "hf", "{")
    with pytest.raises(CheckpointError, match=f"cannot read {folder}/config.json"):
        load_model(str(folder))


@pytest.mark.parametrize("text,needle", [("{", "cannot read {}"), ('{"weight_map": 3}', "{} has no weight_map")])
def test_bad_index_json_names_the_file(saved, tmp_path, text, needle):
    folder = variant(saved["gpt-tiny"], tmp_path / "ck")
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as e:
        load_model(str(folder))
    assert needle.format(folder / "model.safetensors.index.json") in str(e.value)


def test_corrupt_provenance_names_the_file(saved, tmp_path):
    folder = variant(saved["gpt-tiny"], tmp_path / "ck")
    (folder / "provenance.json").write_text('{"id": "cut sh')
    with pytest.raises(CheckpointError, match=f"^{folder}/provenance.json is not valid JSON .*delete it"):
        load_model(str(folder))


# --- 4. devices this machine does not have --------------------------------------------------------

@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr("models.registry.load_model", lambda *a: pytest.fail("weights loaded before the check"))


@pytest.mark.parametrize("device,message", [
    ("cuda", "model.device=cuda: CUDA is not available on this machine; devices here: cpu"),
    ("cuda:3", "model.device=cuda:3: CUDA is not available on this machine; devices here: cpu"),
    ("mps", "model.device=mps: MPS is not available on this machine; devices here: cpu"),
    ("bogus", "model.device=bogus: not a device name; devices here: cpu"),
    ("meta", "model.device=meta: the harness runs on cpu, cuda or mps; devices here: cpu"),
])
def test_absent_device_is_named_before_loading(cpu_only, device, message):
    with pytest.raises(UserError) as e:
        load_lm("gpt-tiny", device=device)
    assert str(e.value) == message


def test_cuda_index_beyond_the_gpus_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr("models.registry.load_model", lambda *a: pytest.fail("weights loaded before the check"))
    with pytest.raises(UserError) as e:
        load_lm("gpt-tiny", device="cuda:3")
    assert str(e.value) == ("model.device=cuda:3: this machine has 2 CUDA device(s); "
                            "devices here: cpu, cuda, cuda:0, cuda:1")


def test_train_device_is_checked_first(tmp_path):
    # in this process (clitools.run_module): a fresh interpreter would add only a torch import
    p = run_module("harness.train", "device=bogus", f"output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}",
                   env=ENV)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert [line for line in p.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: device=bogus: not a device name; devices here: {', '.join(available_devices())}"]
    assert not (tmp_path / "out").exists()


# --- 5. training: init_from with overrides, and resume ---------------------------------------------

def test_init_from_overrides_that_resize_are_refused_on_meta(saved):
    """A million layers would not be built in the test's lifetime: only meta models are."""
    from harness.train.pretrain import build
    cfg = OmegaConf.create({"train": {"init_from": str(saved["gpt-tiny"]), "model": {
        "arch": None, "config": None, "overrides": {"n_layers": 10**6}}}})
    with pytest.raises(CheckpointError, match=rf"^model.overrides describes a gpt model of [\d.]+B parameters but "
                                              rf"{saved['gpt-tiny']} holds 3.33M"):
        build(cfg)


def test_from_scratch_override_of_zero_heads():
    from harness.train.pretrain import build
    cfg = OmegaConf.create({"train": {"init_from": None, "tokenizer": "gpt2", "context_length": 64, "model": {
        "arch": "gpt", "config": "gpt-tiny", "overrides": {"n_heads": 0}}}})
    with pytest.raises(CheckpointError, match="^model.config=gpt-tiny with model.overrides: n_heads=0 is not valid"):
        build(cfg)


def test_resume_checks_last_against_the_run_model(saved, tmp_path):
    from harness.train.state import STATE_FILE, load_state
    from models.lora import apply_lora
    model, tok, _ = load_model("gpt-tiny")
    apply_lora(model, rank=2, alpha=4)     # last/ of a LoRA run: adapters its config does not describe
    last = save_checkpoint(tmp_path / "last", model, tok, {})
    torch.save({"step": 3}, last / STATE_FILE)
    assert load_state(last, model) == {"step": 3}
    other = ckpt.build_model("gpt", dict(context_length=256, d_model=64, n_layers=3, n_heads=4))
    apply_lora(other, rank=2, alpha=4)
    with pytest.raises(CheckpointError, match=f"^{last} holds a gpt checkpoint that does not fit the gpt model "
                                              "of this run .missing: blocks.2"):
        load_state(last, other)


# --- the CLI: the reproduced blow-up, now one line under a 4 GiB address-space cap ------------------

def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_cli_default_config_beside_small_weights_under_4gib(saved, tmp_path):
    folder = variant(saved["gpt-tiny"], tmp_path / "ck", {"architecture": "llama", "config": {}})
    board = tmp_path / "lb.csv"
    p = subprocess.run([sys.executable, "-m", "harness", "task=mmlu", f"model={folder}", "task.subjects=[anatomy]",
                        "task.limit=1", f"leaderboard={board}", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                       preexec_fn=_cap_memory)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert errors[0].startswith(f"error: {folder}/config.json describes a llama model of 6.74B parameters")
    assert not board.exists()
