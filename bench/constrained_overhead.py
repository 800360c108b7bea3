"""Cost of grammar-constrained JSON decoding with each maintained library: xgrammar, llguidance,
outlines-core, on SmolLM2-135M-Instruct (our GGUF loader, our tokenizer, 49,152 tokens).

For every library that imports:
- setup: building its tokenizer object from our vocabulary (token id -> bytes, models.constrained
  .token_bytes), once per model;
- compile: the grammar for "any JSON object" (Ollama `format: "json"`) and for a small schema
  (an object with a string, an integer and an enum field, all required), median of --compile-runs
  fresh compilations (no cache; outlines-core's "any JSON" is a bounded-depth regex, 1 run);
- decode: greedy `generate_tokens` on the same chat prompt, at most --new-tokens tokens, with the
  library's per-sequence matcher in `constraints=[...]` vs no constraint, interleaved, medians over
  --repeats. Reported per generated token: the matcher's own time (compute the next-token bitmask
  + accept the chosen token: the library), the time to apply the bitmask to the logits (the same
  code for all: models.constrained.apply_bitmask_), and the wall time of the whole decode step
  against unconstrained decoding;
- replay: the shipped path's greedy document fed token by token to every library without the model
  (--replays runs): the same per-token costs, far less exposed to a busy machine;
- correct: every constrained output `json.loads` and validates against its schema (jsonschema);
  and schema keywords each library may not implement (`not`, `multipleOf`, `uniqueItems`): a
  library must either refuse the schema or reject a document that violates it, never let it end.
The shipped path (models.constrained: Constraint + Matcher, llguidance) is timed the same way.

Run (the machine is shared: look at the load average it prints; compare ratios):
    python bench/constrained_overhead.py            # writes bench/results/constrained_overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_summary  # noqa: E402

from models.constrained import Constraint, apply_bitmask_, token_bytes  # noqa: E402
from models.generate import generate_tokens  # noqa: E402
from models.registry import load_lm  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "color": {"enum": ["red", "green", "blue"]}},
          "required": ["name", "age", "color"]}
ANY_JSON = {"type": "object"}
# (schema, a document that violates it): refused or rejected = correct; accepted to the end = ignored
PROBES = [({"not": {"type": "string"}}, '"x"'), ({"type": "integer", "multipleOf": 5}, "7"),
          ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
          ({"type": "string", "maxLength": 3}, '"abcdef"')]
PROMPTS = {"json": "List five countries and their capitals as a JSON object.",
           "schema": "Describe a person as JSON with a name, an age and a favorite color."}
# llguidance's default whitespace is unbounded; cap it like xgrammar's max_whitespace_cnt=20
LLG_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}
BITS = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)


class Timed:
    """A row constraint whose library calls (fill + accept) and mask application are timed."""

    def __init__(self, width: int, stop_ids: list[int]):
        self.bitmask = torch.full((1, (width + 31) // 32), -1, dtype=torch.int32)
        self.stop_ids = stop_ids
        self.t_lib = self.t_apply = 0.0
        self.steps = 0

    def mask_(self, logits):
        t0 = time.perf_counter()
        self.fill(self.bitmask)
        t1 = time.perf_counter()
        apply_bitmask_(logits, self.bitmask)
        self.t_apply += time.perf_counter() - t1
        self.t_lib += t1 - t0
        self.steps += 1

    def accept(self, token: int) -> bool:
        t0 = time.perf_counter()
        done = self.consume(token)
        self.t_lib += time.perf_counter() - t0
        return done


# ----------------------------------------------------------------------------- the three libraries

class XGrammar:
    name = "xgrammar"

    def __init__(self, vocab, width, stop_ids):
        import xgrammar as xgr
        self.xgr, self.width, self.stop_ids = xgr, width, stop_ids
        self.info = xgr.TokenizerInfo([b"" if b is None else b for b in vocab], xgr.VocabType.RAW,
                                      vocab_size=width, stop_token_ids=stop_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, schema, strict):
        return self.compiler.compile_json_schema(schema, any_whitespace=True, max_whitespace_cnt=20,
                                                 strict_mode=strict)

    def matcher(self, grammar):
        lib = self
        m = self.xgr.GrammarMatcher(grammar)

        class M(Timed):
            def fill(self, bm):
                m.fill_next_token_bitmask(bm)

            def consume(self, t):
                assert m.accept_token(t), t
                if not m.is_completed():
                    return False
                bm = torch.zeros_like(self.bitmask)
                m.fill_next_token_bitmask(bm)
                allowed = (bm.view(torch.uint8).view(-1, 1) & BITS).bool().view(-1)[: lib.width]
                allowed[lib.stop_ids] = False
                return not bool(allowed.any())
        return M(self.width, self.stop_ids)


class LLGuidance:
    name = "llguidance"

    def __init__(self, vocab, width, stop_ids, tokenizer):
        import llguidance as llg
        self.llg = llg
        special = [i for i, b in enumerate(vocab) if b is None]

        class Wrapped:      # llguidance's TokenizerWrapper interface over our tokenizer
            eos_token_id = stop_ids[0]
            bos_token_id = tokenizer.bos_id
            tokens = [b"\xff" + tokenizer.decode([i]).encode() if b is None else b for i, b in enumerate(vocab)]
            special_token_ids = special

            def __call__(self, s):
                return tokenizer.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s)

        self.tok = llg.LLTokenizer(llg.TokenizerWrapper(Wrapped()), n_vocab=width, eos_token=stop_ids)
        self.width, self.stop_ids = width, stop_ids

    def compile(self, schema, strict):
        # llguidance compiles the grammar when a matcher is built; the matcher is the compile
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=LLG_OPTIONS)
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return grammar

    def matcher(self, grammar):
        import llguidance.torch as lt
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)

        class M(Timed):
            def fill(self, bm):
                lt.fill_next_token_bitmask(m, bm)

            def consume(self, t):
                assert m.consume_token(t), m.get_error()
                return m.is_stopped()
        return M(self.width, self.stop_ids)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, vocab, width, stop_ids):
        import outlines_core as oc
        self.oc = oc
        ids: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab):
            if b is not None and i not in stop_ids:
                ids.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(stop_ids[0], ids)
        self.width, self.stop_ids = width, stop_ids

    def compile(self, schema, strict):
        from outlines_core.json_schema import build_regex_from_schema
        return self.oc.Index(build_regex_from_schema(json.dumps(schema)), self.vocab)

    def matcher(self, index):
        g = self.oc.Guide(index)
        stop = set(self.stop_ids)

        class M(Timed):
            def fill(self, bm):
                g.write_mask_into(bm.data_ptr(), bm.numel(), 4)

            def consume(self, t):
                g.advance(t, return_tokens=False)
                return g.is_finished() and set(g.get_tokens()) <= stop
        return M(self.width, self.stop_ids)


class Shipped:
    """models.constrained as the server will use it (llguidance underneath), timed as a whole."""
    name = "shipped (models.constrained)"

    def __init__(self, lm):
        self.lm = lm

    def matcher(self, constraint):
        inner = constraint.matcher()

        class M(Timed):
            def mask_(self, logits):
                t0 = time.perf_counter()
                inner.mask_(logits)
                self.t_lib += time.perf_counter() - t0
                self.steps += 1

            def consume(self, t):
                return inner.accept(t)
        return M(self.lm.model.config.vocab_size, self.lm.stop_ids())


# ----------------------------------------------------------------------------- measuring

def median_time(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def valid(text: str, schema: dict) -> bool:
    import jsonschema
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed decodes per variant (medians)")
    ap.add_argument("--compile-runs", type=int, default=5)
    ap.add_argument("--replays", type=int, default=20, help="model-free replays of a document per library")
    ap.add_argument("--libraries", nargs="+", default=["xgrammar", "llguidance", "outlines-core"])
    ap.add_argument("--out", default=str(ROOT / "bench/results/constrained_overhead.json"))
    args = ap.parse_args()
    n = args.new_tokens

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}", flush=True)
    lm = load_lm("smollm2-135m-instruct", progress=False)
    width, stop_ids = lm.model.config.vocab_size, lm.stop_ids()
    t = time.perf_counter()
    vocab = token_bytes(lm.tokenizer)
    t_vocab = time.perf_counter() - t
    prompts = {k: lm.encode(lm.chat_prompt([{"role": "user", "content": p}])) for k, p in PROMPTS.items()}
    schemas = {"json": ANY_JSON, "schema": SCHEMA}

    libs, summary = {}, {"machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                     "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]},
                         "model": "smollm2-135m-instruct", "vocab": width, "new_tokens": n,
                         "repeats": args.repeats, "token_bytes_s": t_vocab, "libraries": {}}
    for name in args.libraries:
        try:
            __import__({"outlines-core": "outlines_core"}.get(name, name))   # import outside the timing
            t = time.perf_counter()
            lib = {"xgrammar": lambda: XGrammar(vocab, width, stop_ids),
                   "llguidance": lambda: LLGuidance(vocab, width, stop_ids, lm.tokenizer),
                   "outlines-core": lambda: OutlinesCore(vocab, width, stop_ids)}[name]()
            setup = time.perf_counter() - t
        except ImportError as e:
            print(f"{name}: not installed ({e})", flush=True)
            continue
        from importlib.metadata import version
        entry = {"version": version(name.replace("-", "_") if name != "outlines-core" else "outlines_core"),
                 "setup_s": setup, "compile_s": {}, "grammars": {}}
        grammars = {}
        for kind, schema in schemas.items():
            runs = 1 if name == "outlines-core" and kind == "json" else args.compile_runs
            try:
                entry["compile_s"][kind], grammars[kind] = median_time(
                    lambda: lib.compile(schema, strict=kind == "schema"), runs)
            except Exception as e:   # noqa: BLE001  (a library that cannot compile it is reported)
                entry["compile_s"][kind] = None
                entry.setdefault("errors", {})[kind] = f"{type(e).__name__}: {e}"
        print(f"{name} {entry['version']}: setup {setup * 1e3:.0f} ms; compile " + ", ".join(
            f"{k} {v * 1e3:.1f} ms" if v is not None else f"{k} FAILED" for k, v in entry["compile_s"].items()),
            flush=True)
        libs[name], summary["libraries"][name] = (lib, grammars), entry
    shipped = Shipped(lm)
    t = time.perf_counter()
    constraints = {"json": Constraint.json(lm), "schema": Constraint.schema(lm, SCHEMA)}
    summary["shipped_first_compile_s"] = time.perf_counter() - t   # token_bytes + info + both grammars
    libs["shipped"] = (shipped, constraints)
    summary["libraries"]["shipped"] = {"compile_s": {}, "grammars": {}}

    def run(kind: str, variant: str):
        if variant == "none":
            m = None
        else:
            lib, grammars = libs[variant]
            m = lib.matcher(grammars[kind])
        t = time.perf_counter()
        out = generate_tokens(lm.model, [prompts[kind]], max_new_tokens=n, eos_ids=stop_ids,
                              constraints=None if m is None else [m])[0]
        return time.perf_counter() - t, out, m

    variants = ["none"] + [v for v in libs if all(g is not None for g in libs[v][1].values())]
    for kind in schemas:
        for v in variants:
            run(kind, v)        # warm-up
    per = {(k, v): [] for k in schemas for v in variants}
    for r in range(args.repeats):
        for kind in schemas:
            for v in (variants if r % 2 == 0 else variants[::-1]):
                dt, out, m = run(kind, v)
                per[(kind, v)].append((dt, out, m))
        print(f"  repeat {r + 1} done, load avg {os.getloadavg()[0]:.2f}", flush=True)

    # Replay: the same valid document's tokens (the shipped greedy output) through every library,
    # without the model: the matcher and apply costs alone, less exposed to a busy machine.
    replay = {}
    for kind in schemas:
        doc = per[(kind, "shipped")][0][1]
        for v in variants[1:]:
            lib, grammars = libs[v]
            lib_ts, apply_ts = [], []
            try:
                for _ in range(args.replays):
                    m = lib.matcher(grammars[kind])
                    logits = torch.zeros(width)
                    for tok in doc:
                        logits.zero_()
                        m.mask_(logits)
                        if logits[tok] == float("-inf"):
                            raise ValueError(f"its grammar forbids token {tok} ({lm.decode([tok])!r})")
                        m.accept(tok)
                    lib_ts.append(m.t_lib / len(doc))
                    apply_ts.append(m.t_apply / len(doc))
            except (ValueError, AssertionError) as e:   # e.g. outlines-core's whitespace is "[ ]?"
                print(f"  replay {kind} {v}: document rejected: {e}", flush=True)
                continue
            replay[(kind, v)] = (statistics.median(lib_ts), statistics.median(apply_ts), len(doc))
            summary["libraries"][v].setdefault("replay", {})[kind] = {
                "tokens": len(doc), "matcher_ms_per_token": replay[(kind, v)][0] * 1e3,
                "apply_ms_per_token": replay[(kind, v)][1] * 1e3, "runs": args.replays}

    # Keyword probes: refused at compile, or the violating document cannot be completed.
    eos = stop_ids[0]
    for v in variants[1:]:
        lib = libs[v][0]
        verdicts = {}
        for schema, bad_doc in PROBES:
            key = json.dumps(schema)
            try:
                grammar = Constraint.schema(lm, schema) if v == "shipped" else lib.compile(schema, strict=True)
            except Exception as e:   # noqa: BLE001
                verdicts[key] = f"refused: {str(e).strip().splitlines()[0][:100]}"
                continue
            m, logits, verdict = lib.matcher(grammar), torch.zeros(width), None
            for tok in lm.tokenizer.encode(bad_doc):
                logits.zero_()
                m.mask_(logits)
                if logits[tok] == float("-inf"):
                    verdict = "enforced (violating token masked)"
                    break
                m.accept(tok)
            if verdict is None:
                logits.zero_()
                m.mask_(logits)
                verdict = ("enforced (cannot end there)" if logits[eos] == float("-inf")
                           else f"IGNORED: {bad_doc} accepted")
            verdicts[key] = verdict
        summary["libraries"][v]["keyword_probes"] = verdicts
        summary["libraries"][v]["keywords_correct"] = not any(x.startswith("IGNORED") for x in verdicts.values())

    rows = []
    for kind, schema in schemas.items():
        base = statistics.median(dt / max(len(o), 1) for dt, o, _ in per[(kind, "none")])
        summary.setdefault("unconstrained_ms_per_token", {})[kind] = base * 1e3
        rows.append((kind, "none", base, None, None, None, None))
        for v in variants[1:]:
            results = per[(kind, v)]
            step = statistics.median(dt / max(len(o), 1) for dt, o, _ in results)
            lib_t = statistics.median(m.t_lib / max(m.steps, 1) for _, _, m in results)
            apply_t = statistics.median(m.t_apply / max(m.steps, 1) for _, _, m in results)
            text = lm.decode(results[0][1])
            ok = all(valid(lm.decode(o), schema) for _, o, _ in results)
            summary["libraries"][v]["grammars"][kind] = {
                "ms_per_token": step * 1e3, "ratio_vs_unconstrained": step / base,
                "matcher_ms_per_token": lib_t * 1e3, "apply_ms_per_token": apply_t * 1e3,
                "overhead_pct_of_unconstrained": 100 * (lib_t + apply_t) / base,
                "tokens": len(results[0][1]), "valid": ok, "text": text,
                "all_runs_s": [dt for dt, _, _ in results]}
            rows.append((kind, v, step, lib_t, apply_t, len(results[0][1]), ok))

    print(f"\nper generated token, greedy, <= {n} tokens, median of {args.repeats} "
          f"(load avg {os.getloadavg()[0]:.2f}):")
    print(f"{'grammar':7} {'library':30} {'step ms':>8} {'x none':>7} {'matcher ms':>11} {'apply ms':>9} "
          f"{'overhead':>9} {'tokens':>6} valid")
    for kind, v, step, lib_t, apply_t, ntok, ok in rows:
        base = summary["unconstrained_ms_per_token"][kind] / 1e3
        if v == "none":
            print(f"{kind:7} {'(unconstrained)':30} {step * 1e3:8.2f} {1:7.2f}")
            continue
        apply_s = f"{apply_t * 1e3:9.3f}" if v != "shipped" else f"{'(incl.)':>9}"
        print(f"{kind:7} {v:30} {step * 1e3:8.2f} {step / base:7.2f} {lib_t * 1e3:11.3f} {apply_s} "
              f"{100 * (lib_t + apply_t) / base:8.1f}% {ntok:6d} {'yes' if ok else 'NO'}")
    print(f"\nreplay of the shipped greedy document, no model, median of {args.replays} (ms per token):")
    print(f"{'grammar':7} {'library':30} {'matcher':>8} {'apply':>8} {'total':>8} {'% of none':>9}")
    for (kind, v), (lib_t, apply_t, ntok) in replay.items():
        base = summary["unconstrained_ms_per_token"][kind] / 1e3
        print(f"{kind:7} {v:30} {lib_t * 1e3:8.3f} {apply_t * 1e3:8.3f} {(lib_t + apply_t) * 1e3:8.3f} "
              f"{100 * (lib_t + apply_t) / base:8.2f}%")
    print("\ncompile (median ms):")
    for name, entry in summary["libraries"].items():
        if name != "shipped":
            print(f"  {name:14} setup {entry['setup_s'] * 1e3:8.1f}   " + "   ".join(
                f"{k} {v * 1e3:8.2f}" if v is not None else f"{k} FAILED" for k, v in entry["compile_s"].items()))
    print(f"  shipped first Constraint.json + .schema (token_bytes + setup + compile): "
          f"{summary['shipped_first_compile_s'] * 1e3:.0f} ms")
    print("\nschema keywords (refused or enforced = correct):")
    for v in variants[1:]:
        for key, verdict in summary["libraries"][v]["keyword_probes"].items():
            print(f"  {v:30} {key:70} {verdict}")
    for kind in schemas:
        print(f"\n{kind}:")
        for v in variants[1:]:
            print(f"  {v:30} {summary['libraries'][v]['grammars'][kind]['text']!r}")
    summary["machine"]["load_avg_end"] = os.getloadavg()[0]
    print(f"\nwrote {write_summary(args.out, summary)}")


if __name__ == "__main__":
    main()
