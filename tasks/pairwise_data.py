"""What the pairwise task reads besides the model: the questions, the judge prompt, the opponent.

- `mt_bench_questions()`: turn 1 of FastChat's 80 MT-Bench questions, `$HARNESS_DATA/mt_bench/question.jsonl`;
- `pair_prompt(name)`: FastChat's pairwise judge prompt (`pair-v2`: system_prompt + prompt_template with
  {question}, {answer_a}, {answer_b}) from `$HARNESS_DATA/mt_bench/judge_prompts.jsonl`, read at run time;
- `load_opponent(spec, ...)`: the opponent's answers, one per sample id: the reference outputs, or the
  predictions an earlier run left in `<folder>/records.jsonl` (its model named by run.json's key).

Why the opponent is a run folder and never regenerated: the answers being compared are then exactly
the ones that run scored (same checkpoint, prompt, decoding), and a run of any model, even one no
longer loadable here, can be an opponent. A sample the opponent has no answer for, or whose data
differs from ours (another split, another data file), is refused with one line naming the folder:
dropping it would silently compare the two models on different questions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from models.download import data_root
from tasks.base import Record, Sample, TaskError, text_hash

REFERENCE = "reference"
RUN_PREFIX = "run:"
# tasks whose records hold an answer to the same question as ours, by task.data
COMPATIBLE = {"instruct": ("instruct", "pairwise"), "mt_bench": ("mt_bench", "pairwise")}


def data_hash(data: dict) -> str:
    """What a sample is (question and reference), not how it is prompted: stored in every pairwise
    record so a later run can check it compares answers to the same questions."""
    return text_hash(json.dumps({k: data.get(k) for k in ("instruction", "input", "output")}, sort_keys=True))


def question_text(data: dict) -> str:
    """The user question shown to the judge: the instruction, then its input when there is one."""
    return data["instruction"] + (f"\n\n{data['input']}" if data.get("input") else "")


def _jsonl(path: Path, what: str, fix: str) -> list[dict]:
    if not path.is_file():
        raise TaskError(f"{what} not found at {path}; {fix}")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{i}: not a JSON line ({e}); restore the file") from None
    return rows


def mt_bench_questions() -> tuple[list[Sample], str]:
    """(one sample per question, id `q081` as task=mt_bench names them, turn 1 as the instruction;
    a hash of the file, for the task version)."""
    path = data_root() / "mt_bench" / "question.jsonl"
    rows = _jsonl(path, "task.data=mt_bench: the MT-Bench questions",
                  "copy FastChat's data/mt_bench/question.jsonl there (or set HARNESS_DATA)")
    out = []
    for row in rows:
        try:
            qid, turn = int(row["question_id"]), row["turns"][0]
        except (KeyError, IndexError, TypeError, ValueError):
            raise TaskError(f"{path}: question {row.get('question_id')!r} lacks question_id or turns; "
                            "restore the file") from None
        out.append(Sample(f"q{qid:03d}", {"instruction": turn, "input": "", "output": None,
                                          "category": row.get("category", "")}))
    return out, text_hash(path.read_text(encoding="utf-8"))


def pair_prompt(name: str = "pair-v2") -> dict:
    """{"system_prompt", "prompt_template"} of FastChat's judge prompt `name`."""
    path = data_root() / "mt_bench" / "judge_prompts.jsonl"
    rows = _jsonl(path, "the pairwise judge prompts",
                  "copy FastChat's data/judge_prompts.jsonl there (or set HARNESS_DATA)")
    for row in rows:
        if row.get("name") == name:
            if row.get("type") != "pairwise" or "{answer_b}" not in row.get("prompt_template", ""):
                raise TaskError(f"task.judge_prompt={name} is not a single-turn pairwise prompt; use pair-v2")
            return {"system_prompt": row["system_prompt"], "prompt_template": row["prompt_template"]}
    names = [r.get("name") for r in rows if r.get("type") == "pairwise"]
    raise TaskError(f"task.judge_prompt={name} is not in {path}; pick one of {', '.join(map(str, names))}")


