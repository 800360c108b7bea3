"""Qwen2, Qwen3 and Gemma 3 through the workflows that see a model only through its registry entry
(models/architectures.py) and the Model protocol: GGUF export and reload (by our loader and by
llama.cpp), pretraining from scratch, classification finetuning of a checkpoint folder."""
from __future__ import annotations


import pytest
import torch

from clitools import ENV, ROOT, run_module
from harness.export import ExportConfig, export
from llamacpp import assert_llama_cpp_agrees
from models.architectures import lookup
from models.checkpoint import build_model, save_checkpoint
from models.registry import load_model
from models.tokenizer import gpt2_tokenizer

TINY = [("qwen2", "qwen2-tiny"), ("qwen3", "qwen3-tiny"), ("gemma3", "gemma3-tiny")]


def checkpoint(folder, arch: str, config: str):
    """A seed-0 tiny model whose norms and biases are not their init values (so that every map and
    Gemma's stored 1 + w matter), saved as our checkpoint folder."""
    torch.manual_seed(0)
    model = build_model(arch, lookup(arch).configs[config]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model, save_checkpoint(folder, model, gpt2_tokenizer(), {"id": "unit"})


@pytest.mark.parametrize("arch, config", TINY)
def test_export_round_trips_through_our_loader(tmp_path, arch, config):
    model, folder = checkpoint(tmp_path / config, arch, config)
    path = export(ExportConfig(model=str(folder), out=str(tmp_path / "m.gguf")), progress=False)
    reloaded, _, _ = load_model(str(path))
    assert type(reloaded) is type(model) and reloaded.config == model.config
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))   # past gemma3-tiny's window
    with torch.inference_mode():
        delta = (model(ids) - reloaded(ids)).abs().max().item()
    # Gemma's norms go through fp32 1 + w and back: a rounding of their last bit at most
    assert delta == 0 if arch != "gemma3" else delta <= 1e-5, delta


# Short texts, and one longer than gemma3-tiny's 16-token window (GPT-2 tokens: the checkpoints' vocabulary).
TEXTS = ["Hello, world! This is a test.", "Unicode: café, naïve, 日本語, emoji 🙂.",
         ("Don't stop; we'll see what they've done. The river rose by three feet, then by four more, and the "
          "bank gave way before the evening.")]


@pytest.mark.parametrize("arch, config", TINY)
def test_llama_cpp_loads_the_export_and_agrees(tmp_path, arch, config):
    """llama.cpp reads our metadata as we meant it: QK-norm, Qwen's NEOX RoPE, Gemma's 1 + w norms,
    its per-layer local/global pattern, window and two RoPE bases (each, read wrong, moves such
    log-probs by ~0.2).
    Gemma's tolerance is wider: ggml's CPU GELU goes through a float16 lookup table (gaps up to ~1e-4,
    as for gpt-tiny; rounding the GELU's input and output to fp16 on our side brings them to ~1e-5)."""
    model, folder = checkpoint(tmp_path / config, arch, config)
    path = export(ExportConfig(model=str(folder), out=str(tmp_path / "m.gguf")), progress=False)
    assert_llama_cpp_agrees(path, model, gpt2_tokenizer(), TEXTS, tol=2e-4 if arch == "gemma3" else 1e-4)


@pytest.mark.parametrize("arch, config", [("qwen3", "qwen3-tiny"), ("gemma3", "gemma3-tiny")])
def test_pretrain_from_scratch(tmp_path, arch, config):
    out = tmp_path / "out"
    # in this process (clitools.run_module): a fresh interpreter would add only a torch import
    p = run_module("harness.train", "train=pretrain_tiny", "progress=false", f"train.model.arch={arch}",
                   f"train.model.config={config}", "train.max_steps=2", f"output_dir={out}",
                   env=ENV | {"HARNESS_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    model, _, _ = load_model(str(out))   # the final checkpoint
    assert type(model).architecture == arch


@pytest.mark.parametrize("arch, config", [("qwen3", "qwen3-tiny"), ("gemma3", "gemma3-tiny")])
def test_classify_finetuning(tmp_path, arch, config):
    _, folder = checkpoint(tmp_path / config, arch, config)
    out = tmp_path / "spam"
    p = run_module("harness.train", "train=classify_spam", "model=checkpoint", f"model.name={folder}",
                   "train.limit_train=16", "train.limit_val=8", "train.max_steps=2", "train.eval_every=2",
                   "train.sample_every=2", "progress=false", f"output_dir={out}", env=ENV)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]


@pytest.mark.parametrize("arch, config", TINY[1:])
def test_served_over_the_ollama_api(tmp_path, arch, config):
    """harness.serve names the family by the registry entry and answers the real `ollama` client
    with what the model generates in process (greedy), on 127.0.0.1."""
    ollama = pytest.importorskip("ollama")
    from harness.serve.process import spawn_server
    from models.registry import load_lm

    _, folder = checkpoint(tmp_path / config, arch, config)
    server = spawn_server([f"model={folder}", "host=127.0.0.1", "port=0", f"name={config}"], env=ENV, cwd=ROOT,
                          timeout=120)
    try:
        client = ollama.Client(host=server.url, timeout=60)
        (m,) = client.list().models
        assert m.details.family == lookup(arch).family and m.details.format == "safetensors"
        info = client.show(config).modelinfo
        assert info[f"{lookup(arch).family}.attention.head_count_kv"] == lookup(arch).configs[config]["n_kv_heads"]
        reply = client.generate(model=config, prompt=TEXTS[2], raw=True, options={"temperature": 0, "num_predict": 12})
        assert reply.response == load_lm(str(folder), progress=False).generate([TEXTS[2]], max_new_tokens=12)[0]
    finally:
        server.stop()
