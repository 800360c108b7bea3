"""python -m harness.train train=<name> [key=value ...]
torchrun --nproc_per_node=N -m harness.train train=<name> ...   (DistributedDataParallel)

Bad input (unknown recipe, unusable corpus, an output folder holding another run, a checkpoint of
another architecture) prints one `error:` line on stderr and exits with status 2, writing nothing.
A run stopped by SIGTERM/SIGINT writes its checkpoint and exits with 128 + the signal number.
"""
import importlib
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"
_exit = [0]


def init_distributed(device: str) -> None:
    """Under torchrun (WORLD_SIZE > 1): one process group, nccl on CUDA, gloo on CPU."""
    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def recipe_fn(name: str):
    module = f"harness.train.{name}" if "." not in name else name
    try:
        return importlib.import_module(module).run
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise ValueError(f"unknown recipe {name!r}: no module {module}") from None
        raise


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    import logging

    import torch.distributed as dist

    from harness.evaluate import _user_errors
    from harness.train.loop import rank_world
    device = str(cfg.device)
    if device == "auto":
        import torch
        cfg.device = device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        from models.registry import check_device
        check_device(str(cfg.device), "device")   # one line naming the devices here, not a CUDA traceback
        init_distributed(device)
        if rank_world()[0] != 0:
            logging.getLogger("harness").setLevel(logging.WARNING)
        result = recipe_fn(str(cfg.train.recipe))(cfg)
        if result.get("signal"):
            _exit[0] = 128 + int(result["signal"])
    except (*_user_errors(), FloatingPointError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        if type(e).__name__ == "MissingMandatoryValue":
            msg = f"missing value for {e.full_key}"
        logging.getLogger("harness.train").debug("bad input", exc_info=True)
        if rank_world()[0] == 0:
            print(f"error: {msg}", file=sys.stderr, flush=True)
        _exit[0] = 2
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint beyond the last one written
        print("error: interrupted; output_dir keeps its last checkpoint", file=sys.stderr, flush=True)
        _exit[0] = 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_argv(argv: list[str]) -> None:
    """An unknown `train=<name>` gets one line instead of Hydra's multi-line report."""
    known = sorted(p.stem for p in (CONF_DIR / "train").glob("*.yaml"))
    for arg in argv:
        if arg.startswith("train=") and arg[6:] not in known:
            print(f"error: unknown train '{arg[6:]}'; valid: {', '.join(known)}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    check_argv(sys.argv[1:])
    from harness.evaluate import rewrite_sys_argv
    rewrite_sys_argv()   # model=<path> -> model=checkpoint model.name=<path>, exactly as the eval CLI does
    main()
    sys.exit(_exit[0])
