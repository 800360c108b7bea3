"""python -m harness.train train=<name> [key=value ...]
torchrun --nproc_per_node=N -m harness.train train=<name> ...   (DistributedDataParallel)

Bad input (unknown recipe, unusable corpus, an output folder holding another run, a checkpoint of
another architecture) prints one `error:` line on stderr and exits with status 2, writing nothing.
A run stopped by SIGTERM/SIGINT writes its checkpoint and exits with 128 + the signal number.
"""
import importlib
from pathlib import Path

import hydra
from omegaconf import DictConfig

from harness.cli import UserError, exit_after, run_cli
from harness.config import rewrite_argv
from harness.data_parallel import init as init_distributed

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


def recipe_fn(name: str):
    module = f"harness.train.{name}" if "." not in name else name
    try:
        return importlib.import_module(module).run
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise UserError(f"unknown recipe {name!r}: no module {module}") from None
        raise


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    import logging

    import torch.distributed as dist

    from harness.train.loop import rank_world
    from harness.data_parallel import adopt_submitit_tasks, local_device
    from models.registry import resolve_device
    adopt_submitit_tasks()   # a SLURM job's tasks join as torchrun's ranks would
    cfg.device = local_device(resolve_device(str(cfg.device)))    # auto -> cuda/mps/cpu; cuda:<LOCAL_RANK> under torchrun

    def job() -> int:
        from models.registry import check_device
        check_device(str(cfg.device), "device")   # one line naming the devices here, not a CUDA traceback
        if "precision" in cfg:                     # resolved before the run records its config, as device is
            from models.registry import resolve_precision
            cfg.precision = resolve_precision(cfg.precision, str(cfg.device))
        init_distributed(str(cfg.device))   # one process group under torchrun (harness/data_parallel.py)
        if rank_world()[0] != 0:
            logging.getLogger("harness").setLevel(logging.WARNING)
        result = recipe_fn(str(cfg.train.recipe))(cfg)
        return 128 + int(result["signal"]) if result.get("signal") else 0

    try:
        # A second Ctrl-C (the first one writes a checkpoint) ends here: no checkpoint beyond the last.
        # No error.log here: output_dir is a checkpoint folder, and bad input must leave it as it was.
        run_cli(job, interrupted="interrupted; output_dir keeps its last checkpoint")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_argv(argv: list[str]) -> list[str]:
    """An unknown `train=<name>` gets one line instead of Hydra's multi-line report; `model=<path>`
    becomes `model=checkpoint model.name=<path>` exactly as in the eval CLI."""
    known = sorted(p.stem for p in (CONF_DIR / "train").glob("*.yaml"))
    for arg in argv:
        if arg.startswith("train=") and arg[6:] not in known:
            raise UserError(f"unknown train '{arg[6:]}'; valid: {', '.join(known)}")
    return rewrite_argv(argv)


if __name__ == "__main__":
    exit_after(main, check_argv)
