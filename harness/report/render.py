"""The comparable leaderboard: results/leaderboard.csv rendered as models x (task, metric) columns.

    python -m harness.leaderboard [leaderboard=results/leaderboard.csv] [out_dir=results]
        [models=[a,b]] [tasks=[mmlu]] [metrics=[acc]] [select=latest|best] [interval=stderr|ci95]
        [plot=true]

writes `leaderboard.md` (also printed), `leaderboard_table.csv` (one row per cell, every key) and
`leaderboard.png` into out_dir, each atomically. A column is a (task, metric) *and* the
comparability keys (KEYS): rows that differ in any of them never share a column. When a (task,
metric) has several key combinations, each gets its own column whose header names what differs
(`mmlu/acc (5-shot)`, `... [v:ab12]` for a task version); a note under the table lists every
column's full keys. A cell is the latest row for that model and column (`select=best`: the best
one, lower-is-better for perplexity / bits_per_byte / loss), marked † when its row reports
`contamination`. A model's rows are split by checkpoint_sha when one name was used for different
weights. The CLI is harness/leaderboard.py; bad input: one `error:` line, exit 2.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import ListConfig

from harness.cli import UserError
from harness.io import write_atomic
from harness.report.store import RELIABILITY, read_leaderboard
from harness.report.stats import normal_ci

KEYS = ("task_version", "num_fewshot", "dtype", "split", "judge_model", "judge_digest")
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss")
PERCENT = {"acc", "acc_norm", "acc_macro", "precision", "recall", "f1", "exact_match"}
CI_COMPANIONS = ("_ci95_low", "_ci95_high")   # instruct's `score_ci95_low/high` rows: `score`'s interval
INFO = ("parent", "trained_on")
CLEAN = {"", "none", "no", "false", "0", "clean"}   # `contamination` values that flag nothing


class RenderError(UserError):
    """The leaderboard cannot be rendered as asked; printed as one `error:` line, exit 2."""


@dataclass(frozen=True)
class Column:
    task: str
    metric: str
    keys: tuple[str, ...]      # values of KEYS, as strings
    label: str


@dataclass(frozen=True)
class Cell:
    value: float
    stderr: float | None
    low: float | None
    high: float | None
    n: int
    n_unscored: int
    run_id: str
    time: str
    contamination: str = ""
    judge: dict[str, float] = field(default_factory=dict)   # reliability of the judge behind the value

    @property
    def reliability(self) -> str:
        """'judge: unscored 4%, swap-consistent 72%, self-agreement 90%' for judged cells, else ''."""
        names = {"judge_unscored_rate": "unscored", "judge_swap_consistency": "swap-consistent",
                 "judge_agreement": "self-agreement"}
        parts = [f"{names[k]} {100 * v:.0f}%" for k, v in self.judge.items() if v is not None]
        return f"judge: {', '.join(parts)}" if parts else ""

    @property
    def contaminated(self) -> bool:
        """A measured fraction above 0 (or a non-numeric flag); 0.0 means measured and clean."""
        text = self.contamination.strip().lower()
        try:
            return float(text) > 0
        except ValueError:
            return text not in CLEAN


@dataclass
class Table:
    models: list[str]                    # row labels, in order of first appearance
    info: dict[str, dict[str, str]]      # row label -> parent / trained_on
    columns: list[Column]
    cells: dict[tuple[str, str], Cell]   # (row label, column label) -> cell
    select: str
    interval: str


def lower_is_better(metric: str) -> bool:
    return any(s in metric for s in LOWER_IS_BETTER)


def load(path: str | os.PathLike):
    p = Path(path)
    if not p.is_file():
        raise RenderError(f"no leaderboard at {p}: run `python -m harness task=...` first or pass leaderboard=<csv>")
    try:
        df = read_leaderboard(p)
    except Exception as e:   # pandas raises several types for an empty or garbled file
        raise RenderError(f"{p} is not a readable leaderboard CSV ({type(e).__name__}: {e})") from None
    missing = {"time", "model", "checkpoint_sha", "task", "metric", "value", *KEYS} - set(df.columns)
    if missing:
        raise RenderError(f"{p} is not a harness leaderboard (no column {sorted(missing)[0]!r})")
    if df.empty:
        raise RenderError(f"{p} has no rows yet: run `python -m harness task=...` first")
    return df


def _as_list(v) -> list[str] | None:
    if v is None:
        return None
    return [str(x) for x in v] if isinstance(v, (list, tuple, ListConfig)) else [str(v)]


def _keep(df, column: str, wanted: list[str] | None, what: str):
    if wanted is None:
        return df
    known = list(dict.fromkeys(df[column]))
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise RenderError(f"no rows for {what} {unknown[0]!r}; the leaderboard has: {', '.join(known)}")
    return df[df[column].isin(wanted)]


def prepare(df, models=None, tasks=None, metrics=None):
    """Normalised rows: string keys, a `row` label per (model, checkpoint), CI companions folded in."""
    import pandas as pd

    df = df.reset_index(drop=True).copy()
    df["order"] = df.index
    df["num_fewshot"] = [("" if pd.isna(v) else str(int(v))) for v in df["num_fewshot"]]
    for c in (*KEYS, *INFO, "contamination", "run_id", "checkpoint_sha", "time"):
        df[c] = df[c].astype(str) if c in df.columns else ""
    df["stamp"] = pd.to_datetime(df["time"], utc=True, errors="coerce")
    shas = df.groupby("model")["checkpoint_sha"].nunique()
    df["row"] = [m if shas[m] <= 1 else f"{m}@{s[:8]}" for m, s in zip(df["model"], df["checkpoint_sha"])]
    df = _keep(_keep(df, "model", _as_list(models), "model"), "task", _as_list(tasks), "task")
    is_ci = df["metric"].str.endswith(CI_COMPANIONS)
    bounds = {(r.run_id, r.metric): r.value for r in df[is_ci].itertuples()}
    df = df[~is_ci].copy()
    df["ci_low"] = [bounds.get((r, m + "_ci95_low")) for r, m in zip(df["run_id"], df["metric"])]
    df["ci_high"] = [bounds.get((r, m + "_ci95_high")) for r, m in zip(df["run_id"], df["metric"])]
    wanted = _as_list(metrics)
    if wanted is None:
        df = df[~df["metric"].str.contains("/", regex=False)]   # per-subject breakdowns: ask for them by name
    else:
        df = _keep(df, "metric", wanted, "metric")
    if df.empty:
        raise RenderError("no leaderboard rows left after the models/tasks/metrics filters")
    return df


def _short(v: str, others: list[str]) -> str:
    for k in range(4, len(v) + 1):
        if sum(o[:k] == v[:k] for o in others) == 1:
            return v[:k]
    return v


def _label(task: str, metric: str, keys: tuple[str, ...], combos: list[tuple[str, ...]]) -> str:
    k = dict(zip(KEYS, keys))
    varies = {name for i, name in enumerate(KEYS) if len({c[i] for c in combos}) > 1}
    parts = []
    if "num_fewshot" in varies:
        parts.append(f"{k['num_fewshot'] or '?'}-shot")
    if "dtype" in varies:
        parts.append(k["dtype"] or "dtype?")
    if "split" in varies:
        parts.append(f"split:{k['split'] or '?'}")
    if varies & {"judge_model", "judge_digest"}:
        parts.append(f"judge:{k['judge_model'] or '?'}@{k['judge_digest'][:8] or '?'}")
    label = f"{task}/{metric}" + (f" ({', '.join(parts)})" if parts else "")
    others = {c[1:] for c in combos}
    if "task_version" in varies and len(others) < len(set(combos)):   # the other keys don't tell them apart
        label += f" [v:{_short(k['task_version'], sorted({c[0] for c in combos}))}]"
    return label + (" ↓" if lower_is_better(metric) else "")


def columns_of(df) -> list[Column]:
    """One column per (task, metric, keys): tasks sorted, then metrics, then few-shot counts, then
    other key combinations in order of first appearance."""
    first = {}
    for r in df.itertuples():
        first.setdefault((r.task, r.metric, tuple(getattr(r, k) for k in KEYS)), r.order)
    metric_rank = {m: i for i, m in enumerate(dict.fromkeys(df.sort_values("order")["metric"]))}
    combos: dict[tuple[str, str], list] = {}
    for task, metric, keys in first:
        combos.setdefault((task, metric), []).append(keys)
    ordered = sorted(first, key=lambda t: (t[0], metric_rank[t[1]],
                                           int(t[2][1]) if t[2][1].isdigit() else -1, first[t]))
    return [Column(t, m, k, _label(t, m, k, combos[(t, m)])) for t, m, k in ordered]


def _pick(rows, column: Column, select: str):
    rows = rows.sort_values(["stamp", "order"], na_position="first")
    if select == "best":
        scored = rows[rows["value"].notna()]
        if not scored.empty:
            best = scored["value"].min() if lower_is_better(column.metric) else scored["value"].max()
            rows = scored[scored["value"] == best]        # ties: the latest of the best
    return rows.iloc[-1]


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def build_table(df, select: str = "latest", interval: str = "stderr") -> Table:
    if select not in ("latest", "best"):
        raise RenderError(f"select={select!r}: use select=latest or select=best")
    if interval not in ("stderr", "ci95"):
        raise RenderError(f"interval={interval!r}: use interval=stderr or interval=ci95")
    columns = columns_of(df)
    cells = {}
    for col in columns:
        mask = (df["task"] == col.task) & (df["metric"] == col.metric)
        for key, value in zip(KEYS, col.keys):
            mask &= df[key] == value
        for row_label, rows in df[mask].groupby("row", sort=False):
            r = _pick(rows, col, select)
            value, stderr = float(r["value"]), _num(r.get("stderr"))
            low, high = _num(r["ci_low"]), _num(r["ci_high"])
            if (low is None or high is None) and stderr is not None:
                low, high = normal_ci(value, stderr)
            n, unscored = _num(r.get("n")), _num(r.get("n_unscored"))
            judge = {k: _num(r[k]) for k in RELIABILITY if k in r.index and _num(r[k]) is not None}
            cells[(row_label, col.label)] = Cell(value, stderr, low, high, int(n or 0), int(unscored or 0),
                                                 r["run_id"], r["time"], r["contamination"], judge)
    rows_in_order = list(dict.fromkeys(df.sort_values("order")["row"]))
    info = {}
    for row_label in rows_in_order:
        mine = df[df["row"] == row_label].sort_values(["stamp", "order"], na_position="first")
        info[row_label] = {k: next((v for v in reversed(list(mine[k])) if v), "") for k in INFO}
    return Table(rows_in_order, info, columns, cells, select, interval)


def _fmt(x: float, percent: bool) -> str:
    if percent:
        return f"{100 * x:.1f}"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.4g}"


def format_cell(cell: Cell | None, column: Column, interval: str) -> str:
    if cell is None:
        return "—"
    pct = column.metric.split("/")[0] in PERCENT
    text = _fmt(cell.value, pct)
    if interval == "stderr" and cell.stderr is not None:
        text += f" ± {_fmt(cell.stderr, pct)}"
    elif interval == "ci95" and cell.low is not None:
        text += f" [{_fmt(cell.low, pct)}, {_fmt(cell.high, pct)}]"
    if cell.n_unscored > 0:
        text += f" (n={cell.n}, {cell.n_unscored} unscored)"
    if cell.reliability:
        text += f" ⟨{cell.reliability}⟩"
    if cell.contaminated:
        text += " †"
    return text


def markdown_row(cells: list[str]) -> str:
    """One Markdown table row; a `|` inside a cell is escaped so it cannot split the cell."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def to_markdown(table: Table) -> str:
    info = [k for k in INFO if any(table.info[m][k] for m in table.models)]
    header = ["model", *info, *(c.label for c in table.columns)]
    lines = [markdown_row(header), "|" + "|".join(["---"] * (1 + len(info)) + ["---:"] * len(table.columns)) + "|"]
    for m in table.models:
        lines.append(markdown_row([m, *(table.info[m][k] or "—" for k in info),
                              *(format_cell(table.cells.get((m, c.label)), c, table.interval)
                                for c in table.columns)]))
    how = "the latest row" if table.select == "latest" else "the best row (↓: lower is better)"
    spread = "± stderr" if table.interval == "stderr" else "[95% CI]"
    lines += ["", f"Each cell: {how} for that model and column, value {spread}; accuracy-like metrics "
              f"({', '.join(sorted(PERCENT))}) in %; n and unscored shown when samples went unscored; "
              "⟨judge: ...⟩ on judged cells: the share of samples the judge left unscored, how often its "
              "pairwise verdict survived swapping the answers' order, and how often a sampled second "
              "pass agreed with the first.",
              "", "Columns (rows share a column only when all of these agree):"]
    for c in table.columns:
        keys = ", ".join(f"{k}={v or '—'}" for k, v in zip(KEYS, c.keys))
        lines.append(f"- `{c.label}`: task={c.task}, metric={c.metric}, {keys}")
    task_of = {c.label: c.task for c in table.columns}
    flagged = {(m, task_of[label]): cell.contamination for (m, label), cell in table.cells.items()
               if cell.contaminated}
    if flagged:
        lines += ["", "† the model may have seen this test data in training: the fraction of the task's "
                  "samples that share an n-gram with its training data (`contamination`):"]
        lines += [f"- {m} on {task}: {_fraction(why)}" for (m, task), why in flagged.items()]
    return "\n".join(lines) + "\n"


