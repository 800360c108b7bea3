"""Pretraining recipe (`train=pretrain`): next-token prediction on plain text.

The model is built from scratch (`model.arch` + a named config + `model.overrides`) or continued
from any loadable model (`init_from`: a registry name, checkpoint folder, HF folder or .gguf). The
corpus is tokenized once into a cached memmap, cut into sliding windows, split train/val by fraction.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from harness.cli import UserError
from harness.train import data as D
from harness.train.loop import rank_world, settings_from, train
from harness.train.state import check_output
from models.architectures import lookup
from models.checkpoint import CheckpointError, build_model, load_weights
from models.shapes import check_fits

log = logging.getLogger("harness.train")


def lm_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy; logits in fp32 whatever the autocast dtype."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def load_tokenizer_for(spec: str):
    """`gpt2`, or the tokenizer of a model name / checkpoint folder / .gguf file."""
    from models.registry import MODELS, fetch
    from models.tokenizer import gguf_tokenizer, gpt2_tokenizer, load_tokenizer
    if spec == "gpt2" or (spec in MODELS and MODELS[spec].kind in ("init", "hf")):
        return gpt2_tokenizer()
    path = fetch(spec) if spec in MODELS else Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"tokenizer {spec!r}: not gpt2, a model name or an existing path")
    return gguf_tokenizer(path) if path.suffix == ".gguf" else load_tokenizer(path)


def build(cfg) -> tuple[torch.nn.Module, object, dict | None]:
    """(model, tokenizer, parent) from `model.*` / `init_from`."""
    from models.registry import load_model
    t, want_arch = cfg.train, cfg.train.model.arch
    overrides = OmegaConf.to_container(t.model.overrides, resolve=True) if t.model.overrides else {}
    if t.init_from:
        model, tokenizer, info = load_model(str(t.init_from))
        if want_arch and want_arch != model.architecture:
            raise CheckpointError(f"init_from {t.init_from} is a {model.architecture} model but model.arch={want_arch}; "
                                  f"set model.arch={model.architecture} (or null to take it from the checkpoint)")
        if overrides:  # e.g. dropout: rebuild with the new config, then load the same weights
            try:
                config = dataclasses.replace(model.config, **overrides)
            except TypeError as e:
                raise UserError(f"model.overrides: {e}") from None
            state = model.state_dict()
            # Shapes on the meta device first: an override that resizes the model is refused before
            # a model of the new size is allocated.
            check_fits(model.architecture, config, state, "model.overrides", str(t.init_from),
                       "override only settings that keep the shapes (dropout, norm_eps, ...)")
            model = build_model(model.architecture, config, "model.overrides")
            load_weights(model, state, str(t.init_from))
        parent = {"name": str(t.init_from), "checkpoint_sha": info.get("checkpoint_sha"),
                  "provenance": info.get("provenance") or None}
        return model, tokenizer, parent
    named = lookup(want_arch, "model.arch").configs
    if t.model.config not in named:
        raise UserError(f"unknown {want_arch} config {t.model.config!r}; known: {', '.join(named)}")
    tokenizer = load_tokenizer_for(str(t.tokenizer))
    config = {**named[t.model.config], "context_length": int(t.context_length),
              "vocab_size": tokenizer.vocab_size, **overrides}
    if config["vocab_size"] < tokenizer.vocab_size:
        raise UserError(f"model vocab_size {config['vocab_size']} < the tokenizer's {tokenizer.vocab_size}")
    model = build_model(want_arch, config, f"model.config={t.model.config} with model.overrides")
    init = t.model.get("init") or "default"
    if init not in ("default", "book"):
        raise UserError(f"model.init must be default (the architecture's own) or book, got {init!r}")
    if init == "book":
        book_init(model)
    return model, tokenizer, None


def book_init(model: torch.nn.Module) -> None:
    """The book's GPTModel init (PyTorch defaults): uniform +-1/sqrt(fan_in) Linear layers and N(0, 1)
    embeddings. Its large embeddings let a small corpus be memorised in a few epochs, which the book's
    ch05 numbers show; GPT-2's init (std 0.02) plateaus near train loss 6 on the-verdict. Needs an
    untied head (tie_embeddings: false): N(0, 1) weights as the vocabulary head give huge logits."""
    if getattr(model, "head", None) is None:
        raise UserError("model.init=book needs model.overrides.tie_embeddings=false (the book's separate out_head)")
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.reset_parameters()


def make_sampler(tokenizer, prompt: str, max_new_tokens: int):
    from models.generate import generate_tokens
    ids = tokenizer.encode(prompt)

    def sample(model) -> str:
        new = generate_tokens(model, [ids], max_new_tokens=max_new_tokens, eos_ids=[tokenizer.eos_id])[0]
        return prompt + tokenizer.decode(new)
    return sample


def run(cfg) -> dict:
    t = cfg.train
    rank, world = rank_world()
    settings = settings_from(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    run_ = check_output(cfg.output_dir, config, cfg.resume, cfg.overwrite, name=str(t.recipe))
    torch.manual_seed(settings.seed)   # the same initial weights for the same seed
    model, tokenizer, parent = build(cfg)
    ctx, stride = int(t.context_length), int(t.stride or t.context_length)
    if ctx > model.config.context_length:
        raise UserError(f"context_length {ctx} exceeds the model's context ({model.config.context_length})")
    files = D.resolve_files(list(t.data) if OmegaConf.is_list(t.data) else [str(t.data)])
    tokens, infos = D.token_cache(files, tokenizer, t.cache_dir, write=rank == 0)
    train_tok, val_tok = D.split(tokens, float(t.val_fraction))
    train_ds, val_ds = D.Windows(train_tok, ctx, stride), D.Windows(val_tok, ctx, stride)
    need = int(t.batch_size) * world
    what = f"{', '.join(f.name for f in files)} ({len(tokens)} tokens; {len(train_tok)} for training)"
    if len(train_ds) < need:
        raise D.DataError(f"corpus {what} is too short: it makes {len(train_ds)} training windows of "
                          f"{ctx}+1 tokens (stride {stride}), a batch needs {need}; use more text or a smaller "
                          "context_length / stride / batch_size")
    if t.val_fraction and len(val_ds) == 0:
        raise D.DataError(f"corpus {what} is too short: its validation split ({len(val_tok)} tokens) holds no "
                          f"window of {ctx}+1 tokens; raise val_fraction or lower context_length")
    train_batches = D.ShuffledBatches(train_ds, int(t.batch_size), settings.seed, rank, world)
    val_batches = D.EvalBatches(val_ds, int(t.batch_size), rank, world) if len(val_ds) else None
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        log.info("%s model, %.1fM parameters; %d train / %d val windows of %d tokens", model.architecture,
                 n_params / 1e6, len(train_ds), len(val_ds), ctx)
    sample_fn = make_sampler(tokenizer, str(t.sample.prompt), int(t.sample.max_new_tokens)) if t.sample.prompt else None
    provenance = {"recipe": "pretrain", "parent": parent, "data": infos, "n_params": n_params,
                  "train_windows": len(train_ds), "val_windows": len(val_ds)}
    return train(model, lm_loss, train_batches, val_batches, settings, run_, tokenizer=tokenizer,
                 sample_fn=sample_fn, provenance=provenance)
