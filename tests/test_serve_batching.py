"""Continuous batching (models/batching.py, harness/serve/engine.py): every row of a batch gets the
tokens it gets alone (generate_tokens), whatever joins or leaves beside it and whenever; seeded
sampling, grammar-constrained and log-prob rows keep their own state; over real HTTP, concurrent
clients get the texts sequential calls get, an abandoned request leaves the batch within a step, and
an error inside the model answers every waiting request."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from models.architectures import lookup
from models.batching import BatchDecoder, Row
from models.checkpoint import build_model
from models.generate import generate_tokens

TINY = [("gpt", "gpt-tiny"), ("llama", "llama-tiny"), ("qwen3", "qwen3-tiny"), ("gemma3", "gemma3-tiny")]


def tiny(arch: str, config: str):
    torch.manual_seed(0)
    return build_model(arch, lookup(arch).configs[config]).eval()


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    """Prompts of different lengths, one longer than gemma3-tiny's 16-token window and than what
    the cache holds when it joins."""
    rng = random.Random(seed)
    lengths = [7, 3, 40, 12, 25, 5][:n]
    return [[rng.randrange(1000) for _ in range(k)] for k in lengths]


def run_schedule(batch: BatchDecoder, rows: list[Row], join_at: list[int]) -> None:
    """Row i joins before decode step join_at[i]; steps run until every row is done."""
    step, pending = 0, list(zip(join_at, rows))
    while pending or batch.rows:
        while pending and pending[0][0] <= step and batch.free:
            batch.add(pending.pop(0)[1])
        batch.step()
        step += 1


@pytest.mark.parametrize("arch, config", TINY)
def test_rows_joining_and_leaving_get_their_lone_greedy_tokens(arch, config):
    model = tiny(arch, config)
    ps = prompts(6)
    max_new = [20, 9, 14, 30, 4, 11]          # rows leave at different steps; slots get reused
    rows = [Row(p, max_new=m) for p, m in zip(ps, max_new)]
    batch = BatchDecoder(model, eos_ids=[], max_batch=4)
    run_schedule(batch, rows, join_at=[0, 2, 3, 3, 6, 12])  # the 40-token prompt joins a 3-column cache
    for p, m, r in zip(ps, max_new, rows):
        alone = generate_tokens(model, [p], max_new_tokens=m, eos_ids=[])[0]
        assert r.done and r.tokens == alone, (arch, len(p))
    assert batch.rows == [] and batch.length == 0


def test_cache_compacts_and_grows_when_columns_run_out():
    model = tiny("llama", "llama-tiny")
    ps = prompts(4, seed=2)
    rows = [Row(p, max_new=m) for p, m in zip(ps, [60, 220, 30, 150])]
    batch = BatchDecoder(model, eos_ids=[], max_batch=3, spare=0)
    step, pending, capacities, compacted = 0, list(zip([0, 50, 55, 90], rows)), set(), False
    while pending or batch.rows:
        while pending and pending[0][0] <= step and batch.free:
            batch.add(pending.pop(0)[1])
        before = batch.length
        batch.step()
        compacted |= bool(batch.rows) and batch.length < before
        capacities.add(batch.cache.capacity)
        step += 1
    # the first row's 7 + 60 columns did not hold the rest: the cache grew; and the 3 + 220-token
    # row, joining at column 57, would pass the context without cutting off shared padding
    assert len(capacities) >= 2 and compacted and max(capacities) <= model.config.context_length + 1
    for p, r in zip(ps, rows):
        assert r.tokens == generate_tokens(model, [p], max_new_tokens=r.max_new, eos_ids=[])[0]


def test_a_long_prompt_after_the_batch_drained_grows_the_cache():
    model = tiny("gemma3", "gemma3-tiny")
    short, long = prompts(3, seed=3)[1:]                         # 3 and 40 tokens
    batch = BatchDecoder(model, eos_ids=[], max_batch=2, spare=0)
    first = batch.add(Row(short, max_new=3))                     # a cache of 3 + 3 + 1 columns
    while batch.rows:
        batch.step()
    second = batch.add(Row(long, max_new=10))
    while batch.rows:
        batch.step()
    assert first.tokens == generate_tokens(model, [short], max_new_tokens=3, eos_ids=[])[0]
    assert second.tokens == generate_tokens(model, [long], max_new_tokens=10, eos_ids=[])[0]


def test_seeded_sampling_is_the_same_batched_or_alone():
    model = tiny("qwen3", "qwen3-tiny")
    ps = prompts(3)
    settings = [dict(temperature=0.8, top_k=40, top_p=0.9), dict(temperature=1.2, top_k=None, top_p=None),
                dict(temperature=0.0, top_k=None, top_p=None)]
    rows = [Row(p, max_new=16, generator=torch.Generator().manual_seed(7 + i), **s)
            for i, (p, s) in enumerate(zip(ps, settings))]
    run_schedule(BatchDecoder(model, eos_ids=[], max_batch=4), rows, join_at=[0, 1, 4])
    for i, (p, s, r) in enumerate(zip(ps, settings, rows)):
        alone = generate_tokens(model, [p], max_new_tokens=16, eos_ids=[],
                                generator=torch.Generator().manual_seed(7 + i), **s)[0]
        assert r.tokens == alone


def test_eos_and_should_stop_end_a_row_as_generate_tokens_does():
    model = tiny("gpt", "gpt-tiny")
    ps = prompts(3)
    free = generate_tokens(model, [ps[0]], max_new_tokens=12, eos_ids=[])[0]
    eos = free[5]                                                 # row 0 meets it at its 6th token
    rows = [Row(ps[0], max_new=12), Row(ps[1], max_new=12, should_stop=lambda t: len(t) == 3),
            Row(ps[2], max_new=12)]
    run_schedule(BatchDecoder(model, eos_ids=[eos], max_batch=4), rows, join_at=[0, 0, 2])
    for i, (p, r) in enumerate(zip(ps, rows)):
        stop = (lambda _row, t: len(t) == 3) if i == 1 else None
        assert r.tokens == generate_tokens(model, [p], max_new_tokens=12, eos_ids=[eos], should_stop=stop)[0]
    assert len(rows[0].tokens) == free.index(eos)


# ----------------------------------------------------------------------------- the engine (in process)

def job(lm, question: str, **sampling):
    from harness.serve.ollama_api import Job, Sampling
    extra = {k: sampling.pop(k) for k in ("schema", "logprobs") if k in sampling}
    prompt = lm.chat_prompt([{"role": "user", "content": question}]) if lm.has_chat_template else question
    return Job("generate", "m", prompt, False, Sampling(**{"temperature": 0, "num_predict": 24, **sampling}), **extra)


def together(engine, jobs: list) -> list:
    """Run `jobs` so that they all join the batch at the same step: the model thread is held by a
    call() until every job waits in its inbox. Returns each job's Outcome or exception."""
    gate, out = threading.Event(), [None] * len(jobs)
    holder = threading.Thread(target=engine.call, args=(lambda lm: gate.wait(60),))
    holder.start()

    def one(i):
        try:
            out[i] = engine.run(jobs[i], lambda text, scores: True)
        except Exception as e:   # noqa: BLE001  (the caller asserts on it)
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while engine.inbox.qsize() < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in [holder, *threads]:
        t.join(120)
    return out


