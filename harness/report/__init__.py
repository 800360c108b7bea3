"""Reporting: everything that reads what the engine wrote (records, leaderboard rows) and never
writes back into a run.

- store.py:   the append-only leaderboard CSV (one row per run and metric, locked appends)
- render.py:  the leaderboard as Markdown/CSV/PNG tables with intervals and comparability notes
- compare.py: two runs of the same samples, paired (McNemar, bootstrap)
- stats.py:   the intervals and tests the three above use

Data flows one way: the engine appends rows through store.py; render and compare only read. The
command lines are `python -m harness.leaderboard` and `python -m harness.compare`.
"""
