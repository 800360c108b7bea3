"""Architecture parity against transformers, KV-cache consistency, and the LM adapter's scoring."""
from __future__ import annotations

import pytest
import torch

from models.checkpoint import build_model
from models.generate import generate_tokens
from models.lm import TorchLM
from models.registry import load_lm, load_model
from models.tokenizer import gpt2_tokenizer

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a land far away, there lived a dragon who loved 42 numbers: 3.14159!",
]


def test_smollm2_logits_match_transformers(smollm2_lm, smollm2_reference):
    for text in PROMPTS:
        ids = torch.tensor([smollm2_lm.tokenizer.encode(text)])
        with torch.inference_mode():
            ours = smollm2_lm.model(ids)
            ref = smollm2_reference(ids).logits
        assert (ours - ref).abs().max().item() <= 1e-3


def test_smollm2_greedy_chat_answer(smollm2_lm):
    prompt = smollm2_lm.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    assert smollm2_lm.generate([prompt], max_new_tokens=20) == ["The capital of France is Paris."]


def test_hf_gpt2_safetensors_load_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model, tok, info = load_model(str(tmp_path))
    ids = torch.tensor([gpt2_tokenizer().encode(PROMPTS[0])])
    with torch.inference_mode():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= 1e-4
    assert tok.name == "gpt2" and len(info["checkpoint_sha"]) == 12


@pytest.mark.parametrize("tied,scaling", [(True, None), (False, "llama3")])
def test_hf_llama_safetensors_load_with_same_logits(tmp_path, tied, scaling):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    rope_scaling = None
    if scaling:
        rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_theta=50000.0, rope_scaling=rope_scaling, tie_word_embeddings=tied)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    gpt2_tokenizer().save(tmp_path)  # the folder needs a tokenizer; ours reads {"type": "gpt2"}
    model, _, _ = load_model(str(tmp_path))
    ids = torch.tensor([gpt2_tokenizer().encode(PROMPTS[2] * 3)])  # long enough that scaling matters
    with torch.inference_mode():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch,config", [("gpt", "gpt-tiny"), ("llama", "llama-tiny")])
def test_kv_cache_decoding_equals_full_forward(arch, config):
    from models.gpt import GPT_CONFIGS
    from models.llama import LLAMA_CONFIGS
    torch.manual_seed(0)
    model = build_model(arch, (GPT_CONFIGS if arch == "gpt" else LLAMA_CONFIGS)[config]).eval()
    ids = torch.randint(0, 1000, (2, 40))
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(2, 40)
        parts = [model.logits(model.hidden_states(ids[:, :25], cache))]
        parts += [model.logits(model.hidden_states(ids[:, t:t + 1], cache)) for t in range(25, 40)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_batched_generation_with_padding_equals_one_by_one():
    lm = load_lm("llama-tiny", progress=False)
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS]
    single = [generate_tokens(lm.model, [p], max_new_tokens=12, eos_ids=[]) [0] for p in prompts]
    batched = generate_tokens(lm.model, prompts, max_new_tokens=12, eos_ids=[])
    assert batched == single


def _manual_loglikelihood(lm: TorchLM, context: str, continuation: str) -> float:
    ctx = lm.tokenizer.encode(context)
    cont = lm.tokenizer.encode(context + continuation)[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logprobs = lm.model(ids)[0, :-1].float().log_softmax(-1)
    return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_loglikelihood_with_shared_prefix_cache_matches_plain_forward():
    lm = load_lm("gpt-tiny", progress=False)
    lm.min_shared_prefix = 8            # make the tiny few-shot prefix long enough to be shared
    shots = "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA: 6\n\n"
    requests = [(shots + f"Q: {a}+{a}?\nA:", f" {c}") for a in range(5, 9) for c in (2 * a, 2 * a + 1, " many")]
    requests.append(("Unrelated context", " that ends differently"))
    got = lm.loglikelihood(requests)
    want = [_manual_loglikelihood(lm, c, x) for c, x in requests]
    assert got == pytest.approx(want, abs=1e-4)


def test_loglikelihood_rolling_scores_every_token_once():
    lm = load_lm("llama-tiny", progress=False)
    text = " ".join(f"word{i}" for i in range(120))
    toks = lm.tokenizer.encode(text)
    ids = torch.tensor([[lm.tokenizer.eos_id] + toks[:255]])
    with torch.inference_mode():
        full = lm.model(ids)[0].float().log_softmax(-1)
    want = sum(full[i, t].item() for i, t in enumerate(toks[:255]))
    assert len(toks) < 256
    # One window covering everything equals the plain forward; smaller windows change only context.
    assert lm.loglikelihood_rolling([text])[0] == pytest.approx(want, abs=1e-3)
    disjoint, strided = lm.loglikelihood_rolling([text], max_length=64), lm.loglikelihood_rolling([text], max_length=64, stride=16)
    assert disjoint[0] < 0 and strided[0] < 0 and disjoint[0] != strided[0]


def test_shared_prefix_never_swallows_scored_positions():
    """Choices that begin with the same tokens (ARC's " the sun" / " the moon") share those tokens in
    every unit; a shared prefix running into them left negative columns that wrapped around to
    padding, a wrong score, or an IndexError (gemma3-270m on the full ARC-Easy test split)."""
    from models.requests import Unit, first_scored, prefix_groups, scored_positions
    ctx = tuple(range(100, 170))                                   # 70 tokens: above min_shared
    units = [Unit(ctx + (7, 8), [(0, [7, 8, 9])]), Unit(ctx + (7, 8), [(1, [7, 8, 5])]),
             Unit(ctx + (7, 6), [(2, [7, 6])])]
    (prefix_len, group), = prefix_groups(units, 64)
    assert prefix_len == min(first_scored(u) for u in units) == len(ctx) - 1
    assert min(scored_positions(group, prefix_len)[1]) >= 0

    lm = load_lm("gpt-tiny", progress=False)
    lm.min_shared_prefix = 8
    context = "Question: " + "which of these orbits the planet we live on, and why? " * 3 + "\nAnswer:"
    requests = [(context, " the sun goes round"), (context, " the moon"), (context, " the moon and stars")]
    assert lm.loglikelihood(requests) == pytest.approx([_manual_loglikelihood(lm, c, x) for c, x in requests], abs=1e-4)
