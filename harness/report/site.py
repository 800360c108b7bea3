"""The results viewer: a static site of the leaderboard, every run sample by sample, comparisons of
runs of the same samples and training curves (the page layout and DOM contract the browser tests
rely on: index.html, runs/<run_id>.html, compare/<a>__<b>.html, train/<id>.html).

Pages are plain HTML shells; harness/report/assets/view.js draws them from a data script
(`data/*.js`, `window.HARNESS = {...};`) loaded by a <script src> tag, because browsers refuse
fetch() on file:// and the site must open from disk, offline. The site is built in a temporary
folder next to out_dir and swapped in, so a crash never leaves half a site; an out_dir that is not
a site this module wrote is never replaced. The CLI is harness/view.py.
"""
from __future__ import annotations

import glob
import html
import json
import logging
import os
import shutil
import tempfile
from itertools import combinations
from pathlib import Path

from harness.cli import UserError
from harness.report import site_data
from harness.report.compare import CompareError, load_run
from harness.report.site_data import page_name

log = logging.getLogger("harness.view")
ASSETS = Path(__file__).parent / "assets"
MARKER = ".harness-site"        # written into every site: only such a folder is ever replaced
MAX_PAIRS = 200                 # comparisons built at most (each is a bootstrap over the run's samples)
DEFAULT_RUN_ROOTS = ("outputs", "multirun")


class ViewError(UserError):
    """The site cannot be built as asked; printed as one `error:` line, exit 2."""


# --- which folders ---------------------------------------------------------------------------------

def _runs_below(root: Path) -> list[Path]:
    found = []
    for folder, _, _ in os.walk(root):
        p = Path(folder)
        if site_data.is_eval_run(p) or site_data.is_training_run(p):
            found.append(p)
    return sorted(found)


def find_runs(patterns: list[str] | None) -> list[Path]:
    """Run folders: every run under outputs/ and multirun/ by default; else each named folder (or,
    for a folder that is no run itself, the runs beneath it) and each glob's matching runs."""
    if patterns is None:
        return [p.resolve() for root in DEFAULT_RUN_ROOTS if Path(root).is_dir() for p in _runs_below(Path(root))]
    found = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern))]
            found += [p for m in matches if m.is_dir() for p in _runs_below(m)]
            continue
        p = Path(pattern)
        if not p.is_dir():
            raise ViewError(f"runs={pattern}: no such folder; pass run folders written by python -m harness "
                            "or harness.train (or glob patterns)")
        below = _runs_below(p)
        if not below:
            raise ViewError(f"runs={pattern} is neither an eval run (run.json + records.jsonl) nor a training "
                            "run (provenance.json + metrics.jsonl), and holds none")
        found += below
    return list(dict.fromkeys(p.resolve() for p in found))


# --- what goes into the site -----------------------------------------------------------------------

def collect(leaderboard: Path, folders: list[Path]) -> dict:
    """Read every run and the leaderboard; build the comparisons. Raises ViewError when nothing is found."""
    evals, trainings = {}, {}
    for folder in folders:
        if site_data.is_eval_run(folder):
            run = site_data.eval_run(folder)
            if run["run_id"] in evals:
                log.warning("run %s is in %s and %s: showing the first", run["run_id"], evals[run["run_id"]]["path"], folder)
                continue
            evals[run["run_id"]] = run
        if site_data.is_training_run(folder):
            train = site_data.training_run(folder)
            trainings.setdefault(train["id"], train)
    board = site_data.leaderboard(leaderboard, set(evals)) if leaderboard.is_file() else None
    if board is None:
        log.warning("no leaderboard at %s: the site shows the runs only", leaderboard)
    return {"leaderboard": board, "evals": evals, "trainings": trainings, "comparisons": comparisons(evals)}


def comparisons(evals: dict) -> list[dict]:
    """Every pair of runs of one task on the same sample ids that compare accepts, earlier run first."""
    ordered = sorted(evals.values(), key=lambda r: r["run_id"])    # run ids start with their UTC stamp
    candidates = [(a, b) for a, b in combinations(ordered, 2)
                  if a["key"].get("task") == b["key"].get("task")
                  and {s["id"] for s in a["samples"]} == {s["id"] for s in b["samples"]}]
    if len(candidates) > MAX_PAIRS:
        log.warning("%d comparable pairs of runs: comparing the first %d only", len(candidates), MAX_PAIRS)
        candidates = candidates[:MAX_PAIRS]
    loaded, out = {}, []
    for a, b in candidates:
        for run in (a, b):
            if run["run_id"] not in loaded:
                loaded[run["run_id"]] = load_run(run["path"], run["run_id"])
        try:
            out.append(site_data.comparison(loaded[a["run_id"]], loaded[b["run_id"]], a, b))
        except CompareError as e:
            log.warning("not comparing %s with %s: %s", a["run_id"], b["run_id"], e)
    return out


# --- writing -------------------------------------------------------------------------------------

