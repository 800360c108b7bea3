"""TrainSettings: what the training loop (harness/train/loop.py) is told to do, checked when built.

    settings = settings_from(cfg)          # top-level keys (seed, device, precision, ...) + the recipe's train:
    settings = TrainSettings(max_steps=1)  # tests and benchmarks build it directly

Why a module of its own: every recipe builds its settings before it reads a corpus or builds a model,
so a bad value (precision=fp16, strategy=bogus, grad_accum=0) is one `error:` line before anything is
loaded or written; the checks live with the fields they check, apart from the loop that runs them.
The names stay importable from harness.train.loop, where the recipes, tests and bench/ import them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from harness.cli import UserError, bool_option
from harness.trackers import check_names
from harness.train import fsdp

PRECISIONS = ("fp32", "bf16-mixed")


@dataclass
class TrainSettings:
    epochs: float = 1
    max_steps: int | None = None        # overrides epochs
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0              # 0: off
    precision: str = "fp32"             # fp32 | bf16-mixed (autocast; weights and optimizer stay fp32) | auto
    device: str = "cpu"
    seed: int = 123
    eval_every: int = 100               # steps; the last step always evaluates
    eval_batches: int | None = None     # cap per rank; None: the whole validation set
    eval_at_start: bool = False         # also evaluate before the first step (the untrained baseline)
    sample_every: int = 0               # steps; 0: only after the last step
    checkpoint_every: int = 0           # steps; 0: only on a signal / stop_at_step
    log_every: int = 1
    keep_last: bool = False             # keep last/ (optimizer state) after the final checkpoint
    stop_at_step: int | None = None     # write last/ and stop there; resume=true continues
    progress: bool = True
    strategy: str = "ddp"               # ddp | fsdp (under torchrun; one process trains plainly either way)
    activation_checkpointing: bool = False   # recompute each block's activations in backward
    compile: bool = False               # torch.compile each block (models/compile.py)
    logger: tuple[str, ...] = ()        # experiment trackers (harness/trackers): tensorboard, wandb, mlflow

    def __post_init__(self):
        from models.registry import resolve_precision
        self.precision = resolve_precision(self.precision, self.device)   # auto: bf16-mixed on CUDA with bf16
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        fsdp.check_strategy(self.strategy)
        bool_option(self.compile, "compile")
        self.logger = check_names(self.logger)   # a tracker's library missing: one line before any work
        if self.grad_accum < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise UserError("grad_accum and max_steps must be >= 1")


def settings_from(cfg) -> TrainSettings:
    """Top-level keys (seed, device, precision, ...) overlaid by the recipe's `train:` group."""
    from omegaconf import OmegaConf
    merged = {**OmegaConf.to_container(cfg, resolve=True), **OmegaConf.to_container(cfg.train, resolve=True)}
    kw = {f.name: merged[f.name] for f in dataclasses.fields(TrainSettings) if merged.get(f.name) is not None}
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    return TrainSettings(**kw)