def _fraction(value: str) -> str:
    try:
        return f"{float(value):.1%}"
    except ValueError:
        return value


def to_records(table: Table) -> list[dict]:
    """The table's cells, one tidy row each, with every comparability key."""
    out = []
    for m in table.models:
        for c in table.columns:
            cell = table.cells.get((m, c.label))
            if cell is not None:
                out.append(dict(model=m, **table.info[m], column=c.label, task=c.task, metric=c.metric,
                                **dict(zip(KEYS, c.keys)), value=cell.value, stderr=cell.stderr,
                                ci95_low=cell.low, ci95_high=cell.high, n=cell.n,
                                n_unscored=cell.n_unscored, contamination=cell.contamination,
                                **{k: cell.judge.get(k) for k in RELIABILITY},
                                run_id=cell.run_id, time=cell.time))
    return out


def plot_png(table: Table) -> bytes:
    """A bar chart per column (models side by side, error bars = the chosen interval)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = table.columns
    ncols = min(3, len(cols))
    nrows = math.ceil(len(cols) / ncols)
    height = 1.2 + 0.35 * len(table.models)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, height * nrows), squeeze=False)
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(table.models))]
    for ax, c in zip(axes.flat, cols):   # every model keeps its slot and colour; a missing cell is a gap
        ys = [i for i, m in enumerate(table.models) if (m, c.label) in table.cells]
        cells = [table.cells[(table.models[i], c.label)] for i in ys]
        values = [x.value for x in cells]
        if table.interval == "stderr":
            err = [[x.stderr or 0 for x in cells]] * 2
        else:
            err = [[x.value - x.low if x.low is not None else 0 for x in cells],
                   [x.high - x.value if x.high is not None else 0 for x in cells]]
        has_err = any(e for side in err for e in side)
        ax.barh(ys, values, xerr=err if has_err else None, color=[colors[i] for i in ys], capsize=3)
        ax.set_yticks(range(len(table.models)), table.models, fontsize=8)
        ax.set_ylim(len(table.models) - 0.5, -0.5)
        ax.set_title(c.label, fontsize=9)
        finite = [v for v in values if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
            ax.set_xscale("log")
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def render(leaderboard, out_dir, models=None, tasks=None, metrics=None, select="latest",
           interval="stderr", plot=True) -> tuple[str, list[Path]]:
    """Render every output; nothing is written unless all of them could be built."""
    import pandas as pd

    table = build_table(prepare(load(leaderboard), models, tasks, metrics), select, interval)
    markdown = to_markdown(table)
    outputs = {"leaderboard.md": markdown.encode(),
               "leaderboard_table.csv": pd.DataFrame(to_records(table)).to_csv(index=False).encode()}
    if plot:
        outputs["leaderboard.png"] = plot_png(table)
    out = Path(out_dir)
    for name, data in outputs.items():
        write_atomic(out / name, data)
    return markdown, [out / n for n in outputs]
