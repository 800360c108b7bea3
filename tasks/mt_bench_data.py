"""MT-Bench's staged files, its judge prompts and its rating parser (used by tasks/mt_bench.py).

The files are FastChat's, staged under `$HARNESS_DATA/mt_bench/` and read at run time (never
copied into this code): `question.jsonl` (80 two-turn questions, each with a `category`),
`reference_answer/gpt-4.jsonl` (GPT-4's answers, used as references for the categories in
NEED_REF, as FastChat does) and `judge_prompts.jsonl` (the judge prompts, by name).

Which judge prompt a judgement gets follows FastChat's single-answer grading: turn 1 ->
`single-v1`, or `single-math-v1` with the reference for math/reasoning/coding; turn 2 -> the
`-multi-turn` variant of the same, which shows the judge the whole two-turn conversation (and the
two-turn reference) and asks it to rate the second answer.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from models.download import data_root, sha256_file
from tasks.base import TaskError

QUESTIONS = "mt_bench/question.jsonl"
REFERENCES = "mt_bench/reference_answer/gpt-4.jsonl"
JUDGE_PROMPTS = "mt_bench/judge_prompts.jsonl"
NEED_REF = ("math", "reasoning", "coding")       # FastChat's NEED_REF_CATS (judged against a reference)
LOW, HIGH = 1.0, 10.0                            # the rating scale


def staged(rel: str) -> Path:
    """A staged MT-Bench file, or a TaskError naming where it should be."""
    path = data_root() / rel
    if not path.is_file():
        raise TaskError(f"MT-Bench file {path} not found: stage FastChat's mt_bench data under "
                        f"{data_root() / 'mt_bench'} (or set HARNESS_DATA to the folder holding mt_bench/)")
    return path


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise TaskError(f"{path} line {n} is not JSON ({e}); restage the MT-Bench files") from None
    return rows


@dataclass(frozen=True)
class MTBenchData:
    questions: list[dict]                # {question_id, category, turns: [q1, q2]}, file order
    references: dict[int, list[str]]     # question_id -> the reference's two turns
    prompts: dict[str, dict]             # judge prompt name -> {system_prompt, prompt_template, ...}
    signature: str                       # sha256 prefixes of the question and reference files


def load(need: tuple[str, ...] = NEED_REF) -> MTBenchData:
    questions_path, refs_path, prompts_path = staged(QUESTIONS), staged(REFERENCES), staged(JUDGE_PROMPTS)
    questions = _jsonl(questions_path)
    for q in questions:
        if not (isinstance(q.get("question_id"), int) and isinstance(q.get("turns"), list)
                and len(q["turns"]) == 2 and q.get("category")):
            raise TaskError(f"{questions_path}: question {q.get('question_id')!r} lacks question_id, category "
                            "or two turns; restage the MT-Bench files")
    references = {r["question_id"]: r["choices"][0]["turns"] for r in _jsonl(refs_path)}
    missing = [q["question_id"] for q in questions if q["category"] in need and q["question_id"] not in references]
    if missing:
        raise TaskError(f"{refs_path} has no reference for questions {missing[:5]} (categories "
                        f"{', '.join(need)} are judged against one); restage the MT-Bench files")
    prompts = {p["name"]: p for p in _jsonl(prompts_path)}
    absent = [n for n in PROMPT_NAMES if n not in prompts]
    if absent:
        raise TaskError(f"{prompts_path} lacks the judge prompts {', '.join(absent)}; restage the MT-Bench files")
    signature = f"{sha256_file(questions_path)[:16]}:{sha256_file(refs_path)[:16]}"
    return MTBenchData(questions, references, prompts, signature)


PROMPT_NAMES = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")


def prompt_name(category: str, turn: int) -> str:
    """FastChat's choice: the math prompt (with reference) for NEED_REF, multi-turn for turn 2."""
    base = "single-math-v1" if category in NEED_REF else "single-v1"
    return base + ("-multi-turn" if turn == 2 else "")


def judge_messages(judge, prompt: dict, turns: list[str], answers: list[str],
                   reference: list[str] | None, turn: int) -> list[dict]:
    """The judge's chat for one turn: FastChat's system prompt and template, the model's answers
    fenced (`judge.fence`) and the system prompt extended (`judge.system`) when hardening is on.
    Questions and references are ours, so they are never fenced."""
    ref = reference or ["", ""]
    if turn == 1:
        fields = {"question": turns[0], "answer": judge.fence(answers[0]), "ref_answer_1": ref[0]}
    else:
        fields = {"question_1": turns[0], "question_2": turns[1], "answer_1": judge.fence(answers[0]),
                  "answer_2": judge.fence(answers[1]), "ref_answer_1": ref[0], "ref_answer_2": ref[1]}
    return [{"role": "system", "content": judge.system(prompt["system_prompt"])},
            {"role": "user", "content": prompt["prompt_template"].format(**fields)}]


_NUM = r"(\d+(?:\.\d*)?)"              # FastChat accepts "7." too
_STRICT, _BACKUP = re.compile(rf"\[\[\s*{_NUM}\s*\]\]"), re.compile(rf"\[\s*{_NUM}\s*\]")


def parse_rating(reply: str) -> tuple[float | None, str | None]:
    """(rating, None) or (None, why). FastChat's order: `[[n]]`, else its backup `[n]`; the last
    one wins (the verdict follows the explanation, which may quote the format's example). A
    rating off the 1-10 scale is unscored, never clipped."""
    if not reply.strip():
        return None, "empty reply"
    found = _STRICT.findall(reply) or _BACKUP.findall(reply)
    if not found:
        return None, "no [[rating]] in reply"
    value = float(found[-1])
    if not LOW <= value <= HIGH:
        return None, f"rating {found[-1]} out of range 1-10"
    return value, None
