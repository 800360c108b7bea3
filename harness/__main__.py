"""python -m harness task=<name> model=<name|path> [key=value ...]   (-m: a multirun grid)

Bad input (unknown task/model, missing or corrupt files, bad data) prints one `error:` line on
stderr, exits with status 2 and appends nothing to the leaderboard.
"""
import sys

import hydra
from omegaconf import DictConfig

from harness.evaluate import UsageError, rewrite_argv, run_job

_failed = []


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    if not run_job(cfg):
        _failed.append(True)  # in a multirun the other jobs still run


if __name__ == "__main__":
    try:
        sys.argv[1:] = rewrite_argv(sys.argv[1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
    sys.exit(2 if _failed else 0)
