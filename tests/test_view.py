"""The results viewer (`python -m harness.view`) in a real browser: headless Chromium, through
playwright, opens the static site from disk and the tests assert on what a person would see.

The site is built once per session from a small real run set made by the real entry points: two
MMLU runs of the same 12 questions (SmolLM2-135M and the random gpt-tiny, so one comparison page
with discordant samples), one instruct run scored by a scripted judge (fake_servers.FakeOllama) and
one short training run. What each page should show is computed here from the files the engine wrote
(records.jsonl, metrics.jsonl, the leaderboard CSV through harness.report.render), never from the
viewer's own data scripts. Selectors follow the DOM contract the viewer keeps stable (see
harness/report/site.py). Every page must stay on file:// (no CDN, no fetch) and log no console error.
Screenshots land under the session's tmp dir; their paths are printed (`pytest -s`)."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from clitools import ENV, run_module
from fake_servers import FakeOllama
from test_judge import chat_body

from harness.records import load_records

# One worker builds the run set and starts the browser once (conftest's loadgroup), not every worker.
pytestmark = pytest.mark.xdist_group("view")
MMLU_SUBSET = ["task=mmlu", "task.subjects=[abstract_algebra]", "task.limit=12"]
MMLU_MODELS = ("smollm2-135m-instruct", "gpt-tiny")     # run in this order: the comparison is a before b
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
INSTALL = "pip install playwright && apt-get install chromium (Debian's package; playwright's own browser download is not needed)"


def judge_reply(n: int) -> str:
    """The scripted judge's n-th reply: a labelled score inside prose (parsed by the fallback rule),
    so the page can only show it by showing the raw reply, not by printing the score."""
    return f"Score: {55 + 7 * n}. Scripted verdict number {n}: the answer drifts off the instruction."


def read_jsonl(path: Path) -> list[dict]:
    """One object per line (split on newlines only: generated text may hold U+2028, which
    str.splitlines would also split on)."""
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


# ----------------------------------------------------------------------------- the site and the browser

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Runs the four real runs into one leaderboard, builds the site from them, and describes what
    the pages should show: run folders, run ids, records, metrics, provenance."""
    root = tmp_path_factory.mktemp("view")
    board, site_dir = root / "leaderboard.csv", root / "site"
    env = dict(ENV, HARNESS_CACHE=str(root / "cache"))     # the judge's reply cache stays in tmp

    def ok(p):
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]

    mmlu = {}
    for model in MMLU_MODELS:
        mmlu[model] = root / model
        ok(run_module("harness", *MMLU_SUBSET, f"model={model}", f"leaderboard={board}",
                      f"hydra.run.dir={mmlu[model]}", env=env))
    judge = FakeOllama(lambda n, req: (200, chat_body(judge_reply(n))))
    judged = root / "judged"
    try:
        ok(run_module("harness", "task=instruct", "model=gpt-tiny", f"judge.host={judge.url}", "judge.model=judge",
                      "task.limit=3", "task.max_new_tokens=8", f"leaderboard={board}", f"hydra.run.dir={judged}",
                      env=env))
    finally:
        judge.kill()
    trained = root / "train"
    ok(run_module("harness.train", "train=pretrain_tiny", "train.max_steps=4", "train.eval_every=2",
                  "train.checkpoint_every=2", f"output_dir={trained}", "progress=false", env=env))
    folders = [*mmlu.values(), judged, trained]
    ok(run_module("harness.view", f"leaderboard={board}", "runs=[" + ",".join(f"'{f}'" for f in folders) + "]",
                  f"out_dir={site_dir}", env=env))

    def run_id(folder: Path) -> str:
        return json.loads((folder / "run.json").read_text())["run_id"]

    return SimpleNamespace(
        dir=site_dir, board=board, mmlu={m: run_id(f) for m, f in mmlu.items()}, judged=run_id(judged),
        leaderboard_rows={f.name: json.loads((f / "metrics.json").read_text()) for f in (*mmlu.values(), judged)},
        records={m: load_records(f / "records.jsonl") for m, f in mmlu.items()},
        judged_records=load_records(judged / "records.jsonl"),
        metrics=read_jsonl(trained / "metrics.jsonl"),
        provenance=json.loads((trained / "provenance.json").read_text()),
        shots=tmp_path_factory.mktemp("screenshots"))


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module: Debian's package, driven by playwright. Missing either
    skips the module with the install line, except under CI, which must run these tests."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    missing = "playwright" if sync_playwright is None else None if os.path.exists(executable) else "chromium"
    if missing:
        message = f"{missing} is not installed: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site, request):
    """A fresh page (own context) per test. Every request it makes is recorded, and any that would
    leave file:// is refused on the spot (no waiting on a network this machine may not have); after
    the test, no such request and no console error or uncaught exception may have happened."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    requests, errors = [], []
    context.route(re.compile(r"^(?!file://)"), lambda route: route.abort())
    tab = context.new_page()
    tab.on("request", lambda r: requests.append(r.url))
    tab.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    tab.set_default_timeout(10_000)
    tab.test_item = request.node          # screenshot() records its path on the test's report
    yield tab
    context.close()
    assert requests, "the page made no request at all"
    assert [u for u in requests if not u.startswith("file://")] == [], "the site must work from disk"
    assert errors == []


def open_page(page, site, path: str):
    page.goto((site.dir / path).as_uri())
    return page


def screenshot(page, site, name: str) -> Path:
    path = site.shots / f"{name}.png"
    page.evaluate("() => window.scrollTo(0, 0)")     # else sticky table headers land mid-page in the shot
    page.screenshot(path=str(path), full_page=True)
    # listed at the end of the test run by conftest.pytest_terminal_summary (xdist passes it along)
    page.test_item.user_properties.append(("screenshot", str(path)))
    return path


def attr_list(page, selector: str, attribute: str) -> list[str]:
    return page.eval_on_selector_all(selector, "(els, a) => els.map(e => e.getAttribute(a))", attribute)


def link_targets(page, site, selector: str) -> list[str]:
    """Where the matched links lead, as paths inside the site ("runs/<id>.html"), however the page
    spells its hrefs (relative to itself or not)."""
    base = site.dir.as_uri() + "/"
    urls = page.eval_on_selector_all(selector, "els => els.map(e => e.href)")
    assert all(u.startswith(base) for u in urls), urls
    return [u[len(base):] for u in urls]


# ----------------------------------------------------------------------------- leaderboard

def leaderboard_table(site):
    """The table the Markdown renderer builds from the same CSV: the site must show the same rows,
    columns and cell texts."""
    from harness.report import render
    return render.build_table(render.prepare(render.load(site.board)))


def test_leaderboard_rows_cells_and_links(page, site):
    from harness.report.render import format_cell
    table = leaderboard_table(site)
    open_page(page, site, "index.html")
    screenshot(page, site, "leaderboard")
    assert attr_list(page, "table#leaderboard tbody tr", "data-model") == table.models == list(MMLU_MODELS)
    columns = attr_list(page, "table#leaderboard thead th[data-column]", "data-column")
    assert columns == ["model", *(c.label for c in table.columns)]
    for (model, label), cell in table.cells.items():
        column = next(c for c in table.columns if c.label == label)
        shown = page.locator(f'table#leaderboard tbody tr[data-model="{model}"] > *').nth(columns.index(label))
        assert shown.get_attribute("data-run") == cell.run_id, (model, label)
        assert format_cell(cell, column, table.interval) in shown.inner_text(), (model, label)
    eval_runs = {*site.mmlu.values(), site.judged}
    linked = attr_list(page, "table#leaderboard td[data-run]", "data-run")
    assert set(linked) == eval_runs
    for run in linked:
        assert attr_list(page, f'table#leaderboard td[data-run="{run}"] a', "href")[0] == f"runs/{run}.html"
    judged_cell = page.locator(f'table#leaderboard td[data-run="{site.judged}"]').first
    assert "judge:" in judged_cell.inner_text()                  # reliability marked as in the Markdown
    notes = page.locator("#notes").inner_text()
    assert all(c.keys[0] in notes for c in table.columns)       # each column's task_version, as in the Markdown

    page.locator(f'table#leaderboard td[data-run="{site.mmlu["gpt-tiny"]}"] a').first.click()
    page.wait_for_url(f"**/runs/{site.mmlu['gpt-tiny']}.html")
    assert "gpt-tiny" in page.locator("#run-meta").inner_text()


def cell_number(text: str) -> float | None:
    """The leading number of a cell ("16.7 ± 11.2" -> 16.7); None for an empty cell ("—")."""
    m = re.match(r"\s*([-+]?\d+(?:\.\d+)?)", text)
    return float(m.group(1)) if m else None


def test_leaderboard_sorts_by_a_clicked_column_and_filters(page, site):
    open_page(page, site, "index.html")
    header = page.locator('table#leaderboard thead th[data-column="mmlu/acc"]')
    position = attr_list(page, "table#leaderboard thead th", "data-column").index("mmlu/acc")

    def column_values() -> list[float]:
        rows = page.locator("table#leaderboard tbody tr")
        return [cell_number(rows.nth(i).locator("td, th").nth(position).inner_text()) for i in range(rows.count())]

    orders = []
    for _ in range(2):
        header.click()
        direction = header.get_attribute("aria-sort")
        assert direction in ("ascending", "descending")
        values = column_values()
        assert values == sorted(values, reverse=direction == "descending"), (direction, values)
        orders.append((direction, attr_list(page, "table#leaderboard tbody tr", "data-model")))
    (first, rows_first), (second, rows_second) = orders
    assert first != second and rows_second == rows_first[::-1] and len(set(rows_first)) == 2
    screenshot(page, site, "leaderboard_sorted")

    page.locator("table#leaderboard thead th[data-column='model']").click()
    models = attr_list(page, "table#leaderboard tbody tr", "data-model")
    assert models == sorted(models, reverse=page.locator("th[data-column='model']").get_attribute("aria-sort") == "descending")

    from playwright.sync_api import expect
    smol = page.locator('table#leaderboard tbody tr[data-model="smollm2-135m-instruct"]')
    tiny = page.locator('table#leaderboard tbody tr[data-model="gpt-tiny"]')
    page.locator("input#leaderboard-filter").fill("SMOLLM")      # case-insensitive
    expect(tiny).to_be_hidden()
    expect(smol).to_be_visible()
    screenshot(page, site, "leaderboard_filtered")
    page.locator("input#leaderboard-filter").fill("")
    expect(tiny).to_be_visible()
    expect(smol).to_be_visible()


def test_index_lists_every_page(page, site):
    open_page(page, site, "index.html")
    runs = link_targets(page, site, "ul#runs li a")
    assert sorted(runs) == sorted(f"runs/{r}.html" for r in {*site.mmlu.values(), site.judged})
    a, b = (site.mmlu[m] for m in MMLU_MODELS)
    assert link_targets(page, site, "ul#comparisons li a") == [f"compare/{a}__{b}.html"]
    assert link_targets(page, site, "ul#trainings li a") == [f"train/{site.provenance['id']}.html"]


# ----------------------------------------------------------------------------- run pages

def shown_ids(page) -> list[str]:
    return attr_list(page, "table#samples tbody tr[data-sample-id]", "data-sample-id")


def expect_count(page, n: int):
    """Waits until the page says n samples match (rendering may be debounced), then checks the rows."""
    from playwright.sync_api import expect
    expect(page.locator("#sample-count")).to_have_attribute("data-count", str(n))
    assert f"{n:,} sample" in page.locator("#sample-count").inner_text()


def show_all(page):
    page.locator("select#page-size").select_option("500")


def assert_metrics_table(page, rows: list[dict]):
    """One row per metric of the run's metrics.json (a task's `<metric>_ci95_low/high` rows are
    that metric's interval, not metrics of their own), each showing its n."""
    from harness.report.render import CI_COMPANIONS
    metrics = [r for r in rows if not r["metric"].endswith(CI_COMPANIONS)]
    names = [t.strip() for t in page.locator("table#metrics tbody tr > :first-child").all_inner_texts()]
    assert sorted(names) == sorted(r["metric"] for r in metrics)
    for r in metrics:
        cells = page.locator("table#metrics tbody tr").nth(names.index(r["metric"])).inner_text()
        assert str(r["n"]) in cells, (r["metric"], cells)


