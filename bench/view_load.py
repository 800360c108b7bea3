"""Page load of the results viewer on a full MMLU run (14,042 samples) in headless Chromium.

    python bench/view_load.py [--run DIR] [--leaderboard CSV] [--repeats 5] [--work DIR] [--out JSON]

Without --run it first makes a real full-MMLU run with the random tiny model (`python -m harness
task=mmlu model=gpt-tiny`, all 57 subjects: 40-80 s on 2 cores, the model is tiny, the prompts
are not), in --work (default: <tmp>/harness_view_load; a run already there is reused). --run DIR
takes an existing eval run folder instead (e.g. one `make run` wrote under outputs/). Then
`python -m harness.view` builds the site from that one run and Chromium (Debian's `chromium`,
driven by playwright) opens its run page from disk, --repeats times, each in a fresh browser
context (no cache), and measures in the page (performance.now(), which counts from the start of
the navigation):

  load          navigation start -> the first page of sample rows is in the DOM and a frame has
                been rendered with them (a MutationObserver installed before any page script)
  scroll        scrollTo(bottom of the page) -> the next rendered frame
  filter        choosing `incorrect` -> #sample-count says the number of records with acc == 0
                (counted here from records.jsonl) and rows are shown
  next page     clicking #next-page -> #page-info changed and rows are shown

The issue's target: the 14k-sample page loads and scrolls in under 2 s (load + scroll, the median
of the per-load sums); each step is also shown against 2 s. Prints a table, the site's path, and
writes every measurement to --out (default bench/results/view_load.json). This is a benchmark,
not a timed test: the figure depends on the machine (its load average is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_summary  # bench/ is the script's folder, first on sys.path

from harness.records import load_records

TARGET_MS = 2000
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

# Installed before the page's own scripts: the time of the first rendered frame holding sample rows.
FIRST_ROWS_OBSERVER = """
window.__firstRowsMs = null;
new MutationObserver((changes, observer) => {
  if (document.querySelector('table#samples tbody tr[data-sample-id]')) {
    observer.disconnect();
    requestAnimationFrame(() => { window.__firstRowsMs = performance.now(); });
  }
}).observe(document, {childList: true, subtree: true});
"""

# In-page timings of one interaction each: start the clock, act, wait (frame by frame) until done.
STEPS_JS = """
async ([expectedIncorrect]) => {
  const frame = () => new Promise(r => requestAnimationFrame(() => r()));
  const rows = () => document.querySelectorAll('table#samples tbody tr[data-sample-id]').length;
  const until = async (done, what) => {
    const limit = performance.now() + 30000;
    while (!done()) { if (performance.now() > limit) throw new Error('timed out: ' + what); await frame(); }
    await frame();
  };
  const out = {};
  let t = performance.now();
  window.scrollTo(0, document.documentElement.scrollHeight);
  await frame(); await frame();
  out.scroll = performance.now() - t;
  window.scrollTo(0, 0);
  const filter = document.querySelector('select#sample-filter');
  t = performance.now();
  filter.value = 'incorrect';
  filter.dispatchEvent(new Event('input', {bubbles: true}));
  filter.dispatchEvent(new Event('change', {bubbles: true}));
  const count = document.querySelector('#sample-count');
  await until(() => count.getAttribute('data-count') === String(expectedIncorrect) && rows() > 0, 'filter');
  out.filter = performance.now() - t;
  const info = document.querySelector('#page-info');
  const before = info.textContent;
  t = performance.now();
  document.querySelector('button#next-page').click();
  await until(() => info.textContent !== before && rows() > 0, 'next page');
  out.next_page = performance.now() - t;
  out.rows_per_page = rows();
  out.page_size = Number(document.querySelector('select#page-size').value);
  out.page_info = info.textContent;
  return out;
}
"""


def python_module(*args: str, cwd: Path = ROOT) -> None:
    """`python -m ...` in a subprocess (the repo on PYTHONPATH, one OpenMP thread); stops on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", *args], check=False, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"python -m {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    print(f"python -m {args[0]} ... took {time.perf_counter() - started:.1f} s", flush=True)


def full_mmlu_run(work: Path) -> tuple[Path, Path]:
    """A finished full-MMLU gpt-tiny run in work/run (made unless one is there) and its leaderboard."""
    run, board = work / "run", work / "leaderboard.csv"
    if (run / "run.json").is_file() and (run / "records.jsonl").is_file():
        print(f"reusing the run in {run}", flush=True)
    else:
        print(f"full MMLU with gpt-tiny into {run} (a minute or so on 2 cores) ...", flush=True)
        python_module("harness", "task=mmlu", "model=gpt-tiny", f"hydra.run.dir={run}", f"leaderboard={board}")
    return run, board


def launch_chromium(playwright):
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(executable):
        sys.exit("chromium is not installed: apt-get install chromium")
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)


