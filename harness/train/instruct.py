"""Instruction finetuning (book ch07), the `instruct` recipe, plus the pieces `train=dpo` shares.

    python -m harness.train train=instruct output_dir=out/instruct            # SmolLM2-135M-Instruct
    python -m harness.train train=instruct model=gpt2-124m train.lora='{rank: 16, alpha: 16}'
    python -m harness task=instruct model=out/instruct                        # judge the test split

Data: the seeded 85/5/10 split of the ch07 instruction data (`tasks.instruction_data`, the split the
judged task uses); train on `train`, validation loss on `val`. An example is
build_prompt(entry, <chat template>, prompt_style) + output + EOS (for a chat template, its end-of-turn),
collated the book's way (`sft_data.collate_sft`): padding targets ignored except the EOS, and with
`mask_prompt: true` the prompt's targets too. All parameters train, or LoRA adapters (merged into
plain Linear layers in the saved checkpoint). After training, rank 0 answers the test split greedily
into `test_responses.json` (the book's format: instruction, input, output, model_response).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from harness.cli import UserError
from harness.train import data as D
from harness.train import state as st
from harness.train.sft_data import collate_sft, encode_example, encode_prompt, has_target, sft_loss
from models.download import sha256_file
from models.generate import generate_tokens
from models.lora import DEFAULT_TARGETS, apply_lora, lora_parameters, merge_lora
from models.lm import cut_at_stop
from tasks.instruction_data import (build_prompt, chat_renderer, instruction_file, instruction_split, resolve_style,
                                    stop_strings)

log = logging.getLogger("harness.train")


# --- pieces shared with dpo.py --------------------------------------------------------------------

def load_split(t, file_name: str, required=("instruction", "input", "output")):
    """(split, data file path) from the recipe config's `path` (null: the staged file) and `split`."""
    path = Path(t.path).expanduser() if t.get("path") else instruction_file(file_name)
    split = instruction_split(path, int(t.split.seed), list(t.split.fractions), required)
    if not split.train:
        raise D.DataError(f"the train split of {path} is empty; check split.fractions")
    return split, path


def limited(entries: list[dict], limit) -> list[dict]:
    return entries[: int(limit)] if limit is not None else entries


def load_parent(name: str):
    """(model, tokenizer, parent provenance) of a vocabulary-head model."""
    from models.registry import load_model
    model, tokenizer, info = load_model(name)
    if model.config.num_classes:
        raise UserError(f"{name} is a classifier ({model.config.num_classes} classes); "
                         "instruction and preference tuning need a vocabulary-head model")
    parent = {"name": name, "checkpoint_sha": info.get("checkpoint_sha"), "provenance": info.get("provenance") or None}
    return model, tokenizer, parent


def context_cap(t, model) -> int:
    """Tokens per training row: `max_length`, never more than the model's context."""
    ctx = model.config.context_length
    return min(int(t.max_length), ctx) if t.get("max_length") else ctx


def set_trainable(model, lora: dict | None, seed: int) -> dict:
    """Every parameter trains; or, with `lora` ({rank, alpha[, targets, dropout]}), only LoRA
    adapters on the Linear layers matching `targets` (default: every Linear in the blocks; a tied
    vocabulary head is the embedding, never a Linear)."""
    if lora:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)   # the same adapters for the same seed
            wrapped = apply_lora(model, int(lora["rank"]), float(lora["alpha"]),
                                 list(lora.get("targets") or DEFAULT_TARGETS), float(lora.get("dropout") or 0.0))
        for p in lora_parameters(model):
            p.requires_grad_(True)
    else:
        wrapped = []
        for p in model.parameters():
            p.requires_grad_(True)
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()), "lora_layers": len(wrapped)}


@dataclass
class Responder:
    """Greedy responses to entries, batched like TorchLM.generate (length-sorted, left-padded)."""
    tokenizer: object
    style: str
    max_new_tokens: int
    batch_size: int = 8

    def prompt_ids(self, entry: dict, context: int) -> list[int]:
        prompt = build_prompt(entry, chat_renderer(self.tokenizer), self.style)
        return encode_prompt(self.tokenizer, prompt)[-(context - 1):]

    def __call__(self, model, entries: list[dict], progress: bool = False) -> tuple[list[str], list[bool]]:
        """(responses, whether each hit max_new_tokens without stopping)."""
        ctx = model.config.context_length
        encoded = [self.prompt_ids(e, ctx) for e in entries]
        order = sorted(range(len(entries)), key=lambda i: len(encoded[i]))
        stop = stop_strings(self.style)
        decode = self.tokenizer.decode
        check = (lambda _r, toks: any(s in decode(toks) for s in stop)) if stop else None
        texts, at_limit = [""] * len(entries), [False] * len(entries)
        was_training = model.training
        model.eval()
        for s in tqdm(range(0, len(order), self.batch_size), desc="test responses", disable=not progress,
                      leave=False):
            idx = order[s:s + self.batch_size]
            new = generate_tokens(model, [encoded[i] for i in idx], max_new_tokens=self.max_new_tokens,
                                  eos_ids=[self.tokenizer.eos_id], should_stop=check)
            for i, toks in zip(idx, new):
                texts[i] = cut_at_stop(decode(toks), stop).strip()
                at_limit[i] = len(toks) >= self.max_new_tokens
        model.train(was_training)
        return texts, at_limit


def make_sampler(responder: Responder, entry: dict):
    """The loop's sample hook: the response to one entry (the first validation entry)."""
    return lambda model: responder(model, [entry])[0][0]