def test_run_page_lists_every_sample_once(page, site):
    records = site.records["smollm2-135m-instruct"]
    open_page(page, site, f"runs/{site.mmlu['smollm2-135m-instruct']}.html")
    screenshot(page, site, "run_mmlu")
    meta = page.locator("#run-meta").inner_text()
    assert "smollm2-135m-instruct" in meta and "mmlu" in meta
    assert_metrics_table(page, site.leaderboard_rows["smollm2-135m-instruct"])
    expect_count(page, len(records))
    show_all(page)
    ids = shown_ids(page)
    assert sorted(ids) == sorted(r.sample_id for r in records) and len(set(ids)) == len(ids)
    assert f"of {len(records)}" in page.locator("#page-info").inner_text()
    for r in records:
        row = page.locator(f'table#samples tbody tr[data-sample-id="{r.sample_id}"]')
        assert row.locator("svg.ll-bars rect").count() == len(r.extra["choices"]), r.sample_id
        assert r.target in row.locator("td.target").inner_text()
        assert r.prediction in row.locator("td.prediction").inner_text()


def test_run_page_filters_and_search(page, site):
    records = site.records["smollm2-135m-instruct"]
    open_page(page, site, f"runs/{site.mmlu['smollm2-135m-instruct']}.html")
    show_all(page)
    for choice, acc in (("incorrect", 0.0), ("correct", 1.0)):
        expected = sorted(r.sample_id for r in records if r.scores["acc"] == acc)
        assert expected, f"the run set has no {choice} sample to check"
        page.locator("select#sample-filter").select_option(choice)
        expect_count(page, len(expected))
        assert sorted(shown_ids(page)) == expected, choice
        screenshot(page, site, f"run_mmlu_{choice}")
    page.locator("select#sample-filter").select_option("all")

    def matching(term: str) -> list[str]:
        return sorted(r.sample_id for r in records
                      if any(term.lower() in str(v).lower()
                             for v in (r.sample_id, r.extra["prompt"], r.prediction, r.target)))

    word = "sqrt"                                                    # a word in some prompts, not all
    for term in (word, records[3].sample_id.split("/")[-1]):     # prompt text; one sample's id
        expected = matching(term)
        assert 0 < len(expected) < len(records), term
        page.locator("input#sample-search").fill(term)
        expect_count(page, len(expected))
        assert sorted(shown_ids(page)) == expected, term
    page.locator("input#sample-search").fill("")
    expect_count(page, len(records))


