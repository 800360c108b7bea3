"""The torch side of `harness.serve`: one loaded TorchLM, generation serialized by a lock, streamed
as text deltas through `generate_tokens`' per-token callback; and the served model's metadata.

    engine = Engine(lm, default_num_ctx=4096)
    outcome = engine.run(job, on_delta=lambda text: True, cancelled=lambda: False)
    # False from on_delta, or True from cancelled (polled before prefill and after each decode step),
    # stops the generation and raises Abandoned: the client went away

A request's text equals `TorchLM.generate` on the same prompt and options: same encoding, same
sampler, same stop-string cut. A job's `context` (token ids of an earlier exchange) is decoded and
put before its prompt; with `want_context` the outcome carries the ids of prompt + response.
"""
from __future__ import annotations

import hashlib
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

from harness.serve.ollama_api import (DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, Abandoned, ApiError, Job,
                                      ModelCard, Outcome)
from harness.serve.scoring import LogprobRecorder
from models.architectures import lookup
from models.generate import generate_tokens
from models.lm import cut_at_stop


class StreamDecoder:
    """Incremental detokenization. Each step decodes the whole token list and hands out only text
    that can no longer change: never a trailing incomplete UTF-8 character (decoded as "\\ufffd")
    nor a tail that could be the start of a stop string. So the deltas concatenate to exactly the
    final text, which is cut before the first stop string (as TorchLM.generate cuts it)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.sent = 0             # characters handed out so far
        self.stopped = False      # a stop string appeared: generation must end

    def _cut(self, text: str) -> str:
        cut = cut_at_stop(text, self.stop)
        self.stopped = self.stopped or len(cut) < len(text)
        return cut

    def _settled_end(self, text: str) -> int:
        base = end = len(text.rstrip("\ufffd"))
        for s in self.stop:   # hold the longest tail of text[:base] that is a proper prefix of s
            k = next((k for k in range(min(len(s) - 1, base), 0, -1) if text.endswith(s[:k], 0, base)), 0)
            end = min(end, base - k)
        return end

    def push(self, tokens: list[int]) -> str:
        text = self._cut(self.decode(tokens))
        end = len(text) if self.stopped else self._settled_end(text)
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def finish(self, tokens: list[int]) -> tuple[str, str]:
        """(the whole final text, the part not handed out yet)."""
        text = self._cut(self.decode(tokens))
        return text, text[self.sent:]


class Engine:
    """The one served model. Requests take turns (a lock): the weights are shared and a CPU is
    saturated by one decode anyway, so batching would add complexity for little."""

    def __init__(self, lm, default_num_ctx: int = 4096):
        self.lm = lm
        self.lock = threading.Lock()
        self.default_num_ctx = default_num_ctx

    def prompt_text(self, job: Job) -> str:
        """The text the model continues: an incoming `context` (token ids of an earlier exchange) is
        decoded and put before the prompt, as Ollama does."""
        if not job.context or isinstance(job.prompt, tuple):
            return job.prompt
        vocab = self.lm.model.config.vocab_size
        bad = next((t for t in job.context if t >= vocab), None)
        if bad is not None:
            raise ApiError(400, f"context holds token id {bad}, outside this model's vocabulary (0..{vocab - 1})")
        ids, tok = list(job.context), self.lm.tokenizer
        if tok.add_bos and ids[:1] == [tok.bos_id]:   # encode() puts BOS first again
            ids = ids[1:]
        return self.lm.decode(ids) + job.prompt

    def prompt_ids(self, job: Job, text: str | None = None) -> tuple[list[int], int]:
        """(prompt token ids cut from the left to fit, the number of tokens that may follow). A job's
        prompt may be token ids already (OpenAI's token-id prompts)."""
        s = job.sampling
        ctx = max(2, min(s.num_ctx or self.default_num_ctx, self.lm.max_length))
        # keep room for the requested tokens (at most half the context) and at least one
        reserve = min(max(s.num_predict, 1), ctx // 2)
        source = job.prompt if text is None else text
        ids = list(source) if isinstance(source, tuple) else self.lm.encode(source)
        ids = ids[-(ctx - reserve):] or [self.lm.prefix_token]
        room = ctx - len(ids)
        return ids, room if s.num_predict < 0 else min(s.num_predict, room)

    def constraint(self, job: Job):
        """The compiled grammar for job.schema (None: free text); a schema constrained decoding
        cannot enforce is the client's error (400)."""
        if job.schema is None:
            return None
        from models.constrained import Constraint, SchemaError
        try:
            return Constraint.schema(self.lm, job.schema)
        except SchemaError as e:
            raise ApiError(400, str(e)) from None

    def call(self, fn: Callable):
        """fn(lm) on the model, between generations (embeddings, prompt log-probs): the engine is the
        one owner of the weights and the tokenizer."""
        with self.lock:
            return fn(self.lm)

    def run(self, job: Job, on_delta: Callable[[str, list], bool],
            cancelled: Callable[[], bool] = lambda: False) -> Outcome:
        """Generate for `job`, calling on_delta(text, scores) with each settled piece of text and the
        TokenScores of the tokens generated since the previous call ([] unless job.logprobs).
        `cancelled()` is asked once the model is ours (a request that waited its turn may be gone
        already) and after every decode step, before that step's text is handed out: a write into a
        socket the peer closed often succeeds, so on_delta alone may notice a step or more late, and
        a non-streamed request writes nothing until the end. Raises Abandoned when on_delta returned
        False or cancelled() True; the model is free again within one decode step."""
        s = job.sampling
        decoder = StreamDecoder(self.lm.decode, s.stop)
        recorder = LogprobRecorder(job.logprobs) if job.logprobs is not None else None
        aborted, first_token_at, sent_scores = False, [], [0]

        def unsent_scores(n: int) -> list:
            if recorder is None:
                return []
            out = recorder.scores(0, n)[sent_scores[0]:]
            sent_scores[0] = n
            return out

        def step(_row: int, tokens: list[int]) -> bool:
            nonlocal aborted
            if not first_token_at:
                first_token_at.append(time.perf_counter_ns())
            delta = decoder.push(tokens)
            aborted = cancelled() or bool(delta) and not on_delta(delta, unsent_scores(len(tokens)))
            return aborted or decoder.stopped

        t_wait = time.perf_counter_ns()
        with self.lock:   # tokenizing inside too: one thread at a time touches the tokenizer
            if cancelled():
                raise Abandoned(0)
            t_start = time.perf_counter_ns()
            prompt = self.prompt_text(job)
            ids, max_new = self.prompt_ids(job, prompt)
            constraint = self.constraint(job)
            tokens: list[int] = []
            if max_new > 0:
                generator = None
                if s.seed is not None:
                    generator = torch.Generator(device=self.lm.device).manual_seed(s.seed)
                tokens = generate_tokens(self.lm.model, [ids], max_new_tokens=max_new,
                                         eos_ids=self.lm.stop_ids(), temperature=s.temperature,
                                         top_k=s.top_k, top_p=s.top_p, generator=generator,
                                         should_stop=step, on_logits=recorder,
                                         constraints=None if constraint is None else [constraint.matcher()])[0]
            t_end = time.perf_counter_ns()
            text, rest = decoder.finish(tokens)
            context = self.lm.encode(prompt + text) if job.want_context else None
        if aborted or rest and not on_delta(rest, unsent_scores(len(tokens))):
            raise Abandoned(len(tokens))
        hit_eos = not decoder.stopped and len(tokens) < max_new
        t_first = first_token_at[0] if first_token_at else t_end
        return Outcome(text=text, done_reason="stop" if decoder.stopped or hit_eos else "length",
                       prompt_eval_count=len(ids), eval_count=len(tokens) + int(hit_eos),
                       load_duration=t_start - t_wait, prompt_eval_duration=t_first - t_start,
                       eval_duration=t_end - t_first, context=context, tokens=tokens,
                       scores=recorder.scores(0, len(tokens)) if recorder is not None else None)


# ----------------------------------------------------------------------------- metadata

def weights_files(source: str) -> list[Path]:
    """The files holding a model's weights ([] for the registry's random-init test models)."""
    from models.registry import MODELS, fetch
    if source in MODELS:
        if MODELS[source].kind == "init":
            return []
        path = fetch(source)
    else:
        path = Path(source).expanduser()
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def weights_digest(files: list[Path], fallback: str, known: dict[str, str] | None = None) -> str:
    """sha256 hex of the weights file; of the files' digests, in order, for sharded folders. `known`:
    digests load_model already computed ({path: sha256}), so a large file is not read twice."""
    from models.download import sha256_file
    if not files:
        return hashlib.sha256(fallback.encode()).hexdigest()
    digests = [(known or {}).get(str(f)) or sha256_file(f) for f in files]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def parameter_count(model) -> int:
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    n = sum(unique.values())
    if getattr(model.config, "tie_embeddings", False) and model.head is not None:
        n -= model.head.weight.numel()   # the fp32 inference layout's copy of the tied embedding
    return n


def _human(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _gguf_quantization(path: Path) -> str | None:
    import gguf

    from models.gguf_meta import read_metadata
    file_type = read_metadata(path).get("general.file_type")
    try:
        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return None


def describe_model(lm, source: str, name: str, num_ctx: int) -> ModelCard:
    """The served model's metadata for /api/tags, /api/show and /api/ps."""
    cfg, model = lm.model.config, lm.model
    files = weights_files(source)
    arch = lookup(model.architecture)
    family = arch.family   # Ollama names a model's family by its GGUF architecture
    dtype = str(lm.info.get("dtype", "float32"))
    fmt = "gguf" if files and files[0].suffix == ".gguf" else "safetensors" if files else "random-init"
    quant = (_gguf_quantization(files[0]) if fmt == "gguf" else None) or {"bfloat16": "BF16"}.get(dtype, "F32")
    n_params = parameter_count(model)
    size = sum(f.stat().st_size for f in files) or sum(p.numel() * p.element_size() for p in model.parameters())
    info = {
        "general.architecture": family, "general.parameter_count": n_params,
        f"{family}.context_length": cfg.context_length, f"{family}.embedding_length": cfg.d_model,
        f"{family}.block_count": cfg.n_layers, f"{family}.attention.head_count": cfg.n_heads,
        f"{family}.vocab_size": cfg.vocab_size, "tokenizer.ggml.eos_token_id": lm.eos_id,
        "harness.source": source, "harness.dtype": dtype, "harness.device": str(lm.device),
    }
    info.update({f"{family}.{key}": value for key, value in arch.model_info(cfg).items()})
    details = {"parent_model": "", "format": fmt, "family": family, "families": [family],
               "parameter_size": _human(n_params), "quantization_level": quant}
    ctx = min(num_ctx, cfg.context_length)
    parameters = "\n".join(f"{k:<30} {v}" for k, v in
                           (("num_ctx", ctx), ("temperature", DEFAULT_TEMPERATURE),
                            ("top_k", DEFAULT_TOP_K), ("top_p", DEFAULT_TOP_P)))
    return ModelCard(
        name=name, digest=weights_digest(files, str(lm.info.get("checkpoint_sha", name)), lm.info.get("weights_sha256")), size=size,
        modified_at=_iso(files[0].stat().st_mtime if files else time.time()), details=details,
        model_info=info, template=lm.chat_template or "{{ .Prompt }}", parameters=parameters,
        context_length=ctx, size_vram=size if lm.device.type == "cuda" else 0)