def finish(cfg, result: dict, model, tokenizer, summary: dict, test_entries: list[dict], style: str,
           clock: tuple[float, float]) -> dict:
    """Rank 0 after a completed run: merge LoRA into the saved checkpoint, answer the test split into
    test_responses.json, and write provenance.json last (before/after validation, cost)."""
    t, out = cfg.train, Path(result["out_dir"])
    keep = {k: v for k, v in result.items() if k not in ("stopped", "signal", "out_dir")}
    prov = {**keep, "val_after": {"loss": result.get("val_loss"), **(result.get("val_metrics") or {})}}
    if summary["lora_layers"]:
        merge_lora(model)
        st.publish_final(out, model, tokenizer, prov)
    if t.test_responses and test_entries:
        responder = Responder(tokenizer, style, int(t.max_new_tokens))
        entries = limited(test_entries, t.get("limit_test"))
        t_gen = time.perf_counter()
        responses, at_limit = responder(model, entries, progress=bool(cfg.progress))
        st.write_json(out / "test_responses.json", [
            {"instruction": e["instruction"], "input": e["input"], "output": e["output"], "model_response": r}
            for e, r in zip(entries, responses)])
        prov["test_responses"] = {"file": "test_responses.json", "n": len(entries),
                                  "max_new_tokens": int(t.max_new_tokens), "at_token_limit": sum(at_limit),
                                  "seconds": round(time.perf_counter() - t_gen, 1)}
    prov["wall_s"] = round(time.perf_counter() - clock[0], 1)
    prov["cpu_s"] = round(time.process_time() - clock[1], 1)
    st.write_json(out / "provenance.json", prov)
    return {**result, **prov}


def describe(values: dict | None) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in (values or {}).items() if v is not None) or "n/a"


# --- the recipe ------------------------------------------------------------------------------------

def run(cfg) -> dict:
    from harness.train.loop import rank_world, settings_from, train
    clock = (time.perf_counter(), time.process_time())
    t = cfg.train
    rank, world = rank_world()
    settings = settings_from(cfg)
    # The data first: a bad data file fails here, before the output folder is touched.
    split, data_path = load_split(t, "instruction-data.json")
    train_entries, val_entries = limited(split.train, t.get("limit_train")), limited(split.val, t.get("limit_val"))
    config = OmegaConf.to_container(cfg, resolve=True)
    run_ = st.check_output(cfg.output_dir, config, bool(cfg.resume), bool(cfg.overwrite), name="instruct")

    name = str(cfg.model.name)
    model, tokenizer, parent = load_parent(name)
    style = resolve_style(str(t.prompt_style), bool(tokenizer.chat_template))
    max_length, mask_prompt = context_cap(t, model), bool(t.mask_prompt)

    def examples(entries):
        chat = chat_renderer(tokenizer)
        encoded = [encode_example(tokenizer, build_prompt(e, chat, style), e["output"]) for e in entries]
        kept = [x for x in encoded if has_target(*x, max_length, mask_prompt)]
        return kept, len(encoded) - len(kept)

    (train_ds, skip_train), (val_ds, skip_val) = examples(train_entries), examples(val_entries)
    bs = int(t.batch_size)
    if len(train_ds) < bs * world:
        raise D.DataError(f"{len(train_ds)} training examples make no batch of {bs * world}; "
                          "lower batch_size or raise limit_train")
    lora = OmegaConf.to_container(t.lora, resolve=True) if t.lora else None
    summary = set_trainable(model, lora, settings.seed)

    def collate(items):
        return collate_sft(items, tokenizer.eos_id, max_length, mask_prompt)

    train_batches = D.ShuffledBatches(train_ds, bs, settings.seed, rank, world, collate=collate)
    val_batches = D.EvalBatches(val_ds, bs, rank, world, collate=collate) if val_ds else None
    sample_entry = (val_entries or train_entries)[0]
    sampler = make_sampler(Responder(tokenizer, style, int(t.sample_max_new_tokens)), sample_entry)
    if rank == 0:
        log.info("%s, %s prompts, mask_prompt=%s: %s trainable of %.1fM parameters (%d LoRA layers); "
                 "%d train / %d val examples (%d cut off by max_length=%d); %s", name, style, mask_prompt,
                 f"{summary['trainable_params']:,}", summary["total_params"] / 1e6, summary["lora_layers"],
                 len(train_ds), len(val_ds), skip_train + skip_val, max_length, split.signature)
    provenance = {"recipe": "instruct", "parent": parent, "split": split.signature,
                  "split_sizes": [len(split.train), len(split.val), len(split.test)],
                  # the file the split was cut from: only its train part was trained on (see "split")
                  "split_file": {"path": str(data_path.resolve()), "sha256": sha256_file(data_path)},
                  "prompt_style": style, "mask_prompt": mask_prompt, "lora": lora, "max_length": max_length,
                  "train_examples": len(train_ds), "val_examples": len(val_ds),
                  "skipped_examples": skip_train + skip_val, "trainable": summary}
    result = train(model, sft_loss, train_batches, val_batches, settings, run_, tokenizer=tokenizer,
                   sample_fn=sampler, provenance=provenance, count_tokens=lambda b: int(b["lengths"].sum()))
    if result.get("stopped") or rank != 0:
        return result
    result = finish(cfg, result, model, tokenizer, summary, split.test, style, clock)
    log.info("instruct: validation before training: %s; after: %s; %.1f min wall, %.1f CPU-min; judge the "
             "test split with python -m harness task=instruct model=%s", describe(result.get("val_before")),
             describe(result["val_after"]), result["wall_s"] / 60, result["cpu_s"] / 60, result["out_dir"])
    return result
