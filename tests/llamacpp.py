"""llama.cpp itself (the prebuilt `xllamacpp` wheel) as the judge of our GGUF exports: it must load the
file, tokenize text as we do and, from our token ids, rank the next token as we do. Tests skip when
the wheel is not installed."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch


def llama_cpp_server(path: Path, n_ctx: int = 256):
    """An in-process llama.cpp server on `path`: one thread, F32 KV cache and plain attention, so
    fp32 throughout."""
    xlc = pytest.importorskip("xllamacpp")
    params = xlc.CommonParams()
    params.model.path, params.n_ctx, params.n_parallel, params.warmup = str(path), n_ctx, 1, False
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
    params.cache_type_k = params.cache_type_v = 0  # GGML_TYPE_F32
    params.flash_attn_type = 0
    return xlc.Server(params)


def top_logprobs(server, prompt: str | list[int], n: int = 10) -> tuple[int, list[dict]]:
    """(prompt tokens llama.cpp read, its n most likely next tokens as {"id", "logprob", ...})."""
    r = server.handle_completions({"prompt": prompt, "n_predict": 1, "n_probs": n, "temperature": 0})
    return r["usage"]["prompt_tokens"], r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]


def assert_llama_cpp_agrees(path: Path, model, tok, texts: Sequence[str], tol: float = 1e-4) -> None:
    """llama.cpp loads the GGUF at `path` (exported from `model`, vocabulary `tok`); for each text it
    reads as many tokens as we do (BOS first where `tok` adds one) and ranks the same top 10 from the
    text as from our ids; its log-probs from our ids are within `tol` of `model`'s, and its best token
    is ours (up to ties)."""
    server = llama_cpp_server(path)
    for text in texts:
        ids = ([tok.bos_id] if tok.add_bos else []) + tok.encode(text)
        with torch.inference_mode():
            ours = torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), -1)
        n_tokens, from_text = top_logprobs(server, text)
        _, from_ids = top_logprobs(server, ids)
        assert n_tokens == len(ids), (text, n_tokens, len(ids))
        assert [e["id"] for e in from_text] == [e["id"] for e in from_ids], text
        delta = max(abs(e["logprob"] - ours[e["id"]].item()) for e in from_ids)
        assert delta <= tol, (text, delta)
        assert ours.max().item() - ours[from_ids[0]["id"]].item() <= 1e-3, text