@dataclass(frozen=True)
class Opponent:
    name: str                      # the model name battles are recorded under
    answers: dict[str, str]        # sample id -> answer
    source: str                    # "reference" or the run folder
    signature: str                 # name and every answer it holds (not only this limit's): task version


def load_opponent(spec: str, samples: list[Sample], data: str) -> Opponent:
    """`spec` is `reference` (instruct only) or `run:<folder>`; every sample must get an answer."""
    if spec == REFERENCE:
        if data != "instruct":
            raise TaskError("task.opponent=reference needs task.data=instruct (mt_bench turn 1 has no "
                            "reference answers); pass task.opponent=run:<a run folder>")
        answers = {s.id: s.data["output"] for s in samples}
        return Opponent(REFERENCE, answers, REFERENCE, REFERENCE)     # the data signature covers them
    if not isinstance(spec, str) or not spec.startswith(RUN_PREFIX):
        raise TaskError(f"task.opponent={spec!r}: expected reference or run:<run folder>")
    folder = Path(spec[len(RUN_PREFIX):]).expanduser()
    where = f"task.opponent={spec}"
    state, records = _read_run(folder, where)
    key = state.get("key") if isinstance(state, dict) else None
    if not isinstance(key, dict) or not key.get("model"):
        raise TaskError(f"{where}: {folder / 'run.json'} names no model (key.model); pass a run folder "
                        "written by python -m harness")
    task = key.get("task")
    if task not in COMPATIBLE[data]:
        raise TaskError(f"{where}: a {task} run, not one of {', '.join(COMPATIBLE[data])}; "
                        f"pass a run of the same questions (task.data={data})")
    newest: dict[str, Record] = {}
    for r in records:
        if _answer(r) is not None:
            newest[r.sample_id] = r          # the newest record of a sample is the one that counts
    missing = [s.id for s in samples if s.id not in newest]
    if missing:
        raise TaskError(f"{where}: {len(missing)} of {len(samples)} samples have no answer in "
                        f"{folder / 'records.jsonl'} (e.g. {missing[0]}); run the opponent on the same "
                        "task.data, split and limit (or a larger one) first")
    differ = [s.id for s in samples if not _same_data(newest[s.id], s, task)]
    if differ:
        raise TaskError(f"{where}: {len(differ)} of {len(samples)} samples have other data in {folder} "
                        f"(e.g. {differ[0]}); run the opponent on the same data file, split and seed")
    answers = {s.id: _answer(newest[s.id]) for s in samples}
    every = [f"{i}\x00{_answer(r)}" for i, r in sorted(newest.items())]
    return Opponent(str(key["model"]), answers, str(folder.resolve()), text_hash(str(key["model"]), *every))


def _read_run(folder: Path, where: str) -> tuple[dict, list[Record]]:
    from harness.records import load_records

    state_path, records_path = folder / "run.json", folder / "records.jsonl"
    if not folder.is_dir():
        raise TaskError(f"{where}: {folder} is not a folder; pass a run folder written by python -m harness")
    for p in (state_path, records_path):
        if not p.is_file():
            raise TaskError(f"{where}: {folder} has no {p.name}; pass a run folder written by python -m harness")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as e:
        raise TaskError(f"{where}: {state_path} is not readable JSON ({e})") from None
    return state, load_records(records_path)


def _answer(r: Record) -> str | None:
    """The model's answer in a record: the prediction, turn 1 of an MT-Bench run's [turn1, turn2]."""
    p = r.prediction
    if isinstance(p, list):
        p = p[0] if p else None
    return p if isinstance(p, str) else None


def _same_data(r: Record, s: Sample, task: str) -> bool:
    """A pairwise record carries data_hash; an instruct record's target is the reference output. An
    MT-Bench record keys its question by id only, so there the id match is the check."""
    if "data_hash" in r.extra:
        return r.extra["data_hash"] == data_hash(s.data)
    if task == "instruct":
        return r.target == s.data["output"]
    return True
