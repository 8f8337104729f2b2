"""Scoring a model on held-out rows: response-only loss and greedy answers. No Prefect here.

Loss and perplexity are token-weighted over the response tokens (labels != IGNORE_INDEX), with
rows packed as in training. Answers are greedy and batched with left padding; the prompt is what
preceded the last answer in training (`prompt_ids`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from tasks.core import collate, formatting, metrics, modeling

if TYPE_CHECKING:
    from schemas.config import TemplateOptions

LOSS_METRICS = ("eval_loss", "perplexity")
REPORTED = (*LOSS_METRICS, *metrics.TEXT_METRICS, *metrics.TOOL_METRICS)


@torch.no_grad()
def response_loss(model, examples: Sequence[dict], batch_size: int) -> dict[str, Any]:
    """Token-weighted loss over response tokens. `batch_size` examples are packed into one row per
    forward pass, positions restarting per example, as in training (use_cache=False keeps packed
    examples independent); logits are computed only where a label carries loss."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate.pack_examples(examples[start : start + batch_size])
        targets = batch["labels"][0, 1:]
        keep = targets != collate.IGNORE_INDEX  # position i predicts token i + 1; the last predicts nothing
        if not keep.any():
            continue
        positions = keep.nonzero().squeeze(1)  # one row: flat index = position
        with modeling.logits_only_at(model, positions.to(device)):
            logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device), use_cache=False).logits
        total_nll += F.cross_entropy(logits.float(), targets[keep].to(device), reduction="sum").item()
        total_tokens += int(keep.sum())
    loss = total_nll / total_tokens if total_tokens else None
    return {
        "eval_loss": loss,
        "perplexity": safe_exp(loss) if loss is not None else None,
        "eval_tokens": total_tokens,
        "eval_examples": len(examples),
    }


def safe_exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding (the pad id may equal EOS: padding is excluded by
    the attention mask, and each answer is cut at its first end-of-sequence token)."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stop_ids, use_cache=True
    )
    answers = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = _left_padded(prompts[start : start + batch_size], pad_id)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config)
        for row in output[:, input_ids.shape[1] :].tolist():
            cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def _left_padded(chunk: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in chunk)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, ids in enumerate(chunk):
        input_ids[row, width - len(ids) :] = torch.as_tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and every EOS the model's generation config names, in that order."""
    ids = []
    configured = getattr(modeling.unwrap(model).generation_config, "eos_token_id", None)
    for value in [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]:
        if value is not None and value not in ids:
            ids.append(int(value))
    if not ids:
        raise ValueError("the tokenizer has no EOS token and the model's generation config names none")
    return ids


def prompt_ids(
    messages: list[dict], tokenizer, template: TemplateOptions, max_new_tokens: int, tools: list[dict] | None = None
) -> list[int]:
    """The prompt of a held-out row's last answer, cut so that prompt and answer fit max_length.
    `tools` are the row's tool definitions, rendered as in training so the model sees what it may call."""
    ids = formatting.render_prompt_ids(messages, tokenizer, template, tools=tools)
    room = max(1, template.max_length - max_new_tokens)
    return ids[-room:]  # an over-long prompt keeps its end, where the question and generation prompt are


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def delta(base: dict, tuned: dict) -> dict:
    """tuned - base for every reported metric that both have as a finite number."""
    return {k: tuned[k] - base[k] for k in REPORTED if finite(base.get(k)) and finite(tuned.get(k))}
