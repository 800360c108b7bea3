"""The one training loop every recipe (pretrain, classify, instruct, DPO) runs through.

    result = train(model, loss_fn, train_batches, val_batches, settings, run, tokenizer=tok,
                   sample_fn=None, provenance=None, labels=None, count_tokens=first_numel)

model          a `Model` (models/decoder.py: GPT, Llama, ...), on any device. Parameters with
               requires_grad=True are trained; freeze the rest before calling.
loss_fn        loss_fn(model, batch) -> scalar loss (mean over the batch), or a dict {"loss": scalar,
               name: scalar, ...} whose other entries are metrics (e.g. DPO's reward margin): they
               are averaged like the loss and logged as train_<name> / val_<name>. It gets the bare
               model, never the DDP wrapper, so it may call model.hidden_states / model.logits
               freely: DDP wraps a module whose forward *is* loss_fn, so gradients sync either way.
train_batches  a batch source: `.per_epoch` (micro-batches per epoch, equal on every rank) and
               `.batch(position)`, the micro-batch number `position` counting across epochs, a pure
               function of it (data.ShuffledBatches). Checkpoints save the position, nothing else.
val_batches    an iterable of batches, re-iterated at every eval (data.EvalBatches), or None.
settings       TrainSettings (harness/train/settings.py); `settings_from(cfg)` builds it from the Hydra config.
run            state.check_output(...): the output folder, run id, resolved config, what to resume.
sample_fn      sample_fn(model) -> str: a generation printed and logged at sample_every steps (rank 0, eval mode).
tokenizer, labels, provenance   saved into every checkpoint (provenance.json gains steps and losses).
count_tokens   batch -> tokens in it, for tokens/s (default: numel of the batch's first tensor).

eval_at_start evaluates once before the first step (a step-0 metrics row; provenance "val_before").

Optimizer steps: max_steps, or epochs * per_epoch // grad_accum. Schedule: linear warmup, cosine decay
to lr * min_lr_ratio. AdamW (fused where torch has it) with weight decay on matrices and embeddings
only. Under torchrun (dist initialized by harness.train.__main__) the loss module runs under
DistributedDataParallel (strategy=ddp) or sharded with FSDP2 (strategy=fsdp, harness/train/fsdp.py), and
only rank 0 writes. SIGTERM/SIGINT finish the current step, write `last/` and return with
result["signal"] set; a second SIGINT aborts at once.
"""
from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist

import harness
from harness.cli import UserError
from harness.trackers import training_log
from harness.train import fsdp
from harness.train import state as st
from harness.train.common import (LossModule, Signals, first_numel, lr_factor, make_optimizer, rank_world, report,
                                   to_device)
from harness.train.settings import PRECISIONS, TrainSettings, settings_from
from models.compile import compile_for_training

log = logging.getLogger("harness.train")
# what recipes, tests and bench/ import from here; the settings themselves are harness/train/settings.py
__all__ = ["PRECISIONS", "TrainSettings", "TrainingDiverged", "rank_world", "settings_from", "to_device", "train"]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: a learning rate or data problem the user fixes; the last
    checkpoint stays."""


def split_output(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss_fn's result -> (loss, {metric name: detached scalar})."""
    if isinstance(out, dict):
        return out["loss"], {k: v.detach() for k, v in out.items() if k != "loss"}
    return out, {}


def _rows(batch) -> int:
    """Examples in a batch: the leading dimension of its first tensor."""
    first = batch if isinstance(batch, torch.Tensor) else next(iter(batch.values() if isinstance(batch, dict) else batch))
    return int(first.shape[0])