def test_grammar_logprob_and_seeded_rows_batched_with_free_rows(smollm2_lm):
    from harness.serve.engine import Engine
    lm = smollm2_lm
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    jobs = [job(lm, "Describe a person as JSON.", schema=schema, num_predict=64),
            job(lm, "Name three colors.", logprobs=2),
            job(lm, "Tell me a story.", temperature=0.9, top_k=30, top_p=0.9, seed=11),
            job(lm, "What is 2 + 2?"),
            job(lm, "Name a fruit.", stop=(".",))]
    engine = Engine(lm, 4096, max_batch=8)
    alone = [engine.run(j, lambda text, scores: True) for j in jobs]
    batched = together(engine, jobs)
    for a, b in zip(alone, batched):
        assert isinstance(b, type(a)), b
        assert (b.text, b.tokens, b.done_reason, b.eval_count) == (a.text, a.tokens, a.done_reason, a.eval_count)
    import json
    assert json.loads(batched[0].text).keys() == {"name", "age"} and batched[0].done_reason == "stop"
    # Same tokens; log-probs equal up to the float noise of an 8-row matmul vs a 1-row one (rounding
    # to 4 places would flip on a boundary).
    assert [s.id for s in batched[1].scores] == [s.id for s in alone[1].scores]
    assert [s.logprob for s in batched[1].scores] == pytest.approx([s.logprob for s in alone[1].scores], abs=1e-3)
    assert len(batched[1].scores[0].top) == 2
    assert "." not in batched[4].text


