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

Then 4 clients at once, each with its own prompt, through separate `ollama.Client`s (two streaming,
two not): each answer must equal the one the same prompt gets alone.

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
              "What is the opposite of hot?"]
OVERHEAD_LIMIT = 0.10


def start_server(model: str, dtype: str) -> ServedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        server = spawn_server([f"model={model}", f"dtype={dtype}", "host=127.0.0.1", "port=0", "log_level=WARNING"],
                              env=env, cwd=ROOT)
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


def concurrent_check(url: str, name: str, lm, n: int) -> dict:
    opts = {"temperature": 0, "num_predict": n}

    def ask(q: str, stream: bool) -> str:
        c = ollama.Client(host=url, timeout=600)
        msgs = [{"role": "user", "content": q}]
        if stream:
            return "".join(p.message.content for p in c.chat(model=name, messages=msgs, stream=True, options=opts))
        return c.chat(model=name, messages=msgs, options=opts).message.content

    t = time.perf_counter()
    lone = [ask(q, False) for q in CONCURRENT]
    lone_s = time.perf_counter() - t
    got: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, ask(CONCURRENT[i], i % 2 == 0)))
               for i in range(len(CONCURRENT))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    together_s = time.perf_counter() - t
    local = [lm.generate([lm.chat_prompt([{"role": "user", "content": q}])], max_new_tokens=n)[0] for q in CONCURRENT]
    ok = [got.get(i) == lone[i] for i in range(len(CONCURRENT))]
    return {"clients": len(CONCURRENT), "all_equal_to_lone": all(ok), "per_client": ok,
            "lone_equal_in_process": [a == b for a, b in zip(lone, local)],
            "sequential_s": lone_s, "concurrent_s": together_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per side (medians)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrent-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve_speed.json"))
    args = ap.parse_args()
    n = args.new_tokens

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    server = start_server(args.model, args.dtype)
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
        conc = concurrent_check(url, name, lm, args.concurrent_tokens)
        print(f"\n{conc['clients']} concurrent clients, each equal to its lone answer: "
              f"{'YES' if conc['all_equal_to_lone'] else 'NO'} {conc['per_client']}; lone answers equal "
              f"in-process: {conc['lone_equal_in_process']}; sequential {conc['sequential_s']:.1f}s, "
              f"concurrent {conc['concurrent_s']:.1f}s (requests take turns on the model)")
    finally:
        server.stop(timeout=60)

    summary = {
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(), "load_avg_1m": os.getloadavg()[0]},
        "model": args.model, "dtype": args.dtype, "tokens_per_call": tokens, "prompt_tokens": len(lm.encode(prompt)),
        "repeats": args.repeats, "server_tok_s": srv, "in_process_tok_s": loc, "ratio": srv / loc,
        "overhead": overhead, "target": f"overhead < {OVERHEAD_LIMIT:.0%}", "pass": ok, "same_text": same_text,
        "server_runs_s": server_s, "in_process_runs_s": local_s, "concurrent": conc,
    }
    out = write_summary(args.out, summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