def measure(browser, url: str, expected_incorrect: int) -> dict:
    """One fresh context (no cache, no state), one load of the run page, then the interactions."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.add_init_script(FIRST_ROWS_OBSERVER)
        page.goto(url, wait_until="commit", timeout=60_000)
        page.wait_for_function("() => window.__firstRowsMs !== null", timeout=60_000, polling=50)
        timings = {"load": page.evaluate("() => window.__firstRowsMs")}
        timings.update(page.evaluate(STEPS_JS, [expected_incorrect]))
    finally:
        context.close()
    if errors:
        sys.exit(f"the page logged errors: {errors[:3]}")
    if timings["rows_per_page"] > timings["page_size"]:
        sys.exit(f"{timings['rows_per_page']} rows rendered for a page of {timings['page_size']}")
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="an existing eval run folder (default: make a full-MMLU gpt-tiny run)")
    ap.add_argument("--leaderboard", type=Path, help="the leaderboard CSV for the site (default: the made run's, "
                    "or results/leaderboard.csv with --run)")
    ap.add_argument("--repeats", type=int, default=5, help="fresh page loads (medians)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "harness_view_load",
                    help="where the made run and the site go")
    ap.add_argument("--out", default=str(ROOT / "bench/results/view_load.json"))
    args = ap.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("playwright is not installed: pip install playwright (Chromium: apt-get install chromium)")

    args.work.mkdir(parents=True, exist_ok=True)
    if args.run:
        run, board = args.run.resolve(), (args.leaderboard or ROOT / "results/leaderboard.csv").resolve()
    else:
        run, board = full_mmlu_run(args.work.resolve())
        board = args.leaderboard.resolve() if args.leaderboard else board
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    records = load_records(run / "records.jsonl")
    incorrect = sum(1 for r in records if r.scores.get("acc") == 0)
    site = args.work.resolve() / "site"
    python_module("harness.view", f"leaderboard={board}", f"runs=['{run}']", f"out_dir={site}")
    page = site / "runs" / f"{run_id}.html"
    data_mb = sum(f.stat().st_size for f in (site / "data").rglob("*") if f.is_file()) / 2**20
    print(f"{len(records):,} samples ({incorrect:,} incorrect), data scripts {data_mb:.1f} MiB; "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)

    with sync_playwright() as p:
        browser = launch_chromium(p)
        measure(browser, page.as_uri(), incorrect)                      # untimed warm-up: the browser's first page
        runs = [measure(browser, page.as_uri(), incorrect) for _ in range(args.repeats)]
        version = browser.version
        browser.close()

    steps = ("load", "scroll", "filter", "next_page")
    medians = {s: statistics.median(r[s] for r in runs) for s in steps}
    load_and_scroll = statistics.median(r["load"] + r["scroll"] for r in runs)
    print(f"\nrun page of {len(records):,} samples, median of {args.repeats} fresh loads (Chromium {version}):")
    print(f"{'step':<22}{'median ms':>10}{'target ms':>11}  verdict")
    for s in steps:
        print(f"{s:<22}{medians[s]:>10.0f}{TARGET_MS:>11}  {'PASS' if medians[s] < TARGET_MS else 'MISS'}")
    verdict = "PASS" if load_and_scroll < TARGET_MS else "MISS"
    print(f"{'load + scroll (issue)':<22}{load_and_scroll:>10.0f}{TARGET_MS:>11}  {verdict}")
    print(f"rows rendered: {runs[0]['rows_per_page']} of page size {runs[0]['page_size']} "
          f"(after next page: {runs[0]['page_info']})")
    print(f"site: {site / 'index.html'}\nrun page: {page}")
    summary = {"samples": len(records), "incorrect": incorrect, "run": str(run), "site": str(site),
               "data_scripts_mib": round(data_mb, 2), "repeats": args.repeats, "target_ms": TARGET_MS,
               "median_ms": {**medians, "load_and_scroll": load_and_scroll}, "verdict": verdict, "runs": runs,
               "machine": {"chromium": version, "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                           "processor": platform.processor() or platform.machine()}}
    print(f"wrote {write_summary(args.out, summary)}")


if __name__ == "__main__":
    main()