def test_an_error_in_the_model_answers_every_waiting_request():
    from harness.serve.engine import Engine
    from models.registry import load_lm
    lm = load_lm("llama-tiny", progress=False)
    engine = Engine(lm, 256, max_batch=2)      # three jobs: two decode, one waits for a slot

    def broken(_module, args):
        if args[0].shape[1] == 1:              # a decode step (prefills pass)
            raise RuntimeError("injected fault in block 0")

    hook = lm.model.blocks[0].register_forward_pre_hook(broken)
    try:
        got = together(engine, [job(lm, q, num_predict=50) for q in ("a", "bb", "ccc")])
    finally:
        hook.remove()
    assert all(isinstance(e, RuntimeError) and "injected fault" in str(e) for e in got), got
    assert engine.run(job(lm, "again", num_predict=5), lambda text, scores: True).eval_count == 5


# ----------------------------------------------------------------------------- over HTTP

QUESTIONS = ["Name three colors.", "What is 2 + 2? Explain.", "Name a fruit and describe it.",
             "What is the opposite of hot?", "Write a haiku about rain.", "What is the capital of Italy?",
             "Give me a synonym for happy.", "How many legs does a spider have?"]


def ask(server, question: str, stream: bool, n: int = 32):
    """(text, final response) of one chat through its own `ollama.Client`."""
    import ollama
    c = ollama.Client(host=server.url, timeout=600)
    msgs, opts = [{"role": "user", "content": question}], {"temperature": 0, "num_predict": n}
    if not stream:
        r = c.chat(model=server.model, messages=msgs, options=opts)
        return r.message.content, r
    parts = list(c.chat(model=server.model, messages=msgs, stream=True, options=opts))
    return "".join(p.message.content for p in parts), parts[-1]


def test_eight_concurrent_clients_get_the_sequential_greedy_texts(ollama_server):
    sequential = [ask(ollama_server, q, stream=False)[0] for q in QUESTIONS]
    got: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, ask(ollama_server, QUESTIONS[i], i % 2 == 0)))
               for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert [got[i][0] for i in range(len(QUESTIONS))] == sequential
    # they decoded together: none waited for another's answer (in turns, the last would wait for 7,
    # ~7/8 of its total time; here at most for the others' prefills)
    waits = [got[i][1].load_duration for i in range(len(QUESTIONS))]
    totals = [got[i][1].total_duration for i in range(len(QUESTIONS))]
    assert max(waits) < 0.6 * max(totals), (waits, totals)


@pytest.fixture(scope="module")
def two_slot_server(smollm2_path, tmp_path_factory):
    """SmolLM2 served with max_batch=2, so a third client waits for a slot."""
    import os
    from pathlib import Path
    from types import SimpleNamespace

    from harness.serve.process import spawn_server
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    log = tmp_path_factory.mktemp("two_slots") / "stderr.log"
    with open(log, "w") as err:
        server = spawn_server(["model=smollm2-135m-instruct", "host=127.0.0.1", "port=0", "max_batch=2"],
                              env=env, cwd=root, stderr=err, timeout=120)
    yield SimpleNamespace(url=server.url, model=server.model, log=log)
    server.stop()


def test_abandoned_request_frees_its_slot_within_a_decode_step(two_slot_server):
    import json
    import socket

    import ollama
    server = two_slot_server
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    client = ollama.Client(host=server.url, timeout=120)
    client.generate(model=server.model, prompt="Hello", raw=True, options={"temperature": 0, "num_predict": 2})

    def long_request(stream: bool) -> bytes:
        body = json.dumps({"model": server.model, "prompt": "Count from 1 to 1000: 1, 2, 3,", "raw": True,
                           "stream": stream, "options": {"temperature": 0, "num_predict": 3000}}).encode()
        return b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    with socket.create_connection((host, int(port)), timeout=60) as busy:     # slot 1, all along
        busy.sendall(long_request(stream=True))
        assert busy.recv(4096).startswith(b"HTTP/1.1 200")
        with socket.create_connection((host, int(port)), timeout=60) as gone:  # slot 2, then hangs up
            gone.sendall(long_request(stream=False))
            time.sleep(1.5)           # decoding now; a non-streamed answer writes nothing until the end
        r = client.generate(model=server.model, prompt="Hello", raw=True,
                            options={"temperature": 0, "num_predict": 8})
    step_s = r.eval_duration / 1e9 / max(1, r.eval_count - 1)   # a decode step of the two-row batch
    waited_s = r.load_duration / 1e9                            # waiting for the abandoned row's slot
    assert waited_s < 3 * step_s + 0.25, (waited_s, step_s)
