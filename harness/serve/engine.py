"""The torch side of `harness.serve`: one loaded TorchLM whose thread decodes concurrent requests in
one batch (models/batching.py), streamed as text deltas. (The served model's metadata: card.py.)

    engine = Engine(lm, default_num_ctx=4096, max_batch=8)
    outcome = engine.run(job, on_delta=lambda text, scores: True, cancelled=lambda: False)
    # False from on_delta, or True from cancelled (polled while waiting, at joining and after each
    # decode step), stops the generation and raises Abandoned: the client went away

A request's text equals `TorchLM.generate` on the same prompt and options: same encoding, same
sampler, same stop-string cut. A job's `context` (token ids of an earlier exchange) is decoded and
put before its prompt; with `want_context` the outcome carries the ids of prompt + response.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
from collections import deque
from typing import Callable, Sequence

import torch

from harness.serve.ollama_api import Abandoned, ApiError, Job, Outcome
from harness.serve.scoring import LogprobRecorder
from models.batching import BatchDecoder, Row
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


class _Request:
    """One run() (or call()) on its way through the model thread; its caller waits on `done`."""

    def __init__(self, job: Job | None, on_delta, cancelled, fn: Callable | None = None):
        self.job, self.on_delta, self.cancelled, self.fn = job, on_delta, cancelled, fn
        self.done = threading.Event()
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.t_wait = time.perf_counter_ns()
        self.t_start = self.t_first = 0
        self.aborted, self.sent_scores, self.recorder = False, 0, None

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.outcome

    def unsent(self, n: int) -> list:
        """The TokenScores of tokens [sent, n) ([] without job.logprobs)."""
        if self.recorder is None:
            return []
        out = self.recorder.scores(0, n)[self.sent_scores:]
        self.sent_scores = n
        return out


class Engine:
    """The one served model, owned by one scheduler thread; run() and call() hand it work and wait.

    Concurrent requests decode together (models/batching.py): a request joins the batch between two
    decode steps (its prompt prefilled alone), every step gives each active row one token, and a row
    that ends (EOS, a stop string, its limit, a client that left) leaves at once, freeing its slot
    for a waiting request. A decode step of n rows costs little more than one of one row (the
    weights are read once per step either way), so n clients are answered ~n times faster than in
    turns, and each still gets exactly the text it gets alone. One thread owns the model and the
    tokenizer, so nothing else needs a lock; on_delta and cancelled run on that thread, which is why
    they must not block (app.Generation's only queue an item and read an Event).
    `max_batch=1` serves requests in turns through the same code (the serial baseline of
    bench/serve_speed.py). An exception inside a decode step fails every row of that step."""

    def __init__(self, lm, default_num_ctx: int = 4096, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: expected at least 1 (1 serves requests in turns)")
        self.lm = lm
        self.default_num_ctx = default_num_ctx
        self.max_batch = max_batch
        self.batch = BatchDecoder(lm.model, lm.stop_ids(), max_batch)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[_Request] = deque()
        self.active: dict[Row, _Request] = {}
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()
        atexit.register(self.close)

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
        """fn(lm) on the model thread, between two decode steps (embeddings, prompt log-probs): that
        thread is the one owner of the weights and the tokenizer."""
        if threading.current_thread() is self.thread:
            return fn(self.lm)
        req = _Request(None, None, None, fn)
        self.inbox.put(req)
        return req.wait()

    def run(self, job: Job, on_delta: Callable[[str, list], bool],
            cancelled: Callable[[], bool] = lambda: False) -> Outcome:
        """Generate for `job`, calling on_delta(text, scores) with each settled piece of text and the
        TokenScores of the tokens generated since the previous call ([] unless job.logprobs).
        `cancelled()` is asked while the job waits for a slot, when it joins, and after every decode
        step, before that step's text is handed out: a write into a socket the peer closed often
        succeeds, so on_delta alone may notice a step or more late, and a non-streamed request writes
        nothing until the end. Raises Abandoned when on_delta returned False or cancelled() True; the
        row leaves the batch within one decode step. Blocks the calling thread until done."""
        req = _Request(job, on_delta, cancelled)
        self.inbox.put(req)
        return req.wait()

    # ------------------------------------------------------------------ the model thread

    def close(self, timeout: float = 60) -> None:
        """Stop the model thread (registered with atexit: torch aborts the process when the
        interpreter finalizes while another thread runs an op). Jobs still running fail."""
        if self.thread.is_alive():
            self.inbox.put(None)
            self.thread.join(timeout)

    def _loop(self) -> None:
        while True:
            try:
                if not self._take():
                    self._fail_all(RuntimeError("the model is shutting down"))
                    return
                self._admit()
                if self.active:
                    self._step()
            except BaseException as e:   # a fault here must answer every waiting run(), not hang it
                self._fail_all(e)

    def _take(self) -> bool:
        """New work into `waiting` (blocking while idle); False once close() asked to stop."""
        items = []
        if not self.active and not self.waiting:
            self.batch.reset()                    # idle: free the cache's memory
            items.append(self.inbox.get())
        while not self.inbox.empty():
            items.append(self.inbox.get())
        self.waiting.extend(item for item in items if item is not None)
        return None not in items

    def _fail_active(self, error: BaseException) -> None:
        """Every row in the batch fails; the batch cache (its state now unknown) is dropped."""
        failed = list(self.active.values())
        self.active.clear()
        self.batch.reset()
        for req in failed:
            req.fail(error)

    def _fail_all(self, error: BaseException) -> None:
        self._fail_active(error)
        waiting, self.waiting = self.waiting, deque()
        for req in waiting:
            req.fail(error)

    def _admit(self) -> None:
        """Calls run now, in order; jobs join while slots are free; a waiting job whose client left
        ends without starting."""
        still: deque[_Request] = deque()
        for req in self.waiting:
            if req.fn is not None:
                try:
                    req.outcome = req.fn(self.lm)
                    req.done.set()
                except BaseException as e:
                    req.fail(e)
            elif req.cancelled():
                req.fail(Abandoned(0))
            elif self.batch.free:
                self._join(req)
            else:
                still.append(req)
        self.waiting = still

    def _join(self, req: _Request) -> None:
        req.t_start = time.perf_counter_ns()
        job, s = req.job, req.job.sampling
        try:
            req.prompt = self.prompt_text(job)
            req.ids, req.max_new = self.prompt_ids(job, req.prompt)
            constraint = self.constraint(job)
            req.decoder = StreamDecoder(self.lm.decode, s.stop)
            req.recorder = LogprobRecorder(job.logprobs) if job.logprobs is not None else None
            generator = None
            if s.seed is not None:
                generator = torch.Generator(device=self.lm.device).manual_seed(s.seed)
            req.row = Row(req.ids, req.max_new, s.temperature, s.top_k, s.top_p, generator,
                          None if constraint is None else constraint.matcher(),
                          should_stop=lambda tokens: self._progress(req, tokens), on_logits=req.recorder)
            self.batch.add(req.row)          # the prompt's prefill, alone; a failure is this job's
        except BaseException as e:
            req.fail(e)
            return
        if req.row.done:
            self._finish(req)
        else:
            self.active[req.row] = req

    def _step(self) -> None:
        try:
            finished = self.batch.step()
        except BaseException as e:
            self._fail_active(e)
            return
        for row in finished:
            self._finish(self.active.pop(row))

    def _progress(self, req: _Request, tokens: list[int]) -> bool:
        """A row's should_stop: hand out its settled text; True ends the row."""
        if not req.t_first:
            req.t_first = time.perf_counter_ns()
        try:
            delta = req.decoder.push(tokens)
            req.aborted = req.cancelled() or bool(delta) and not req.on_delta(delta, req.unsent(len(tokens)))
        except Exception as e:               # this request's fault (a callback), not the model's
            req.error = e
            return True
        return req.aborted or req.decoder.stopped

    def _finish(self, req: _Request) -> None:
        t_end = time.perf_counter_ns()
        tokens = req.row.tokens
        try:
            if req.error is not None:
                raise req.error
            text, rest = req.decoder.finish(tokens)
            context = self.lm.encode(req.prompt + text) if req.job.want_context else None
            if req.aborted or rest and not req.on_delta(rest, req.unsent(len(tokens))):
                raise Abandoned(len(tokens))
        except BaseException as e:
            req.fail(e)
            return
        stopped = req.decoder.stopped
        hit_eos = not stopped and len(tokens) < req.max_new
        t_first = req.t_first or t_end
        req.outcome = Outcome(
            text=text, done_reason="stop" if stopped or hit_eos else "length", prompt_eval_count=len(req.ids),
            eval_count=len(tokens) + int(hit_eos), load_duration=req.t_start - req.t_wait,
            prompt_eval_duration=t_first - req.t_start, eval_duration=t_end - t_first, context=context,
            tokens=tokens, scores=req.recorder.scores(0, len(tokens)) if req.recorder is not None else None)
        req.done.set()
