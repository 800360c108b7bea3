"""python -m harness.leaderboard [leaderboard=results/leaderboard.csv] [out_dir=results] [key=value ...]

Renders the leaderboard (harness/report/render.py) into out_dir. Only the command line lives here:
the store (harness/report/store.py) knows nothing of rendering, so the renderer imports the store
and not the other way round. Bad input: one `error:` line, exit 2.
"""
import sys

import hydra

from harness.cli import exit_after, run_cli


@hydra.main(version_base="1.3", config_path="../conf", config_name="leaderboard")
def _render(cfg) -> None:
    from hydra.utils import to_absolute_path

    from harness.report.render import render

    def job() -> None:
        markdown, written = render(to_absolute_path(str(cfg.leaderboard)), to_absolute_path(str(cfg.out_dir)),
                                   cfg.models, cfg.tasks, cfg.metrics, str(cfg.select), str(cfg.interval),
                                   bool(cfg.plot))
        print(markdown, end="")
        print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)

    run_cli(job)


if __name__ == "__main__":
    exit_after(_render)