def train(model, loss_fn, train_batches, val_batches, settings: TrainSettings, run: st.Run, *,
          tokenizer, sample_fn=None, provenance: dict | None = None, labels=None,
          count_tokens=first_numel) -> dict:
    s, (rank, world) = settings, rank_world()
    main, device, out = rank == 0, torch.device(s.device), run.out_dir
    if train_batches.per_epoch < s.grad_accum:
        raise UserError(f"the training data makes {train_batches.per_epoch} batches per epoch, fewer than "
                         f"grad_accum={s.grad_accum}; use more data or a smaller batch")
    total = s.max_steps or max(1, int(s.epochs * train_batches.per_epoch) // s.grad_accum)
    model.to(device)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("the model has no trainable parameters")
    if s.activation_checkpointing:
        fsdp.checkpoint_blocks(model)
    if s.compile:   # after checkpointing (it wraps the block's forward), before DDP/FSDP and the optimizer
        compile_for_training(model, log.info if main else None)
    lossmod = LossModule(model, loss_fn)
    sharded = s.strategy == "fsdp" and world > 1
    if sharded:   # before the optimizer, which must hold the sharded parameters
        fsdp.shard(lossmod, model, s.precision)
    elif s.strategy == "fsdp" and main:
        log.info("strategy=fsdp with one process: nothing to shard, training as usual")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, s, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, warmup=s.warmup_steps, total=total,
                                                           min_ratio=s.min_lr_ratio))
    # Mutable training state: everything in here goes into trainer_state.pt.
    ts = dict(step=0, position=0, tokens=0, row_loss=0.0, row_n=0, eval_loss=0.0, eval_n=0,
              train_loss=None, val_loss=None, elapsed_s=0.0, row_extras={}, val_metrics=None, val_before=None)
    if run.resume_from:
        saved = (fsdp.load_state(run.resume_from, lossmod, opt) if sharded
                 else st.load_state(run.resume_from, model))
        if saved["world_size"] != world:
            raise st.RunError(f"{run.resume_from} was written by a {saved['world_size']}-process run; "
                              f"resume it with the same number of processes (not {world})")
        if not sharded:
            opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        ts.update(saved["loop"])
        st.set_rng_state(saved["rng"][rank])
    else:
        torch.manual_seed(s.seed + rank)  # dropout streams differ per rank and never depend on init
    if world > 1:
        dist.barrier()  # every rank has checked and read the folder before rank 0 writes to it
    if main:
        st.start_run(run, ts["step"])
        log.info("run %s: %d steps of %d (%.3g epochs) into %s%s", run.id, total - ts["step"], total,
                 total * s.grad_accum / train_batches.per_epoch, out,
                 f", resuming at step {ts['step']}" if run.resume_from else "")
    ddp = torch.nn.parallel.DistributedDataParallel(lossmod) if world > 1 and not sharded else None
    # the bare model's weights in full on every rank (sharded: gathered for the duration; a collective)
    full = partial(fsdp.full_params, lossmod) if sharded else nullcontext
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if s.precision == "bf16-mixed"
                else nullcontext())
    base_prov = {"id": run.id, **(provenance or {}), "config": run.config, "seed": s.seed,
                 "world_size": world, "harness_version": harness.__version__}

    def prov(complete: bool) -> dict:
        keys = ("step", "tokens", "train_loss", "val_loss", "elapsed_s")
        extra = {k: ts[k] for k in ("val_metrics", "val_before") if ts[k] is not None}
        return {**base_prov, **{("steps" if k == "step" else k): ts[k] for k in keys}, **extra, "complete": complete}

    def checkpoint() -> None:
        rngs = [st.rng_state()]
        if world > 1:  # every rank's dropout stream, so a resumed DDP run continues each one
            rngs = [None] * world
            dist.all_gather_object(rngs, st.rng_state())
        trainer_state = {"scheduler": sched.state_dict(), "rng": rngs, "loop": dict(ts), "world_size": world}
        if sharded:
            fsdp.save_state(out, lossmod, opt, trainer_state, prov(False), main)
        elif main:
            st.save_state(out, model, tokenizer, prov(False), {"optimizer": opt.state_dict(), **trainer_state}, labels)
        if main:
            st.plot_losses(out, run.id)

    def evaluate() -> tuple[float | None, dict[str, float]]:
        """(mean validation loss, {metric: mean}) per example over the validation batches of every rank."""
        model.eval()
        sums, names = None, []
        with torch.no_grad(), full():
            for k, batch in enumerate(val_batches or ()):
                if s.eval_batches and k >= s.eval_batches:
                    break
                with autocast:
                    loss, extras = split_output(lossmod(to_device(batch, device)))  # sharded: FSDP's root
                names = sorted(extras)
                # weighted by the batch's rows, so a short last batch counts per example, not as a full one
                rows = float(_rows(batch))
                vals = torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device),
                                    *(extras[n].double() for n in names)]) * rows
                sums = vals if sums is None else sums + vals
        if sums is None:
            sums = torch.zeros(2, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(sums)
        model.train()
        if not sums[1]:
            return None, {}
        return float(sums[0] / sums[1]), {n: float(v / sums[1]) for n, v in zip(names, sums[2:])}

    def eval_row() -> dict:
        """{"val_loss": ..., "val_<metric>": ...}; the metrics also go to ts for provenance."""
        loss, extras = evaluate()
        ts["val_loss"], ts["val_metrics"] = loss, extras or None
        return {"val_loss": loss, **{f"val_{k}": v for k, v in extras.items()}}

    metrics_log, signals, bar = training_log(run, s.logger if main else (), ts["step"]), Signals(), None
    if main and s.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=ts["step"], unit="step", dynamic_ncols=True, desc=run.id.split("-")[0])
    if s.eval_at_start and val_batches is not None and ts["step"] == 0 and ts["val_before"] is None:
        before = eval_row()
        ts["val_before"] = {k.removeprefix("val_"): v for k, v in before.items()}
        if main:
            metrics_log.append({"step": 0, **before})
            (bar.write if bar else print)("before training: " + ", ".join(
                f"{k} {v:.4f}" for k, v in before.items() if v is not None))
    model.train()
    row_time, row_tokens, stopped = 0.0, 0, None   # tokens/s counts training steps only
    try:
        while ts["step"] < total:
            if s.stop_at_step is not None and ts["step"] >= s.stop_at_step:
                stopped = "stop_at_step"
                break
            t_step = time.perf_counter()
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            step_extras: dict[str, torch.Tensor] = {}
            for micro in range(s.grad_accum):
                batch = to_device(train_batches.batch(ts["position"]), device)
                ts["position"] += 1
                ts["tokens"] += count_tokens(batch) * world
                row_tokens += count_tokens(batch) * world
                sync = ddp is None or micro == s.grad_accum - 1
                if sharded:
                    fsdp.set_sync(lossmod, micro == s.grad_accum - 1)
                with ddp.no_sync() if not sync else nullcontext():
                    with autocast:
                        loss, extras = split_output((ddp or lossmod)(batch))
                    (loss / s.grad_accum).backward()
                step_loss += loss.detach().double() / s.grad_accum
                for k, v in extras.items():
                    step_extras[k] = step_extras.get(k, 0) + v.double() / s.grad_accum
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            ts["step"] += 1
            step = ts["step"]
            # One collective per step: the global loss, whether any rank got a signal, the metrics.
            names = sorted(step_extras)
            flag = torch.stack([step_loss, torch.tensor(float(signals.received or 0), dtype=torch.float64, device=device),
                                *(step_extras[n] for n in names)])
            if world > 1:
                dist.all_reduce(flag)
            step_loss_v = float(flag[0]) / world
            for n, v in zip(names, flag[2:].tolist()):
                ts["row_extras"][n] = ts["row_extras"].get(n, 0.0) + v / world
            row_time += time.perf_counter() - t_step
            ts["elapsed_s"] += time.perf_counter() - t_step
            if not math.isfinite(step_loss_v):
                raise TrainingDiverged(f"loss is {step_loss_v} at step {step}; lower lr or check the data "
                                       f"(last checkpoint: {st.last_checkpoint(out)})")
            for k in ("row", "eval"):
                ts[f"{k}_loss"] += step_loss_v
                ts[f"{k}_n"] += 1
            do_eval = step == total or (s.eval_every and step % s.eval_every == 0)
            if do_eval or step % max(1, s.log_every) == 0:
                row = {"step": step, "epoch": round(ts["position"] / train_batches.per_epoch, 4),
                       "train_loss": ts["row_loss"] / ts["row_n"], "lr": lr,
                       **{f"train_{k}": v / ts["row_n"] for k, v in ts["row_extras"].items()},
                       "tokens_per_s": round(row_tokens / max(row_time, 1e-9), 1)}
                ts["row_loss"], ts["row_n"], ts["row_extras"] = 0.0, 0, {}
                row_time, row_tokens = 0.0, 0
                if do_eval:
                    ts["train_loss"] = ts["eval_loss"] / ts["eval_n"]
                    ts["eval_loss"], ts["eval_n"] = 0.0, 0
                    row.update(eval_row())
                    row["train_loss_avg"] = ts["train_loss"]
                want_sample = sample_fn and (step == total or (s.sample_every and step % s.sample_every == 0))
                if want_sample:
                    with full():
                        if main:
                            model.eval()
                            row["sample"] = sample_fn(model)
                            model.train()
                if main:
                    metrics_log.append({**row, "tokens_seen": ts["tokens"]})
                    report(bar, row, do_eval, step)
            if bar:
                bar.update(1)
            if flag[1] > 0 and step < total:
                stopped = "signal"
                signals.received = signals.received or signal.SIGTERM  # another rank got it
                break
            if s.checkpoint_every and step % s.checkpoint_every == 0 and step < total:
                checkpoint()
        if stopped or s.keep_last:
            checkpoint()
        if stopped and main:
            log.info("stopped at step %d of %d (%s); checkpoint in %s; continue with resume=true",
                     ts["step"], total, "signal" if stopped == "signal" else "stop_at_step", out / st.LAST)
        if not stopped:
            state = fsdp.full_state(lossmod) if sharded else None   # a collective: every rank
        if not stopped and main:
            st.publish_final(out, model, tokenizer, prov(True), labels, state=state)
            st.plot_losses(out, run.id)
            if not s.keep_last:
                shutil.rmtree(out / st.LAST, ignore_errors=True)
            log.info("done: %d steps, train loss %.4f, val loss %s; checkpoint in %s", ts["step"],
                     ts["train_loss"] or float("nan"), "n/a" if ts["val_loss"] is None else f"{ts['val_loss']:.4f}", out)
    finally:
        signals.restore()
        metrics_log.close()   # after an exception: the tracker runs end as failed
        if bar:
            bar.close()
    if world > 1:
        dist.barrier()
    return {**prov(not stopped), "stopped": stopped, "signal": signals.received if stopped == "signal" else None,
            "out_dir": str(out)}

