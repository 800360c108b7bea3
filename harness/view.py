"""python -m harness.view [leaderboard=results/leaderboard.csv] [runs=<folders or globs>] [out_dir=results/site]
[serve=false] [port=8765]

Builds the results viewer (harness/report/site.py) and prints the path of its index.html; with
serve=true also serves it on 127.0.0.1 (never another host: the runs' prompts and outputs stay on
this machine). Bad input: one `error:` line, exit 2.
"""
import hydra

from harness.cli import bool_option, exit_after, int_option, run_cli


@hydra.main(version_base="1.3", config_path="../conf", config_name="view")
def _main(cfg) -> None:
    from hydra.utils import to_absolute_path
    from omegaconf import ListConfig

    from harness.report.site import ViewError, build, serve

    def job() -> None:
        if str(cfg.host) != "127.0.0.1":
            raise ViewError(f"host={cfg.host}: the viewer serves on 127.0.0.1 only; drop host=")
        serving = bool_option(cfg.serve, "serve")
        port = int_option(cfg.port, "port", minimum=0)
        if port > 65535:
            raise ViewError(f"port={port}: expected 0..65535 (0: any free port)")
        runs = cfg.runs
        if runs is not None:
            runs = [str(r) for r in runs] if isinstance(runs, ListConfig) else [str(runs)]
        index = build(to_absolute_path(str(cfg.leaderboard)), runs, to_absolute_path(str(cfg.out_dir)))
        print(index, flush=True)
        if serving:
            serve(index.parent, port)

    run_cli(job)


if __name__ == "__main__":
    exit_after(_main)
