"""Preference tuning with DPO (book ch07 bonus, "DPO from scratch"), the `dpo` recipe.

    python -m harness.train train=instruct output_dir=out/instruct
    python -m harness.train train=dpo model=out/instruct output_dir=out/dpo
    python -m harness task=instruct model=out/dpo

Data: instruction-data-with-preference.json, split exactly like the SFT data (same seed and
fractions; the file holds the same entries in the same order). Each pair is
prompt + chosen + EOS and prompt + rejected + EOS, prompt tokens and padding masked; both are
collated into one batch of 2B rows, so every step runs one forward of the policy and one no-grad
forward of the reference.

The policy starts from `model=` (typically the instruct checkpoint); the reference is a frozen copy
of the same starting weights (eval mode, no gradients, under the same autocast). A sequence's
log-prob is the sum or (the book's) mean of its response-token log-probs (`logprob_reduction`).
Loss -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); rewards beta * (pi - ref). The loop logs
loss, reward margin and preference accuracy on train (train_*) and validation (val_*) rows; the
validation values before training (policy == reference: margin 0, accuracy 0 since ties are not
wins) and after go into provenance.json (val_before / val_after) and the closing log line.
"""
from __future__ import annotations

import copy
import logging
import time

import torch
from omegaconf import OmegaConf

from harness.cli import UserError
from harness.train import data as D
from harness.train import state as st
from harness.train.instruct import (Responder, context_cap, describe, finish, limited, load_parent, load_split,
                                    make_sampler, set_trainable)
from harness.train.sft_data import REDUCTIONS, collate_pairs, dpo_loss, encode_example, has_target, sequence_logprobs
from models.download import sha256_file
from tasks.instruction_data import build_prompt, chat_renderer, resolve_style

log = logging.getLogger("harness.train")
PREFERENCE_FIELDS = ("instruction", "input", "output", "chosen", "rejected")


def encode_pairs(entries: list[dict], tokenizer, style: str, max_length: int) -> tuple[list[tuple], int]:
    """[((chosen ids, prompt_len), (rejected ids, prompt_len))] and how many pairs were dropped because
    max_length cuts off every response token of one side."""
    pairs = []
    for e in entries:
        prompt = build_prompt(e, chat_renderer(tokenizer), style)
        pair = (encode_example(tokenizer, prompt, e["chosen"]), encode_example(tokenizer, prompt, e["rejected"]))
        if all(has_target(ids, n, max_length, mask_prompt=True) for ids, n in pair):
            pairs.append(pair)
    return pairs, len(entries) - len(pairs)


def make_loss(reference, beta: float, reduction: str):
    """loss_fn(policy, batch) for the loop: DPO loss plus reward metrics on a collate_pairs batch."""
    def loss_fn(policy, batch):
        inputs, targets = batch["inputs"], batch["targets"]
        n = inputs.shape[0] // 2
        pi = sequence_logprobs(policy, inputs, targets, reduction)
        with torch.no_grad():
            ref = sequence_logprobs(reference, inputs, targets, reduction)
        return dpo_loss(pi[:n], pi[n:], ref[:n], ref[n:], beta)
    return loss_fn


def run(cfg) -> dict:
    from harness.train.loop import rank_world, settings_from, train
    clock = (time.perf_counter(), time.process_time())
    t = cfg.train
    rank, world = rank_world()
    settings = settings_from(cfg)
    beta, reduction = float(t.beta), str(t.logprob_reduction)
    if reduction not in REDUCTIONS:
        raise UserError(f"logprob_reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if beta <= 0:
        raise UserError(f"beta must be positive, got {beta}")
    split, data_path = load_split(t, "instruction-data-with-preference.json", PREFERENCE_FIELDS)
    train_entries, val_entries = limited(split.train, t.get("limit_train")), limited(split.val, t.get("limit_val"))
    config = OmegaConf.to_container(cfg, resolve=True)
    run_ = st.check_output(cfg.output_dir, config, cfg.resume, cfg.overwrite, name="dpo")

    name = str(cfg.model.name)
    model, tokenizer, parent = load_parent(name)
    style = resolve_style(str(t.prompt_style), bool(tokenizer.chat_template))
    max_length = context_cap(t, model)
    (train_ds, skip_train), (val_ds, skip_val) = (encode_pairs(e, tokenizer, style, max_length)
                                                  for e in (train_entries, val_entries))
    bs = int(t.batch_size)
    if len(train_ds) < bs * world:
        raise D.DataError(f"{len(train_ds)} training pairs make no batch of {bs * world}; "
                          "lower batch_size or raise limit_train")
    # The reference: the starting weights, frozen, taken before any LoRA wrapping.
    reference = copy.deepcopy(model).eval().requires_grad_(False).to(settings.device)
    lora = OmegaConf.to_container(t.lora, resolve=True) if t.lora else None
    summary = set_trainable(model, lora, settings.seed)

    def collate(items):
        return collate_pairs(items, tokenizer.eos_id, max_length)

    train_batches = D.ShuffledBatches(train_ds, bs, settings.seed, rank, world, collate=collate)
    val_batches = D.EvalBatches(val_ds, bs, rank, world, collate=collate) if val_ds else None
    sampler = make_sampler(Responder(tokenizer, style, int(t.sample_max_new_tokens)), (val_entries or train_entries)[0])
    if rank == 0:
        log.info("DPO from %s (beta %g, %s log-probs, %s prompts): %s trainable of %.1fM parameters (%d LoRA "
                 "layers); %d train / %d val pairs (%d cut off by max_length=%d); %s", name, beta, reduction, style,
                 f"{summary['trainable_params']:,}", summary["total_params"] / 1e6, summary["lora_layers"],
                 len(train_ds), len(val_ds), skip_train + skip_val, max_length, split.signature)
    provenance = {"recipe": "dpo", "parent": parent, "split": split.signature,   # the reference is the parent
                  "split_sizes": [len(split.train), len(split.val), len(split.test)],
                  # the file the split was cut from: only its train part was trained on (see "split")
                  "split_file": {"path": str(data_path.resolve()), "sha256": sha256_file(data_path)},
                  "prompt_style": style, "beta": beta, "logprob_reduction": reduction, "lora": lora,
                  "max_length": max_length, "train_pairs": len(train_ds), "val_pairs": len(val_ds),
                  "skipped_pairs": skip_train + skip_val, "trainable": summary}
    result = train(model, make_loss(reference, beta, reduction), train_batches, val_batches, settings, run_,
                   tokenizer=tokenizer, sample_fn=sampler, provenance=provenance,
                   count_tokens=lambda b: int(b["lengths"].sum()))
    if result.get("stopped") or rank != 0:
        return result
    del reference
    result = finish(cfg, result, model, tokenizer, summary, split.test, style, clock)
    log.info("dpo: validation before training: %s; after: %s; %.1f min wall, %.1f CPU-min; judge the test "
             "split with python -m harness task=instruct model=%s", describe(result.get("val_before")),
             describe(result["val_after"]), result["wall_s"] / 60, result["cpu_s"] / 60, result["out_dir"])
    return result
