"""What the OpenAI routes ask of the model beyond generating text: log-probabilities of a prompt's
tokens (/v1/completions with echo and logprobs: how lm-eval's local-completions scores), of
generated tokens (logprobs / top_logprobs), and pooled embeddings (/v1/embeddings).

Everything goes through the `Model` protocol (models/decoder.py: hidden_states, logits) of a
TorchLM (models/lm.py). Log-probs are the model's own distribution: log_softmax of the raw logits,
before temperature, top-k and top-p (vLLM's default), so they do not depend on sampling settings.
Results are plain Python (`TokenScore`, lists of floats), ready for harness/serve/openai_responses.py.
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

import torch

from harness.serve.openai_responses import TokenScore
from models.generate import generate_tokens

# How /v1/embeddings pools: the mean of the final-normed hidden states over every token of the
# input (BOS included where the model reads one), then L2-normalised, as Ollama's /api/embed
# returns unit vectors. "last" (the last token's state, normalised) is the other choice.
EMBEDDING_POOLING = "mean"
POOLINGS = ("mean", "last")
_HEAD_ROWS = 1024        # positions per vocabulary-head matmul: bounds the [N, vocab] logits


def token_piece(lm, token_id: int) -> str:
    """A token's text, as the responses show it (`piece` in harness/serve/openai_responses.py). A token that
    holds part of a UTF-8 character shows as U+FFFD; `token_bytes` has its real bytes."""
    return lm.decode([token_id])


_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(lm, token_id: int) -> bytes:
    """A token's own bytes (OpenAI's logprobs "bytes", which a client joins across tokens to rebuild
    characters split between them): tiktoken's bytes; for a `tokenizers` vocabulary its piece read
    through the byte-level alphabet (GPT-2, SmolLM2, Qwen) or as SentencePiece ("▁" a space,
    "<0xNN>" one byte: Llama 2, Gemma); the decoded text's UTF-8 for anything else."""
    tok = lm.tokenizer
    encoding = getattr(tok, "encoding", None)
    if encoding is not None and hasattr(encoding, "decode_single_token_bytes"):
        try:
            return encoding.decode_single_token_bytes(token_id)
        except KeyError:
            return b""
    backend = getattr(tok, "backend", None)
    piece = backend.id_to_token(token_id) if backend is not None else None
    if piece is None:
        return lm.decode([token_id]).encode("utf-8")
    if token_id in _special_ids(backend):
        return piece.encode("utf-8")
    from tokenizers import decoders
    if isinstance(backend.decoder, decoders.ByteLevel):
        table = _byte_level_decoder()
        return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in piece)
    byte = _SP_BYTE.fullmatch(piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.replace("▁", " ").encode("utf-8")


def _special_ids(backend) -> set[int]:
    ids = getattr(backend, "_harness_special_ids", None)
    if ids is None:
        ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        try:
            backend._harness_special_ids = ids
        except AttributeError:   # a Rust object without a __dict__
            pass
    return ids


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each byte spelled as one printable character, bytes
    that print as themselves first, the rest from U+0100 upward, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = (b for b in range(256) if b not in printable)
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(extra)})
    return table


def _scores(logprobs: torch.Tensor, targets: Sequence[int], top_k: int) -> list[TokenScore]:
    """log-softmaxed rows [N, V] and the token each row predicts -> TokenScores."""
    chosen = logprobs.gather(-1, torch.tensor(list(targets), device=logprobs.device)[:, None]).squeeze(-1).tolist()
    if top_k > 0:
        values, ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenScore(t, lp, top) for t, lp, top in zip(targets, chosen, tops)]


@torch.inference_mode()
def prompt_logprobs(lm, ids: Sequence[int], top_k: int = 0, end: bool = False) -> list[TokenScore]:
    """The log-prob of each of `ids` given the ones before it, with the `top_k` most likely tokens
    at its position; position 0 has neither (logprob None). With `end`, one more: the score of the
    end token after the last id (`end_score`), from the same forward pass. One forward pass; the
    vocabulary head runs on _HEAD_ROWS positions at a time. ValueError when `ids` exceed the context."""
    ids = list(ids)
    if not ids:
        return []
    if len(ids) > lm.max_length:
        raise ValueError(f"{len(ids)} tokens do not fit the model's context of {lm.max_length}")
    model = lm.model
    hidden = model.hidden_states(torch.tensor([ids], device=lm.device))[0]   # [T, D]
    out = [TokenScore(ids[0], None, ())]
    for s in range(0, len(ids) - 1, _HEAD_ROWS):
        logprobs = model.logits(hidden[s:min(s + _HEAD_ROWS, len(ids) - 1)]).float().log_softmax(-1)
        out += _scores(logprobs, ids[s + 1:s + 1 + _HEAD_ROWS], top_k)
    if end:
        out.append(_end(lm, hidden[-1:], top_k))
    return out


