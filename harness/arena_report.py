"""The arena's outputs from an ArenaResult: the printed table, arena.md, arena.csv and arena.png.

Kept apart from the fit (harness/arena.py, pure statistics) and the CLI (harness/arena_cli.py, reading
run folders) so each can be used alone. Everything is rendered in memory first and then written, so
a failure (matplotlib, a folder in the way) leaves no partial set of files.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from harness.arena import ArenaResult


def _num(x: float) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.1f}"


def rows(result: ArenaResult) -> list[dict]:
    """One dict per model, highest rating first, unrated models last (rating NaN)."""
    t = result.table
    return [dict(model=m, rating=float(r.rating), lower=float(r.lower), upper=float(r.upper),
                 battles=int(r.battles), score=float(r.score)) for m, r in t.iterrows()]


def notes(result: ArenaResult, anchor: str | None, sources: dict) -> list[str]:
    """The lines under the table: what the numbers are, and what could not be rated."""
    out = [f"{sources['battles']} battles from {sources['runs']} pairwise run folder(s); Bradley-Terry on the "
           f"Elo scale, {'anchor ' + anchor if anchor else 'mean'} pinned; 95% interval from "
           f"{result.rounds} bootstrap resamples"
           + (f" ({result.dropped_rounds} dropped: no finite fit)" if result.dropped_rounds else "")]
    if result.unrated:
        out.append(f"unrated (no chain of battles to the anchor): {', '.join(result.unrated)}")
    if result.never_compared:
        out.append("never compared: " + ", ".join(f"{a} vs {b}" for a, b in result.never_compared))
    return out


def text_table(result: ArenaResult) -> str:
    """The table as fixed-width text for the terminal."""
    data = [(r["model"], _num(r["rating"]), f"[{_num(r['lower'])}, {_num(r['upper'])}]", str(r["battles"]))
            for r in rows(result)]
    head = ("model", "rating", "95% interval", "battles")
    widths = [max(len(x) for x in col) for col in zip(head, *data)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [head, *data]) + "\n"


def markdown(result: ArenaResult, anchor: str | None, sources: dict) -> str:
    lines = ["# Arena", "", "| model | rating | 95% interval | battles |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {_num(r['rating'])} | [{_num(r['lower'])}, {_num(r['upper'])}] | {r['battles']} |"
              for r in rows(result)]
    return "\n".join([*lines, "", *(f"- {n}" for n in notes(result, anchor, sources))]) + "\n"


def csv_text(result: ArenaResult) -> str:
    return result.table.reset_index().to_csv(index=False, float_format="%.4f")


def png(result: ArenaResult) -> bytes:
    """Rated models as points with their 95% interval bars, highest at the top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rated = [r for r in rows(result) if math.isfinite(r["rating"])]
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.4 * len(rated)))
    ys = list(range(len(rated)))
    ratings = [r["rating"] for r in rated]
    err = [[max(0.0, r["rating"] - r["lower"]) for r in rated], [max(0.0, r["upper"] - r["rating"]) for r in rated]]
    ax.errorbar(ratings, ys, xerr=err, fmt="o", capsize=4)
    ax.set_yticks(ys, [f"{r['model']} ({r['battles']})" for r in rated], fontsize=8)
    ax.set_ylim(len(rated) - 0.5, -0.5)
    ax.set_xlabel("rating (Elo scale), 95% bootstrap interval")
    ax.set_title("arena", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_all(result: ArenaResult, out_dir: Path, anchor: str | None, sources: dict) -> list[Path]:
    """arena.md, arena.csv and arena.png in `out_dir`; all rendered before any is written."""
    from harness.io import write_atomic

    files = {"arena.md": markdown(result, anchor, sources).encode(), "arena.csv": csv_text(result).encode(),
             "arena.png": png(result)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_atomic(out_dir / name, data)
    return [out_dir / n for n in files]
