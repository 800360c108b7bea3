"""Qwen3, Qwen2 and Gemma 3 (models/qwen3.py, models/qwen2.py, models/gemma3.py) against transformers.

The reference models are random-init transformers checkpoints built offline from small configs with the
real structure (several layers, local and global Gemma layers, a sliding window of 8 that the prompts
exceed), with randomised norms and biases so that every tensor-name mapping and the (1 + w) norm
convention matter. All fp32.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models import gemma3, gemma3_formats, qwen2, qwen3  # noqa: E402
from models.generate import generate_tokens  # noqa: E402
from models.gguf_import import load_gguf  # noqa: E402
from models.lm import _inference_layout  # noqa: E402

VOCAB, WINDOW = 300, 8
LOCAL, GLOBAL = gemma3.LOCAL, gemma3.GLOBAL
# model module -> the module of its file formats (config_from_hf, convert_hf, GGUF_ARCH)
FORMATS = {qwen3: qwen3, qwen2: qwen2, gemma3: gemma3_formats}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.2, rms_norm_eps=1e-6)

# name -> (module, transformers model class, config class, config kwargs)
REFERENCES = {
    # head_dim 32 with 4 heads on a 64-wide residual: head_dim is not d_model / n_heads
    "qwen3": (qwen3, "Qwen3ForCausalLM", "Qwen3Config",
              dict(COMMON, num_hidden_layers=3, head_dim=32, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen2": (qwen2, "Qwen2ForCausalLM", "Qwen2Config",
              dict(COMMON, num_hidden_layers=3, rope_theta=1e6, tie_word_embeddings=False)),
    # query_pre_attn_scalar 24 != head_dim 32; local and global layers alternate by two; linear RoPE
    # scaling on the global layers; final logit soft-capping on.
    "gemma3": (gemma3, "Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(COMMON, num_hidden_layers=6, head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
                    layer_types=[LOCAL, LOCAL, GLOBAL] * 2, final_logit_softcapping=30.0,
                    rope_parameters={GLOBAL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                     LOCAL: {"rope_type": "default", "rope_theta": 1e4}})),
    # the published structure (4B+): 5 local then 1 global, scale 1/sqrt(head_dim), no soft-capping,
    # linear RoPE scaling on the global layers; what llama.cpp assumes of a gemma3 GGUF
    "gemma3-published": (gemma3, "Gemma3ForCausalLM", "Gemma3TextConfig",
                         dict(COMMON, num_hidden_layers=7, head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=32,
                              rope_parameters={GLOBAL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                               LOCAL: {"rope_type": "default", "rope_theta": 1e4}})),
}
_built: dict[str, tuple] = {}


def reference(name: str):
    """(transformers model, our converted model), built once per test session."""
    if name not in _built:
        module, model_cls, config_cls, kwargs = REFERENCES[name]
        torch.manual_seed(0)
        hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "norm" in n or n.endswith("bias"):   # HF initialises them to 0 / 1: randomise
                    p.add_(torch.randn_like(p) * 0.3)
        hf.generation_config.eos_token_id = None       # greedy runs its full length
        hf.generation_config.pad_token_id = 0
        config = FORMATS[module].config_from_hf(hf.config.to_dict())
        ours = module.Model(config).eval()
        ours.load_state_dict(FORMATS[module].convert_hf(hf.state_dict(), config), strict=True)
        _built[name] = hf, ours
    return _built[name]


def prompts(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", REFERENCES)
def test_logits_match_transformers(name):
    hf, ours = reference(name)
    fast = _inference_layout(copy.deepcopy(ours))     # TorchLM's layout: transposed strides, own head copy
    for length in (1, 7, 8, 9, 23, 64):               # around and well past the window of 8
        x = prompts(3, length, seed=length)
        with torch.inference_mode():
            ref = hf(x).logits
            for model in (ours, fast):
                delta = (model(x) - ref).abs().max().item()
                assert delta <= 1e-4, f"{name}, {length} tokens: max |Δ logits| {delta:.2e}"


@pytest.mark.parametrize("name", REFERENCES)
def test_greedy_generation_matches_transformers(name):
    """30 new tokens after a 12-token prompt: all 30 decoded past the window of 8."""
    hf, ours = reference(name)
    for seed in (1, 2):
        x = prompts(1, 12, seed)
        with torch.inference_mode():
            ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=30, do_sample=False)
        got = generate_tokens(ours, x.tolist(), max_new_tokens=30, eos_ids=[-1])
        assert got[0] == ref[0, 12:].tolist()


@pytest.mark.parametrize("name", REFERENCES)
def test_cached_decoding_equals_full_forward(name):
    """Chunks of a 40-token prompt through the KV cache (chunks longer than the window, single
    tokens, chunks straddling it) give the logits of one full forward."""
    _, ours = reference(name)
    x = prompts(2, 40, seed=3)
    with torch.inference_mode():
        full = ours(x)
        cache, start, parts = ours.new_cache(2, 40), 0, []
        for size in (5, 1, 1, 11, 3, 1, 9, 9):
            parts.append(ours.logits(ours.hidden_states(x[:, start:start + size], cache)))
            start += size
    assert start == 40 and cache.length == 40
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", REFERENCES)
def test_expanded_prefix_cache_equals_full_forward(name):
    """TorchLM's shared few-shot prefix: a 1-row cache of 20 tokens (> window), expanded to 3 rows."""
    _, ours = reference(name)
    prefix, rest = prompts(1, 20, seed=4), prompts(3, 10, seed=5)
    with torch.inference_mode():
        cache = ours.new_cache(1, 20)
        ours.hidden_states(prefix, cache)
        got = ours.logits(ours.hidden_states(rest, cache.expand(3, 10)))
        full = ours(torch.cat([prefix.expand(3, -1), rest], dim=1))[:, 20:]
    assert (got - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", REFERENCES)
def test_left_padded_batch_generation_equals_one_by_one(name):
    """Prompts of 3, 13 and 21 tokens decoded together (left padding, per-row positions and masks)."""
    _, ours = reference(name)
    batch = [prompts(1, n, seed=n)[0].tolist() for n in (3, 13, 21)]
    together = generate_tokens(ours, batch, max_new_tokens=15, eos_ids=[-1])
    alone = [generate_tokens(ours, [p], max_new_tokens=15, eos_ids=[-1])[0] for p in batch]
    assert together == alone


# --- GGUF: files written as llama.cpp's convert_hf_to_gguf.py writes them ---------------------------

def write_gguf(path, hf, arch: str) -> None:
    """The converter's conventions: tensor names from gguf's own TensorNameMap, every Gemma norm
    stored as 1 + w, q/k unpermuted for qwen2/qwen3/gemma3, the metadata keys TextModel writes."""
    import gguf
    c = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch != "qwen2":
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    if arch == "gemma3":
        rope = c.rope_parameters[GLOBAL]
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_sliding_window(c.sliding_window)
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
    else:
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", ["qwen3", "qwen2", "gemma3-published"])
def test_gguf_maps_give_transformers_logits(name, tmp_path):
    """Read by the GGUF loader through the architecture's registry hooks (models/gguf_import.py)."""
    module = REFERENCES[name][0]
    hf, _ = reference(name)
    write_gguf(tmp_path / "m.gguf", hf, FORMATS[module].GGUF_ARCH)
    arch, config, state = load_gguf(tmp_path / "m.gguf")
    config = module.Config(**config)
    assert arch == module.Model.architecture
    assert config == FORMATS[module].config_from_hf(hf.config.to_dict())
    model = module.Model(config).eval()
    model.load_state_dict(state, strict=True)
    x = prompts(2, 30, seed=6)
    with torch.inference_mode():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4


# --- configs ------------------------------------------------------------------------------------------

PUBLISHED = {   # config.json as published (transformers 4.x layout), and the named config it must give
    "gemma3-270m": (gemma3, dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], attention_bias=False, attn_logit_softcapping=None,
        final_logit_softcapping=None, head_dim=256, hidden_activation="gelu_pytorch_tanh", hidden_size=640,
        intermediate_size=2048, layer_types=gemma3.default_layer_types(18), max_position_embeddings=32768,
        num_attention_heads=4, num_hidden_layers=18, num_key_value_heads=1, query_pre_attn_scalar=256,
        rms_norm_eps=1e-6, rope_local_base_freq=10000.0, rope_scaling=None, rope_theta=1000000.0, sliding_window=512,
        _sliding_window_pattern=6, use_bidirectional_attention=False, vocab_size=262144)),
    "gemma3-4b": (gemma3, dict(   # the multimodal wrapper lists only what differs from the defaults
        model_type="gemma3", text_config=dict(
            hidden_size=2560, intermediate_size=10240, model_type="gemma3_text", num_hidden_layers=34,
            rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024))),
    "qwen3-0.6b": (qwen3, dict(
        model_type="qwen3", head_dim=128, hidden_size=1024, intermediate_size=3072, max_position_embeddings=40960,
        num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-6, rope_scaling=None,
        rope_theta=1000000, tie_word_embeddings=True, use_sliding_window=False, vocab_size=151936)),
    "qwen2.5-0.5b": (qwen2, dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, max_position_embeddings=32768,
        num_attention_heads=14, num_hidden_layers=24, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=1000000.0, sliding_window=32768, tie_word_embeddings=True, use_sliding_window=False,
        vocab_size=151936)),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_config_from_published_config_json(name):
    module, cfg = PUBLISHED[name]
    assert FORMATS[module].config_from_hf(cfg) == module.Config(**module.NAMED_CONFIGS[name])


