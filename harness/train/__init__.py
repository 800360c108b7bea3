"""Training: `python -m harness.train train=<recipe>`; every recipe runs through `loop.train`.

Recipes live in harness/train/<name>.py with a `run(cfg) -> dict` function; a config in
conf/train/ selects one with `recipe: <name>` (or a dotted path to any module with `run`).
"""
