"""python -m harness.compare a=<run folder> b=<run folder> [metric=auto] [n_resamples=10000] [seed=0] [out=<file.json>]

The command line of the paired comparison; what it computes is harness/report/compare.py.
Bad input: one `error:` line, exit 2.
"""
import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from harness.cli import exit_after, int_option, run_cli
from harness.report.compare import CompareError, compare, format_report, load_run


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
def _main(cfg: DictConfig) -> None:
    from hydra.utils import to_absolute_path

    from harness.io import write_atomic

    def job() -> None:
        a = load_run(to_absolute_path(str(cfg.a)), "a")
        b = load_run(to_absolute_path(str(cfg.b)), "b")
        result = compare(a, b, str(cfg.metric), int_option(cfg.n_resamples, "n_resamples", minimum=1),
                         int_option(cfg.seed, "seed"))
        if cfg.out:
            out = Path(to_absolute_path(str(cfg.out)))
            if out.is_dir():
                raise CompareError(f"out={cfg.out} is a folder; name the .json file to write")
            write_atomic(out, (json.dumps(result, indent=1) + "\n").encode())
        print(format_report(result), end="")

    run_cli(job)


if __name__ == "__main__":
    exit_after(_main)
