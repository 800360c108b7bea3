"""Spam classification finetuning (book ch06), the `classify_spam` recipe.

Pieces that do not depend on the training loop: turn any loadable LM into a ham/spam classifier
(same body weights, a fresh 2-class head on the last real token), choose what trains (the last N
blocks + final norm + head, everything, or LoRA adapters), and a frozen-prefix cache.

The cache is the CPU speed trick: when only the last N blocks train, the first L - N blocks are a
fixed function of the tokens, so their output for each message is computed once (in batches,
optionally under bf16 autocast) and every epoch runs only the trainable blocks on it. The result
equals `models.classifier.class_logits` on the whole model (tests/test_spam.py checks it).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from harness.cli import UserError
from models.classifier import class_logits, pad_right
from models.lora import apply_lora, lora_parameters
from models.decoder import Model, output_head
from tasks.sms_spam import LABELS


# --- model preparation ---------------------------------------------------------------------------

def encode(tokenizer, text: str) -> list[int]:
    """Token ids exactly as `TorchLM.classify` makes them (BOS first where the tokenizer adds one)."""
    ids = tokenizer.encode(text)
    return [tokenizer.bos_id] + ids if tokenizer.add_bos else ids


def to_classifier(model: Model, labels: Sequence[str] | None = None, seed: int = 123) -> Model:
    """Replace the vocabulary head by a freshly initialised len(LABELS)-class head, in place.
    A model that already is a ham/spam classifier (a checkpoint of ours) keeps its head."""
    if model.config.num_classes and list(labels or []) == list(LABELS):
        return model
    model.config = replace(model.config, num_classes=len(LABELS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = output_head(model.config)                       # nn.Linear(d_model, 2), default init
    model.head = head.to(device=model.tok_emb.weight.device, dtype=model.tok_emb.weight.dtype)
    return model


def set_trainable(model: Model, trainable_blocks: int | str = 1, lora: dict | None = None) -> dict:
    """Freeze everything, then train the head, the final norm and the last `trainable_blocks`
    blocks ("all": every parameter, embeddings included). With `lora` ({rank, alpha[, targets,
    dropout]}), the remaining blocks' Linear layers get LoRA adapters (trained, base frozen).
    Returns a summary: parameter counts and `frozen_prefix`, the number of leading blocks whose
    output is a fixed function of the tokens (what `prefix_states` may cache)."""
    n_layers = len(model.blocks)
    if trainable_blocks == "all":
        n_train = n_layers
    else:
        try:
            n_train = int(trainable_blocks)
        except (TypeError, ValueError):
            raise UserError(f"trainable_blocks must be a number of blocks or 'all', not {trainable_blocks!r}") from None
        if not 0 <= n_train <= n_layers:
            raise UserError(f"trainable_blocks={n_train}, but the model has {n_layers} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in [model.head, model.final_norm, *model.blocks[n_layers - n_train:]]:
        for p in module.parameters():
            p.requires_grad_(True)
    if trainable_blocks == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    wrapped: list[str] = []
    if lora:
        frozen = n_layers - n_train
        if frozen == 0:
            raise UserError("LoRA needs frozen blocks to adapt; use trainable_blocks < all (e.g. 0) with lora")
        # fnmatch patterns over module names; default: every Linear of the frozen blocks
        targets = list(lora.get("targets") or [f"blocks.{i}.*" for i in range(frozen)])
        wrapped = apply_lora(model, int(lora["rank"]), float(lora["alpha"]), targets,
                             float(lora.get("dropout", 0.0)))
        for p in lora_parameters(model):
            p.requires_grad_(True)
    frozen_prefix = 0
    for block in model.blocks:
        if any(p.requires_grad for p in block.parameters()):
            break
        frozen_prefix += 1
    if trainable_blocks == "all":
        frozen_prefix = 0
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()),
            "trainable_blocks": n_train, "lora_layers": len(wrapped), "frozen_prefix": frozen_prefix}


# --- the frozen-prefix cache ---------------------------------------------------------------------

def prefix_states(model: Model, token_lists: Sequence[Sequence[int]], upto: int, pad_id: int,
                  max_length: int, batch_size: int = 16, autocast: bool = False) -> list[torch.Tensor]:
    """Output of blocks [0, upto) for each text, [T_i, d_model] (the input of block `upto`).
    Texts are cut like `pad_right` cuts them; runs in length-sorted batches without gradients."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(token_lists)
    dev = model.tok_emb.weight.device
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            tokens, lengths = pad_right([token_lists[i] for i in idx], pad_id, max_length)
            x = model.run_blocks(model.embed(tokens.to(dev)), 0, upto)
            for j, i in enumerate(idx):
                out[i] = x[j, : int(lengths[j])].float().clone()
    return out