def data_script(payload) -> bytes:
    """`window.HARNESS = {...};` that no string inside can end early: `</script>` becomes `<\\/script>`."""
    text = json.dumps(payload, ensure_ascii=False, default=str).replace("</", "<\\/")
    return f"window.HARNESS = {text};\n".encode()


def page(title: str, kind: str, data: str, depth: int) -> bytes:
    up = "../" * depth
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{html.escape(title)}</title><link rel="stylesheet" href="{up}assets/view.css"></head>
<body data-page="{kind}" data-root="{up}"><header><a href="{up}index.html">Results</a>
<span class="title">{html.escape(title)}</span></header><main id="main"></main>
<script src="{up}data/{data}"></script><script src="{up}assets/view.js"></script></body></html>
""".encode()


def _summary(run: dict) -> dict:
    primary = next((m for m in run["metrics"] if m["metric"] == run["primary"]), None)
    return {"id": run["run_id"], "page": page_name(run["run_id"]), "model": run["key"].get("model"), "task": run["key"].get("task"),
            "metric": run["primary"], "value": primary and primary["value"], "n": len(run["samples"])}


def write_site(site: dict, folder: Path) -> None:
    """Every page, data script and asset of `site` into the empty `folder`."""
    for sub in ("runs", "compare", "train", "data"):
        (folder / sub).mkdir()
    shutil.copytree(ASSETS, folder / "assets")
    (folder / MARKER).write_text("written by python -m harness.view; replaced whole on the next build\n")
    pairs = {c["a"] + "__" + c["b"]: c for c in site["comparisons"]}
    index = {"leaderboard": site["leaderboard"], "runs": [_summary(r) for r in site["evals"].values()],
             "comparisons": [{"page": page_name(p), "a": c["a"], "b": c["b"], "model_a": c["model_a"],
                              "model_b": c["model_b"], "task": c["task"]} for p, c in pairs.items()],
             "trainings": [{"page": page_name(t["id"]), "id": t["id"], "recipe": t["meta"].get("recipe")}
                           for t in site["trainings"].values()]}
    (folder / "data" / "index.js").write_bytes(data_script(index))
    (folder / "index.html").write_bytes(page("Leaderboard", "index", "index.js", 0))
    for run_id, run in site["evals"].items():
        name = page_name(run_id)
        data = {k: v for k, v in run.items() if k != "records"}
        data["compare_with"] = [{"page": page_name(p), "other": c["b"] if c["a"] == run_id else c["a"]}
                                for p, c in pairs.items() if run_id in (c["a"], c["b"])]
        (folder / "data" / f"run-{name}.js").write_bytes(data_script(data))
        (folder / "runs" / f"{name}.html").write_bytes(page(f"Run {run_id}", "run", f"run-{name}.js", 1))
    for pair, c in pairs.items():
        name = page_name(pair)
        (folder / "data" / f"compare-{name}.js").write_bytes(data_script(c))
        (folder / "compare" / f"{name}.html").write_bytes(page(f"{c['a']} vs {c['b']}", "compare",
                                                               f"compare-{name}.js", 1))
    for train_id, train in site["trainings"].items():
        name = page_name(train_id)
        train = {**train, "lineage": [{**s, "page": page_name(s["id"]) if s["id"] in site["trainings"] else None}
                                      for s in train["lineage"]]}
        (folder / "data" / f"train-{name}.js").write_bytes(data_script(train))
        (folder / "train" / f"{name}.html").write_bytes(page(f"Training {train_id}", "train", f"train-{name}.js", 1))


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before reading any run, an out_dir the swap would destroy: a file, or a folder of
    something else (out_dir=results would take the leaderboard with it)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).is_file())):
        raise ViewError(f"out_dir={out_dir} exists and is not a site written by harness.view; pass another "
                        "out_dir (it would be replaced whole)")


def replace_atomically(site: dict, out_dir: Path) -> Path:
    """Build into a temporary sibling of out_dir, then swap it in; returns out_dir/index.html."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
    try:
        write_site(site, fresh)
        fresh.chmod(0o755)
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(fresh, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return out_dir / "index.html"


def build(leaderboard: str | os.PathLike, runs: list[str] | None, out_dir: str | os.PathLike) -> Path:
    check_out_dir(Path(out_dir))
    folders = find_runs(runs)
    board = Path(leaderboard)
    if not folders and not board.is_file():
        searched = (", ".join(runs) or "runs=[]") if runs is not None else " and ".join(f"{r}/" for r in DEFAULT_RUN_ROOTS)
        raise ViewError(f"nothing to show: no leaderboard at {board} and no run folders in {searched}; run "
                        "`python -m harness task=...` first, or pass leaderboard=<csv> / runs=[<run folders>]")
    return replace_atomically(collect(board, folders), Path(out_dir))


def serve(out_dir: Path, port: int) -> None:
    """Serve the site on 127.0.0.1 only until Ctrl-C."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(out_dir))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as e:
        raise ViewError(f"cannot serve on 127.0.0.1:{port} ({e.strerror or e}); pass another port=") from None
    with server:
        print(f"serving http://127.0.0.1:{server.server_address[1]}/index.html (Ctrl-C ends it)", flush=True)
        server.serve_forever()