def _end(lm, last_hidden: torch.Tensor, top_k: int) -> TokenScore:
    logprobs = lm.model.logits(last_hidden).float().log_softmax(-1)
    stops = lm.stop_ids()
    return _scores(logprobs, [stops[int(logprobs[0, stops].argmax())]], top_k)[0]


@torch.inference_mode()
def end_score(lm, ids: Sequence[int], top_k: int = 0) -> TokenScore:
    """The score of the end token that followed `ids` (prompt + generated tokens): a generation that
    ended at EOS produced one more token than it returns, and a legacy completion's logprobs list it
    (lm-eval's local-completions reads "prompt + one generated token" from every echo answer). Of
    the model's end tokens (lm.stop_ids()) the likeliest at that position: the one a greedy decode
    picked, and the only one where the model has a single end token."""
    ids = list(ids)[-lm.max_length:]
    return _end(lm, lm.model.hidden_states(torch.tensor([ids], device=lm.device))[0, -1:], top_k)


class LogprobRecorder:
    """`on_logits` for models/generate.py's generate_tokens: keeps each step's log-prob of the token
    picked and the top_k alternatives, per row. `scores(row, n)`: the first n (the row's generated
    tokens; a step that picked EOS, or ran after the row ended, is dropped that way). on_logits runs
    before should_stop, so a streaming server's should_stop(row, tokens) finds the newest token's
    score in `latest(row)`."""

    def __init__(self, top_k: int = 0):
        self.top_k = top_k
        self.steps: list[list[TokenScore]] = []     # steps[k][row]

    def __call__(self, logits: torch.Tensor, next_ids: torch.Tensor) -> None:
        self.steps.append(_scores(logits.float().log_softmax(-1), next_ids.tolist(), self.top_k))

    def latest(self, row: int = 0) -> TokenScore:
        return self.steps[-1][row]

    def scores(self, row: int = 0, n: int | None = None) -> list[TokenScore]:
        steps = self.steps if n is None else self.steps[:n]
        return [step[row] for step in steps]


def generate_with_logprobs(lm, ids: Sequence[int], *, max_new_tokens: int, top_k: int = 0,
                           temperature: float = 0.0, top_p: float | None = None, sample_top_k: int | None = None,
                           seed: int | None = None, should_stop=None) -> tuple[list[int], list[TokenScore]]:
    """(new tokens of one prompt, a TokenScore for each). The server may instead pass its own
    LogprobRecorder to generate_tokens as on_logits; this is that, for one prompt."""
    recorder = LogprobRecorder(top_k)
    generator = torch.Generator(device=lm.device).manual_seed(seed) if seed is not None else None
    tokens = generate_tokens(lm.model, [list(ids)], max_new_tokens=max_new_tokens, eos_ids=lm.stop_ids(),
                             temperature=temperature, top_k=sample_top_k, top_p=top_p, generator=generator,
                             should_stop=should_stop, on_logits=recorder)[0]
    return tokens, recorder.scores(0, len(tokens))


def embedding_dim(lm) -> int:
    return lm.model.config.d_model


@torch.inference_mode()
def embed(lm, inputs: Sequence[str | Sequence[int]], pooling: str = EMBEDDING_POOLING,
          batch_size: int = 16) -> list[list[float]]:
    """One unit vector per input (a text, encoded as lm.encode does, or token ids): the final-normed
    hidden states pooled by `pooling` (POOLINGS). Batches are right-padded: causal attention keeps
    the real positions from seeing the padding, and pooling skips it. ValueError when an input
    exceeds the context or the pooling is unknown."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    encoded = [lm.encode(x) if isinstance(x, str) else list(x) for x in inputs]
    encoded = [ids or [lm.prefix_token] for ids in encoded]
    for ids in encoded:
        if len(ids) > lm.max_length:
            raise ValueError(f"an input of {len(ids)} tokens does not fit the model's context of {lm.max_length}")
    out: list[list[float]] = [[] for _ in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))   # similar lengths batch together
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        lengths = torch.tensor([len(encoded[i]) for i in idx], device=lm.device)
        tokens = torch.full((len(idx), int(lengths.max())), lm.prefix_token, dtype=torch.long)
        for r, i in enumerate(idx):
            tokens[r, :len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
        hidden = lm.model.hidden_states(tokens.to(lm.device)).float()              # [B, T, D]
        if pooling == "mean":
            keep = torch.arange(hidden.shape[1], device=lm.device)[None, :] < lengths[:, None]
            pooled = (hidden * keep[..., None]).sum(1) / lengths[:, None]
        else:
            pooled = hidden[torch.arange(len(idx), device=lm.device), lengths - 1]
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        for i, v in zip(idx, pooled.cpu().tolist()):
            out[i] = v
    return out