def test_judged_run_shows_the_raw_judge_reply(page, site):
    records = site.judged_records
    open_page(page, site, f"runs/{site.judged}.html")
    assert_metrics_table(page, site.leaderboard_rows["judged"])
    show_all(page)
    expect_count(page, len(records))
    for r in records:
        reply = r.extra["judge_reply"]
        assert reply.startswith("Score: ")                         # the scripted judge's words, stored raw
        details = page.locator(f'table#samples tbody tr[data-sample-id="{r.sample_id}"] details.judge')
        if details.get_attribute("open") is None:
            details.locator("summary").click()                      # a person opens it to read it
        assert details.get_attribute("open") is not None
        assert reply in details.inner_text(), r.sample_id
    screenshot(page, site, "run_judged")
    # A 0-100 judge score is not right or wrong: those filters are absent or disabled.
    for choice in ("correct", "incorrect"):
        option = page.locator(f'select#sample-filter option[value="{choice}"]')
        assert option.count() == 0 or option.is_disabled()


# ----------------------------------------------------------------------------- comparison and training

def test_comparison_lists_exactly_the_discordant_samples(page, site):
    a, b = (site.mmlu[m] for m in MMLU_MODELS)
    before, after = ({r.sample_id: r for r in site.records[m]} for m in MMLU_MODELS)
    discordant = sorted(i for i in before if before[i].scores["acc"] != after[i].scores["acc"])
    assert discordant, "the two runs agree everywhere: nothing to check"
    open_page(page, site, f"runs/{a}.html")
    assert link_targets(page, site, "#compare-with a") == [f"compare/{a}__{b}.html"]
    page.locator("#compare-with a").first.click()
    page.wait_for_url(f"**/compare/{a}__{b}.html")
    screenshot(page, site, "compare")
    assert "McNemar" in page.locator("pre#compare-report").inner_text()
    ids = attr_list(page, "table#discordant tbody tr[data-sample-id]", "data-sample-id")
    assert sorted(ids) == discordant and len(ids) == len(set(ids))
    for i in discordant:
        text = page.locator(f'table#discordant tbody tr[data-sample-id="{i}"]').inner_text()
        assert before[i].prediction in text and after[i].prediction in text
    assert attr_list(page, "svg#subject-diff rect[data-subject]", "data-subject") == ["abstract_algebra"]


