"""Supervised finetuning pieces shared by `train=instruct` and `train=dpo` (book ch07 and its DPO bonus).

    ids, prompt_len = encode_example(tokenizer, prompt, response)   # prompt ids are an exact prefix
    batch = collate_sft([(ids, prompt_len), ...], pad_id, max_length, mask_prompt)
    loss = sft_loss(model, batch)                                     # mean CE over unmasked targets
    logps = sequence_logprobs(model, batch["inputs"], batch["targets"], "mean")   # per-row log-prob
    out = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)       # loss + rewards

An example is prompt + response + end-of-text: the tokenizer's EOS id, which for a chat model is the
template's end-of-turn (SmolLM2: `<|im_end|>`), the token generation stops at. Targets are masked by
*position*, not by value, so a pad id equal to EOS never hides the real EOS target.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from harness.cli import UserError

IGNORE = -100   # cross_entropy's ignore_index: padding (and prompt tokens with mask_prompt)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids as generation sees them: BOS first where the tokenizer adds one (TorchLM._encode)."""
    ids = tokenizer.encode(prompt)
    return [tokenizer.bos_id] + ids if tokenizer.add_bos and tokenizer.bos_id is not None else ids


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """(prompt ids + response ids + [EOS], len(prompt ids)). The two parts are tokenized separately,
    so the prompt is exactly the token prefix that generation will continue from."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    return prompt_ids + tokenizer.encode(response) + [tokenizer.eos_id], len(prompt_ids)


def has_target(ids: Sequence[int], prompt_len: int, max_length: int, mask_prompt: bool) -> bool:
    """Whether an example keeps at least one unmasked target after the cut to max_length inputs."""
    first = prompt_len - 1 if mask_prompt else 0       # index of the first unmasked target
    return first < min(len(ids) - 1, max_length)


def collate_sft(items: Sequence[tuple[Sequence[int], int]], pad_id: int, max_length: int | None = None,
                mask_prompt: bool = False) -> dict[str, torch.Tensor]:
    """The book's custom_collate_fn, by position: pad to the longest example in the batch;
    inputs = ids[:-1], targets = ids[1:]; padding targets are IGNORE (the example's own EOS target
    stays, so the model learns to stop); mask_prompt also ignores the targets that are prompt tokens.
    Both are cut to max_length columns. Returns {"inputs", "targets", "lengths" (real input tokens)}."""
    width = max(len(ids) for ids, _ in items) - 1
    if max_length is not None:
        width = min(width, max_length)
    inputs = torch.full((len(items), width), pad_id, dtype=torch.long)
    targets = torch.full((len(items), width), IGNORE, dtype=torch.long)
    lengths = torch.zeros(len(items), dtype=torch.long)
    for r, (ids, prompt_len) in enumerate(items):
        n = min(len(ids) - 1, width)
        row = torch.as_tensor(list(ids[: n + 1]), dtype=torch.long)
        inputs[r, :n], targets[r, :n], lengths[r] = row[:-1], row[1:], n
        if mask_prompt:   # target j predicts ids[j + 1]: a prompt token while j + 1 < prompt_len
            targets[r, : max(0, min(prompt_len - 1, n))] = IGNORE
    return {"inputs": inputs, "targets": targets, "lengths": lengths}


def _target_logits(model, inputs: torch.Tensor, targets: torch.Tensor):
    """Vocabulary logits at the unmasked target positions only ([N, vocab], fp32), their targets
    and row numbers: the head never runs on padding or masked prompt tokens."""
    hidden = model.hidden_states(inputs)
    keep = targets != IGNORE
    return model.logits(hidden[keep]).float(), targets[keep], keep.nonzero()[:, 0]


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the unmasked targets of the batch
    (= cross_entropy(logits, targets, ignore_index=-100) on the full logits)."""
    logits, targets, _ = _target_logits(model, batch["inputs"], batch["targets"])
    if targets.numel() == 0:
        raise UserError("a batch has no unmasked target (every response cut off by max_length); raise max_length")
    return F.cross_entropy(logits, targets)


REDUCTIONS = ("mean", "sum")


def sequence_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-row log-probability of the unmasked targets [B]: their sum, or their mean (the book's DPO
    `compute_logprobs` with a selection mask)."""
    if reduction not in REDUCTIONS:
        raise UserError(f"logprob_reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    logits, tgt, rows = _target_logits(model, inputs, targets)
    token_lp = logits.log_softmax(-1).gather(-1, tgt[:, None]).squeeze(-1)
    total = torch.zeros(inputs.shape[0], dtype=token_lp.dtype, device=token_lp.device).index_add(0, rows, token_lp)
    if reduction == "sum":
        return total
    return total / (targets != IGNORE).sum(1).clamp(min=1).to(total.dtype)


def collate_pairs(items: Sequence[tuple], pad_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Preference pairs ((chosen ids, prompt_len), (rejected ids, prompt_len)) -> one batch of 2B rows,
    the B chosen first, prompts masked, so the policy (and the reference) run one forward each."""
    rows = [chosen for chosen, _ in items] + [rejected for _, rejected in items]
    return collate_sft(rows, pad_id, max_length, mask_prompt=True)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """DPO (Rafailov et al. 2023) from per-pair sequence log-probs [B]:
    loss = mean(-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))); implicit rewards
    beta * (pi - ref); reward_margin = mean(chosen - rejected reward); reward_accuracy = fraction of
    pairs whose chosen reward is strictly greater (ties, e.g. policy == reference, count as wrong)."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"loss": loss, "reward_margin": (chosen - rejected).mean(),
            "reward_accuracy": (chosen > rejected).float().mean(),
            "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}
