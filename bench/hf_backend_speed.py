"""MMLU questions/s of the transformers backend (`model=hf:`) against lm-eval's HFLM, same folder.

Both sides load one Hugging Face folder: the staged SmolLM2-135M-Instruct GGUF as transformers
dequantizes it, written once with save_pretrained (or `--folder` to use one you have). Both score
the (context, continuation) pairs of `MMLUTask(subjects, num_fewshot=k).samples()`: ours through
`models.hf.load_hf_lm(folder).loglikelihood`, lm-eval's as `Instance`s to `HFLM.loglikelihood`
(fp32, batch_size 8, its fastest here per bench/choice_speed.py). Runs are interleaved after a
warm-up, medians reported, with prediction agreement and max |delta loglikelihood| beside them.

Run:  python bench/hf_backend_speed.py [--subjects a,b] [--limit N] [--fewshot 0 5] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_summary  # noqa: E402
from choice_speed import GGUF, lmeval_loglikelihood, models_dir, predictions, quiet_libraries, timed  # noqa: E402

from models.hf import load_hf_lm  # noqa: E402
from tasks.mmlu import MMLUTask  # noqa: E402


def hf_folder(out: Path) -> Path:
    """The GGUF as a save_pretrained folder (model without its GGUF quantizer tag, tokenizer)."""
    import transformers
    src = models_dir() / GGUF
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", default="anatomy,astronomy")
    ap.add_argument("--limit", type=int, default=20, help="first N test questions per subject")
    ap.add_argument("--fewshot", type=int, nargs="+", default=[0, 5])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side and setting")
    ap.add_argument("--folder", help="an HF folder to use instead of converting the GGUF")
    ap.add_argument("--out", default=str(ROOT / "bench/results/hf_backend_speed.json"))
    args = ap.parse_args()
    quiet_libraries()
    from lm_eval.models.huggingface import HFLM

    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.folder) if args.folder else hf_folder(Path(tmp.name))
    ours = load_hf_lm(str(folder), progress=False)
    theirs = HFLM(pretrained=str(folder), batch_size=8, device="cpu")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.2f}", flush=True)
    summary = {"folder": "SmolLM2-135M-Instruct.Q4_1.gguf via save_pretrained" if not args.folder else str(folder),
               "threads": torch.get_num_threads(), "subjects": args.subjects, "limit": args.limit, "settings": {}}
    for k in args.fewshot:
        samples = MMLUTask(args.subjects.split(","), num_fewshot=k, limit=args.limit).samples()
        reqs = [(s.data["context"], c) for s in samples for c in s.data["continuations"]]
        n_choices = [len(s.data["continuations"]) for s in samples]
        ours.loglikelihood(reqs[:8])
        lmeval_loglikelihood(theirs, reqs[:8])   # warm-up
        times: dict[str, list[float]] = {"ours": [], "lmeval": []}
        out = {}
        for r in range(args.repeats):
            for side in (("ours", "lmeval") if r % 2 == 0 else ("lmeval", "ours")):
                fn = ours.loglikelihood if side == "ours" else (lambda q: lmeval_loglikelihood(theirs, q))
                dt, lls = timed(fn, reqs)
                times[side].append(dt)
                out.setdefault(side, lls)
        qps = {side: len(samples) / statistics.median(ts) for side, ts in times.items()}
        agree = sum(a == b for a, b in zip(predictions(out["ours"], n_choices), predictions(out["lmeval"], n_choices)))
        delta = max(abs(a - b) for a, b in zip(out["ours"], out["lmeval"]))
        summary["settings"][str(k)] = {"questions": len(samples), "qps": qps, "runs_s": times,
                                       "ratio": qps["ours"] / qps["lmeval"], "agreement": f"{agree}/{len(samples)}",
                                       "max_abs_delta_ll": delta}
        print(f"{k}-shot, {len(samples)} questions: ours {qps['ours']:.2f} q/s, lm-eval hf {qps['lmeval']:.2f} q/s "
              f"({qps['ours'] / qps['lmeval']:.2f}x); predictions {agree}/{len(samples)} equal, "
              f"max |delta ll| {delta:.2g}", flush=True)
    print(f"wrote {write_summary(args.out, summary)}")


if __name__ == "__main__":
    main()
