"""lm-eval's few-shot samplers (lm_eval/api/samplers.py), shared by the generative tasks
(tasks/generative.py) and the suite's multiple-choice tasks (tasks/suite/task.py): the same shots
in the same order as lm-eval is what makes few-shot scores comparable with its numbers."""
from __future__ import annotations

import random

from tasks.base import TaskError

SAMPLERS = ("first_n", "random")


def sample_shots(pool: list[dict], n: int, eval_doc: dict | None, sampler: str,
                 rng: random.Random) -> list[dict]:
    """lm-eval's samplers (api/samplers.py). `eval_doc` is the document being asked when the shots
    come from its own file (it is never its own shot), else None. random: `rng` is shared by all
    documents in order, and the n + 1 draw that leaves room to drop eval_doc is lm-eval's."""
    if sampler == "first_n":
        own = [x for x in pool if x != eval_doc] if eval_doc is not None else pool
        if n > len(own):
            raise TaskError(f"num_fewshot={n} but only {len(own)} few-shot rows")
        return own[:n]
    if n > len(pool) - (eval_doc is not None):   # random.sample would raise a bare ValueError
        raise TaskError(f"num_fewshot={n} but only {len(pool)} few-shot rows")
    if eval_doc is None:
        return rng.sample(pool, n)
    shots = [x for x in rng.sample(pool, n + 1) if x != eval_doc][:n]
    if len(shots) < n:   # eval_doc repeated in the pool: lm-eval draws again without any copy of it
        shots = rng.sample([x for x in pool if x != eval_doc], n)
    return shots
