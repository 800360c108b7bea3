"""python -m harness task=<name> model=<name|path> [key=value ...]   (-m: a multirun grid)

Bad input (unknown task/model, missing or corrupt files, bad data) prints one `error:` line on
stderr, exits with status 2 and appends nothing to the leaderboard. In a multirun the other jobs
still run, and the sweep exits 2 when any job failed, whichever launcher ran the jobs.
"""
import os
import sys
import tempfile

import hydra
from omegaconf import DictConfig

from harness.evaluate import rewrite_sys_argv, run_job

# Jobs may run in other processes (hydra/launcher=joblib), so failures are reported through a file
# named in the environment, which worker processes inherit.
FAILURES_ENV = "HARNESS_FAILED_JOBS_FILE"


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    if not run_job(cfg):
        with open(os.environ[FAILURES_ENV], "a") as f:
            f.write("failed\n")


if __name__ == "__main__":
    rewrite_sys_argv()
    fd, failures = tempfile.mkstemp(prefix="harness-failed-jobs-")
    os.close(fd)
    os.environ[FAILURES_ENV] = failures
    try:
        main()
        failed = os.path.getsize(failures) > 0
    finally:
        os.unlink(failures)
    sys.exit(2 if failed else 0)
