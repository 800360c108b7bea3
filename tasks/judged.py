"""What the judged tasks (instruct, mt_bench, pairwise) share about their judge.

`JudgeKeys` turns the judge recorded on each record into the leaderboard's comparability keys
(`judge_model`, `judge_digest`), read from the records rather than the config, so a resumed run
reports the judge that actually graded it; records of another judge model in the same run folder
are refused (their scores are not comparable with this judge's). `reliability` is the
unscored rate and self-agreement that become the rows' judge_* columns.
"""
from __future__ import annotations

from harness.judge import agreement
from tasks.base import Record, TaskError


class JudgeKeys:
    def __init__(self, judge):
        self.judge = judge
        self.seen: list[tuple[str, str]] = []    # (model, digest) of the records last checked

    @property
    def model(self) -> str:
        return "+".join(sorted({m for m, _ in self.seen})) or self.judge.model

    @property
    def digest(self) -> str:
        return "+".join(sorted({d for _, d in self.seen}))

    def check(self, records: list[Record]) -> None:
        """Note the judges behind `records`; TaskError when one is not the configured judge model."""
        judges = sorted({(r.extra.get("judge_model", ""), r.extra.get("judge_digest", "")) for r in records})
        other = [m for m, _ in judges if m != self.judge.model]
        if other:
            raise TaskError(f"records here were graded by judge {other[0]!r}, not judge.model="
                            f"{self.judge.model!r}: use a new hydra.run.dir for a different judge")
        self.seen = judges


def reliability(records: list[Record], key: str) -> dict:
    """The judge's unscored rate over `records` and, when a second sampled pass was kept
    (extra[key + "_2"]), the share of samples on which both passes gave the same score."""
    if not records:
        return {}
    out = {"judge_unscored_rate": sum(r.scores.get(key) is None for r in records) / len(records)}
    if any(f"{key}_2" in r.extra for r in records):
        rate, n = agreement([r.scores.get(key) for r in records], [r.extra.get(f"{key}_2") for r in records])
        out["judge_agreement"] = rate if n else None
    return out