def polyline_points(page, chart: str, series: str) -> int:
    line = page.locator(f'svg#{chart} polyline[data-series="{series}"]')
    assert line.count() == 1, (chart, series)
    return line.evaluate("el => el.points.numberOfItems")


def test_training_page_curves_and_lineage(page, site):
    open_page(page, site, f"train/{site.provenance['id']}.html")
    screenshot(page, site, "train")
    for chart, series in (("loss-chart", "train_loss"), ("loss-chart", "val_loss"), ("lr-chart", "lr")):
        logged = [m["step"] for m in site.metrics if m.get(series) is not None]
        assert logged, series
        assert polyline_points(page, chart, series) == len(logged), series
    lineage = page.locator("ol#lineage li")
    assert lineage.count() == 1 and site.provenance["id"] in lineage.first.inner_text()   # no parent: trained from scratch
    meta = page.locator("#train-meta").inner_text()
    assert site.provenance["recipe"] in meta and site.provenance["data"][0]["sha256"][:12] in meta


def test_every_page_opens_from_disk(page, site):
    """Each page listed on the index opens from file:// with its script-loaded data (the fixture
    checks requests and console errors after the last one)."""
    open_page(page, site, "index.html")
    hrefs = [h for ul in ("runs", "comparisons", "trainings") for h in link_targets(page, site, f"ul#{ul} li a")]
    assert len(hrefs) == 5
    for href in hrefs:
        open_page(page, site, href)
        assert page.evaluate("() => document.readyState") == "complete"
        assert page.locator("table#samples tbody tr, table#discordant tbody tr, svg#loss-chart polyline").count() > 0, href
