"""Overhead of serving: tokens/s of harness.serve's /api/generate against in-process TorchLM.generate.

Both sides generate from the same text (SmolLM2's chat template around a story request, sent with
`raw: true` so the server does not template it again), greedy, 128 new tokens at most:
  server      POST /api/generate {"stream": false, "raw": true, options: {temperature 0, num_predict 128}}
              through the `ollama` client; wall time of the call (HTTP, JSON, tokenization, prefill)
  in-process  lm.generate([prompt], max_new_tokens=128)   (tokenization and prefill included too)
tokens/s = generated tokens / wall time, the token count being the server's eval_count (both sides
produce the same greedy text, which is checked). The server runs in a subprocess with the same
dtype and thread count; the two sides alternate, repeat after repeat, and medians are reported.
Target: server tokens/s >= 90% of in-process (overhead < 10%).

Then batching: 8 clients at once, each with its own prompt (chat-templated, sent raw), a 64-token
greedy completion each through its own `ollama.Client` (half streaming), against two servers in
the same run: the batched one (max_batch=8, the default) and a serialised one (max_batch=1: the same
engine code answering requests in turns). Aggregate tokens/s = all 8 answers' eval_count / wall
time from the first request to the last answer; rounds alternate between the servers, medians are
reported. Target: batched >= 3x serialised, with every text equal on both servers and to
in-process lm.generate of the same prompt.

Run:  OMP_NUM_THREADS=1 python bench/serve_speed.py      (writes bench/results/serve_speed.json)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_summary  # noqa: E402  (bench/ is the script's folder, first on sys.path)

import ollama  # noqa: E402

from harness.serve.process import ServedProcess, ServerStartError, spawn_server  # noqa: E402
from models.registry import load_lm  # noqa: E402

STORY = "Write a long story about a robot who learns to paint."
CONCURRENT = ["Name three colors.", "What is 2 + 2? Explain.", "Name a fruit and describe it.",
              "What is the opposite of hot?", "Write a haiku about rain.", "What is the capital of Italy?",
              "Give me a synonym for happy.", "How many legs does a spider have?"]
OVERHEAD_LIMIT = 0.10
BATCH_TARGET = 3.0


def start_server(model: str, dtype: str, max_batch: int = 8) -> ServedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        server = spawn_server([f"model={model}", f"dtype={dtype}", "host=127.0.0.1", "port=0", "log_level=WARNING",
                               f"max_batch={max_batch}"], env=env, cwd=ROOT)
    except ServerStartError as e:
        sys.exit(f"error: {e} (its stderr is above)")
    return server


def timed_server(client: ollama.Client, name: str, prompt: str, n: int) -> tuple[float, int, str]:
    t = time.perf_counter()
    r = client.generate(model=name, prompt=prompt, raw=True, stream=False,
                        options={"temperature": 0, "num_predict": n})
    return time.perf_counter() - t, r.eval_count, r.response


def timed_local(lm, prompt: str, n: int) -> tuple[float, str]:
    t = time.perf_counter()
    text = lm.generate([prompt], max_new_tokens=n)[0]
    return time.perf_counter() - t, text


def concurrent_round(server: ServedProcess, prompts: list[str], n: int) -> tuple[float, int, list[str]]:
    """All prompts at once, each through its own client (every other one streaming): (wall seconds
    from the first request to the last answer, generated tokens in all, texts)."""
    opts = {"temperature": 0, "num_predict": n}
    got: dict[int, tuple[int, str]] = {}

    def ask(i: int) -> None:
        c = ollama.Client(host=server.url, timeout=600)
        if i % 2:
            r = c.generate(model=server.model, prompt=prompts[i], raw=True, stream=False, options=opts)
            got[i] = (r.eval_count, r.response)
            return
        parts = list(c.generate(model=server.model, prompt=prompts[i], raw=True, stream=True, options=opts))
        got[i] = (parts[-1].eval_count, "".join(p.response for p in parts))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if len(got) != len(prompts):
        sys.exit(f"error: {len(prompts) - len(got)} of {len(prompts)} concurrent requests failed (traceback above)")
    return wall, sum(got[i][0] for i in got), [got[i][1] for i in range(len(prompts))]


def batching_check(batched: ServedProcess, serial: ServedProcess, lm, n: int, repeats: int) -> dict:
    prompts = [lm.chat_prompt([{"role": "user", "content": q}]) for q in CONCURRENT]
    concurrent_round(batched, prompts, 4)                      # warm-up, untimed
    concurrent_round(serial, prompts, 4)
    runs: dict[str, list[float]] = {"batched": [], "serial": []}
    texts: dict[str, list[str]] = {}
    for r in range(repeats):
        for side in (("batched", "serial") if r % 2 == 0 else ("serial", "batched")):
            wall, tokens, texts[side] = concurrent_round(batched if side == "batched" else serial, prompts, n)
            runs[side].append(tokens / wall)
        print(f"  round {r + 1}: batched {runs['batched'][-1]:.1f} tok/s, serialised {runs['serial'][-1]:.1f} tok/s",
              flush=True)
    local = [lm.generate([p], max_new_tokens=n)[0] for p in prompts]
    b, s = statistics.median(runs["batched"]), statistics.median(runs["serial"])
    same = texts["batched"] == texts["serial"]
    return {"clients": len(prompts), "new_tokens": n, "repeats": repeats, "batched_tok_s": b, "serial_tok_s": s,
            "ratio": b / s, "target": f"batched >= {BATCH_TARGET:g}x serialised",
            "pass": b / s >= BATCH_TARGET and same, "texts_equal_batched_serial": same,
            "texts_equal_in_process": [a == c for a, c in zip(texts["batched"], local)],
            "batched_runs_tok_s": runs["batched"], "serial_runs_tok_s": runs["serial"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per side (medians)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=64, help="new tokens per concurrent request")
    ap.add_argument("--batch-repeats", type=int, default=3, help="alternating rounds per server (medians)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve_speed.json"))
    args = ap.parse_args()
    n = args.new_tokens

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    server = start_server(args.model, args.dtype)
    serial = start_server(args.model, args.dtype, max_batch=1)
    name, url = server.model, server.url
    try:
        lm = load_lm(args.model, dtype=args.dtype, progress=False)
        prompt = lm.chat_prompt([{"role": "user", "content": STORY}])
        client = ollama.Client(host=url, timeout=600)
        timed_server(client, name, prompt, 8)                    # warm-up, untimed
        timed_local(lm, prompt, 8)
        server_s, local_s, counts, same_text = [], [], set(), True
        for r in range(args.repeats):
            for side in (("server", "local") if r % 2 == 0 else ("local", "server")):
                if side == "server":
                    dt, count, s_text = timed_server(client, name, prompt, n)
                    server_s.append(dt)
                    counts.add(count)
                else:
                    dt, l_text = timed_local(lm, prompt, n)
                    local_s.append(dt)
            same_text &= s_text == l_text
            print(f"  repeat {r + 1}: server {count / server_s[-1]:.1f} tok/s, in-process "
                  f"{count / local_s[-1]:.1f} tok/s", flush=True)
        (tokens,) = counts
        srv, loc = tokens / statistics.median(server_s), tokens / statistics.median(local_s)
        overhead = 1 - srv / loc
        ok = overhead < OVERHEAD_LIMIT
        print(f"\n[{args.dtype}] {tokens} tokens per call, medians of {args.repeats}")
        print(f"  server /api/generate   {srv:7.2f} tokens/s   (runs: {', '.join(f'{tokens / x:.1f}' for x in server_s)})")
        print(f"  in-process generate    {loc:7.2f} tokens/s   (runs: {', '.join(f'{tokens / x:.1f}' for x in local_s)})")
        print(f"  ratio server / in-process: {srv / loc:.3f}x; overhead {100 * overhead:.1f}% "
              f"(target < {100 * OVERHEAD_LIMIT:.0f}%): {'PASS' if ok else 'MISS'}")
        print(f"  same text on both sides: {'YES' if same_text else 'NO'}")
        print(f"\n{len(CONCURRENT)} concurrent clients x {args.batch_tokens} greedy tokens, batched server "
              f"(max_batch=8) vs serialised (max_batch=1), {args.batch_repeats} alternating rounds", flush=True)
        conc = batching_check(server, serial, lm, args.batch_tokens, args.batch_repeats)
        print(f"  aggregate tokens/s: batched {conc['batched_tok_s']:.1f}, serialised {conc['serial_tok_s']:.1f}; "
              f"ratio {conc['ratio']:.2f}x (target >= {BATCH_TARGET:g}x): {'PASS' if conc['pass'] else 'MISS'}")
        print(f"  texts equal batched vs serialised: {'YES' if conc['texts_equal_batched_serial'] else 'NO'}; "
              f"equal in-process generate: {conc['texts_equal_in_process']}")
    finally:
        server.stop(timeout=60)
        serial.stop(timeout=60)

    summary = {
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(), "load_avg_1m": os.getloadavg()[0]},
        "model": args.model, "dtype": args.dtype, "tokens_per_call": tokens, "prompt_tokens": len(lm.encode(prompt)),
        "repeats": args.repeats, "server_tok_s": srv, "in_process_tok_s": loc, "ratio": srv / loc,
        "overhead": overhead, "target": f"overhead < {OVERHEAD_LIMIT:.0%}", "pass": ok, "same_text": same_text,
        "server_runs_s": server_s, "in_process_runs_s": local_s, "batching": conc,
    }
    out = write_summary(args.out, summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
