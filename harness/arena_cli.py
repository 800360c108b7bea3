"""python -m harness.arena runs='<glob or comma list of run folders>' [anchor=<model>] [rounds=1000]
[seed=0] [out_dir=arena]: Bradley-Terry ratings from the battles of task=pairwise runs.

Every pairwise record holds `extra.battle` {model_a, model_b, winner}; this collects them from each
run folder's records.jsonl (the newest record of a sample counts, as in the engine; unscored samples
have no battle and are left out, counted), fits harness.arena.arena() and prints the table (model,
rating, 95% interval, battles) with the never-compared pairs and unrated models, then writes
arena.md, arena.csv and arena.png into out_dir (harness/arena_report.py).

`runs` takes a glob (`outputs/pairwise/*/*`), a comma list (quote it for Hydra: runs="'a,b'") or a
list (runs=[a,b]). Folders of other tasks are skipped with a note on stderr, so a glob over all of
outputs/ works; finding no battle at all is one `error:` line and exit status 2. A model that
battled itself (a model compared with its own earlier run) says nothing about ratings: those
battles are skipped with a note.
"""
from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig, ListConfig

from harness.cli import UserError, float_option, int_option, run_cli

USAGE = "python -m harness.arena runs='<glob or comma list of run folders>' [anchor=<model>] [out_dir=arena]"


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def run_folders(runs, resolve=lambda p: p) -> list[Path]:
    """The folders `runs` names: globs expanded, a records.jsonl or run.json taken as its folder."""
    if runs is None or runs == "":
        raise UserError(f"runs is empty; {USAGE}")
    items = list(runs) if isinstance(runs, (list, tuple, ListConfig)) else str(runs).split(",")
    folders: list[Path] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        matches = sorted(glob.glob(resolve(item))) if glob.has_magic(item) else [resolve(item)]
        matches = [m for m in matches if Path(m).exists()]
        if not matches:
            raise UserError(f"runs: {item} matches no folder; pass run folders written by python -m harness")
        for m in map(Path, matches):
            folder = m.parent if m.is_file() and m.name in ("records.jsonl", "run.json") else m
            if folder not in folders:
                folders.append(folder)
    return folders


def collect_battles(folders: list[Path]) -> tuple[pd.DataFrame, dict]:
    """(battles as model_a, model_b, winner, run; counts) from the pairwise runs among `folders`."""
    from harness.records import load_records

    rows, counts = [], {"runs": 0, "unscored": 0, "self": 0}
    for folder in folders:
        if not folder.is_dir() or not (folder / "run.json").is_file():
            _note(f"skipped {folder}: no run.json (not a run folder)")
            continue
        try:
            task = json.loads((folder / "run.json").read_text()).get("key", {}).get("task")
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"{folder / 'run.json'}: not a harness run.json ({e})") from None
        if task != "pairwise":
            _note(f"skipped {folder}: a {task} run, not pairwise")
            continue
        newest = {r.sample_id: r for r in load_records(folder / "records.jsonl")}
        counts["runs"] += 1
        for r in newest.values():
            b = r.extra.get("battle")
            if not b:
                counts["unscored"] += 1
            elif b.get("model_a") == b.get("model_b"):
                counts["self"] += 1
            else:
                rows.append({"model_a": b.get("model_a"), "model_b": b.get("model_b"),
                             "winner": b.get("winner"), "run": str(folder)})
    if counts["self"]:
        _note(f"skipped {counts['self']} battles of a model against itself")
    if counts["unscored"]:
        _note(f"{counts['unscored']} unscored samples have no battle")
    if not rows:
        found = f"{counts['runs']} pairwise run folder(s) but no battle in them" if counts["runs"] else \
            "no pairwise run folder"
        raise UserError(f"runs: {found} among {len(folders)} folder(s); run python -m harness task=pairwise first")
    counts["battles"] = len(rows)
    return pd.DataFrame(rows, columns=["model_a", "model_b", "winner", "run"]), counts


@hydra.main(version_base="1.3", config_path="../conf", config_name="arena")
def main(cfg: DictConfig) -> None:
    from hydra.utils import to_absolute_path

    from harness import arena_report
    from harness.arena import arena

    def job() -> None:
        rounds = int_option(cfg.rounds, "rounds", minimum=1)
        seed = int_option(cfg.seed, "seed")
        rating = float_option(cfg.anchor_rating, "anchor_rating")
        anchor = None if cfg.anchor is None else str(cfg.anchor)
        battles, counts = collect_battles(run_folders(cfg.runs, to_absolute_path))
        result = arena(battles, anchor=anchor, anchor_rating=rating, rounds=rounds, seed=seed)
        out_dir = Path(to_absolute_path(str(cfg.out_dir)))
        files = arena_report.write_all(result, out_dir, anchor, counts)
        print(arena_report.text_table(result), end="")
        for line in arena_report.notes(result, anchor, counts):
            print(line)
        print("wrote " + ", ".join(str(f) for f in files))

    run_cli(job)