def pad_states(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, D] right-padded with zeros and [B] lengths (padding is never read: causal + last token)."""
    width = max(s.shape[0] for s in states)
    x = states[0].new_zeros(len(states), width, states[0].shape[1])
    for i, s in enumerate(states):
        x[i, : s.shape[0]] = s
    return x, torch.tensor([s.shape[0] for s in states])


def suffix_class_logits(model: Model, x: torch.Tensor, lengths: torch.Tensor, start: int) -> torch.Tensor:
    """Blocks [start, L), final norm and head on cached states -> [B, num_classes] at the last real
    token: the same numbers `class_logits(model, tokens, lengths)` gives on the whole model."""
    x = model.run_blocks(x, start)
    last = x[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]
    return model.logits(model.final_norm(last))


def batch_logits(model: Model, batch: dict, start: int) -> torch.Tensor:
    """Class logits for a batch: {"states", "lengths"} (cached prefix) or {"tokens", "lengths"}."""
    if "states" in batch:
        return suffix_class_logits(model, batch["states"], batch["lengths"], start)
    return class_logits(model, batch["tokens"], batch["lengths"])


# --- the recipe ----------------------------------------------------------------------------------

class _Examples:
    """Dataset of (tokens or cached prefix states, label) items for ShuffledBatches / EvalBatches."""

    def __init__(self, inputs: list, labels: list[int]):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.inputs[i], self.labels[i]


def make_collate(pad_id: int, max_length: int):
    def collate(items: list) -> dict:
        inputs, labels = zip(*items)
        if isinstance(inputs[0], torch.Tensor):
            x, lengths = pad_states(inputs)
            batch = {"states": x, "lengths": lengths}
        else:
            tokens, lengths = pad_right(inputs, pad_id, max_length)
            batch = {"tokens": tokens, "lengths": lengths}
        return {**batch, "labels": torch.tensor(labels, dtype=torch.long)}
    return collate


def accuracy(model: Model, batches, start: int, device) -> tuple[int, int]:
    """(correct, total) over an iterable of collated batches, no gradients."""
    from harness.train.loop import to_device
    right = total = 0
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, device)
            pred = batch_logits(model, batch, start).argmax(-1)
            right += int((pred == batch["labels"]).sum())
            total += len(pred)
    return right, total


def run(cfg) -> dict:
    import logging
    import time

    from omegaconf import OmegaConf

    from harness.train import data as D
    from harness.train import state as st
    from harness.train.loop import rank_world, settings_from, train
    from models.lora import merge_lora
    from models.registry import load_model
    from tasks.sms_spam import spam_split

    log = logging.getLogger("harness.train")
    t0_wall, t0_cpu = time.perf_counter(), time.process_time()
    t = cfg.train
    rank, world = rank_world()
    settings = settings_from(cfg)
    sp = t.split
    # The data first: a bad label file fails here, before the output folder is touched.
    split = spam_split(int(sp.seed), bool(sp.dedupe), bool(sp.balance), list(sp.fractions), sp.path)
    if not split.train:
        raise UserError("the sms_spam train split is empty; check split.fractions")
    train_ex = split.train[: t.limit_train] if t.get("limit_train") else split.train
    val_ex = split.val[: t.limit_val] if t.get("limit_val") else split.val
    config = OmegaConf.to_container(cfg, resolve=True)
    run_ = st.check_output(cfg.output_dir, config, cfg.resume, cfg.overwrite, name="classify_spam")

    name = str(cfg.model.name)
    model, tokenizer, info = load_model(name)
    to_classifier(model, info.get("labels"), seed=settings.seed)
    lora = OmegaConf.to_container(t.lora, resolve=True) if t.lora else None
    summary = set_trainable(model, t.trainable_blocks, lora)
    device = torch.device(settings.device)
    model.to(device)
    max_length = min(int(t.max_length or model.config.context_length), model.config.context_length)
    pad_id = tokenizer.eos_id
    start = summary["frozen_prefix"] if t.cache_prefix else 0
    if rank == 0:
        log.info("%s -> ham/spam classifier: %s trainable of %.1fM parameters (%d trainable blocks, %d LoRA "
                 "layers); %d train / %d val messages; %s", name, f"{summary['trainable_params']:,}",
                 summary["total_params"] / 1e6, summary["trainable_blocks"], summary["lora_layers"],
                 len(train_ex), len(val_ex), split.signature)

    def inputs(examples):
        ids = [encode(tokenizer, text) for text, _ in examples]
        if start:  # the frozen blocks' output, computed once
            return prefix_states(model, ids, start, pad_id, max_length, batch_size=16,
                                 autocast=settings.precision == "bf16-mixed")
        return [i[:max_length] for i in ids]

    t_cache = time.perf_counter()
    train_ds = _Examples(inputs(train_ex), [LABELS.index(lab) for _, lab in train_ex])
    val_ds = _Examples(inputs(val_ex), [LABELS.index(lab) for _, lab in val_ex]) if val_ex else None
    cache_s = time.perf_counter() - t_cache
    if start and rank == 0:
        log.info("cached the output of the %d frozen blocks for %d messages in %.1f s", start,
                 len(train_ds) + len(val_ds or ()), cache_s)
    collate = make_collate(pad_id, max_length)
    bs = int(t.batch_size)
    if len(train_ds) < bs * world:
        raise D.DataError(f"{len(train_ds)} training messages make no batch of {bs * world}")
    train_batches = D.ShuffledBatches(train_ds, bs, settings.seed, rank, world, collate=collate)
    val_batches = D.EvalBatches(val_ds, bs, rank, world, collate=collate) if val_ds else None

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(batch_logits(m, batch, start).float(), batch["labels"])

    def val_accuracy(m) -> str:   # the loop's sample hook: a line per eval, logged in metrics.jsonl
        right, total = accuracy(m, val_batches or (), start, device)
        return f"val acc {right / max(total, 1):.4f} ({right}/{total})"

    parent = {"name": name, "checkpoint_sha": info.get("checkpoint_sha"), "provenance": info.get("provenance") or None}
    provenance = {"recipe": "classify_spam", "parent": parent, "split": split.signature,
                  "split_sizes": [len(split.train), len(split.val), len(split.test)],
                  "train_messages": len(train_ds), "val_messages": len(val_ds or ()),
                  "labels": list(LABELS), "trainable": summary, "prefix_cache_s": round(cache_s, 1)}
    result = train(model, loss_fn, train_batches, val_batches, settings, run_, tokenizer=tokenizer,
                   sample_fn=val_accuracy if val_batches else None, provenance=provenance,
                   labels=list(LABELS), count_tokens=lambda b: int(b["lengths"].sum()))
    if result.get("stopped") or rank != 0:
        return result
    # The final checkpoint: LoRA merged into plain Linear layers, validation accuracy and the whole
    # run's cost (prefix cache included) in provenance.json, which is written last.
    right, total = accuracy(model.eval(), val_batches or (), start, device)
    keep = {k: v for k, v in result.items() if k not in ("stopped", "signal", "out_dir")}
    prov = {**keep, "val_acc": right / total if total else None,
            "wall_s": round(time.perf_counter() - t0_wall, 1), "cpu_s": round(time.process_time() - t0_cpu, 1)}
    out = Path(result["out_dir"])
    if summary["lora_layers"]:
        merge_lora(model)
        st.publish_final(out, model, tokenizer, prov, list(LABELS))
    else:
        st.write_json(out / "provenance.json", prov)
    log.info("classify_spam: val acc %s, %.1f min wall, %.1f CPU-min; score the test split with "
             "python -m harness task=sms_spam model=%s", "n/a" if not total else f"{right / total:.4f}",
             prov["wall_s"] / 60, prov["cpu_s"] / 60, out)
    return {**result, **prov}