# Published parameter counts (embedding counted once when tied), to the precision the model cards give.
SIZES = {"qwen3-0.6b": 0.6e9, "qwen3-1.7b": 1.7e9, "qwen3-4b": 4.0e9, "qwen3-8b": 8.2e9, "qwen3-14b": 14.8e9,
         "qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9, "qwen2.5-7b": 7.61e9,
         "gemma3-270m": 0.268e9, "gemma3-1b": 1.0e9, "gemma3-4b": 3.88e9}


@pytest.mark.parametrize("name", SIZES)
def test_named_configs_have_the_published_sizes(name):
    module = next(m for m in (qwen3, qwen2, gemma3) if name in m.NAMED_CONFIGS)
    with torch.device("meta"):
        model = module.Model(module.Config(**module.NAMED_CONFIGS[name]))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - SIZES[name]) / SIZES[name] < 0.03, f"{name}: {n:,} parameters"


@pytest.mark.parametrize("module, name", [(qwen3, "qwen3-tiny"), (qwen2, "qwen2-tiny"), (gemma3, "gemma3-tiny")])
def test_tiny_configs_generate(module, name):
    torch.manual_seed(0)
    model = module.Model(module.Config(**module.NAMED_CONFIGS[name])).eval()
    out = generate_tokens(model, [list(range(1, 30))], max_new_tokens=5, eos_ids=[-1])
    assert len(out[0]) == 5 and all(0 <= t < model.config.vocab_size for t in out[0])
