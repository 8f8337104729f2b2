"""Building model inputs from the one-row-per-example store.

Packing happens here, at batch time, never in the stored dataset. A packed row restarts
`position_ids` at every example; transformers turns restarting positions into a block-diagonal
attention mask (sdpa, flex and flash attention alike), so no example can attend to another."""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100  # label value that carries no loss (prompt, padding, packing boundaries)


def pack_examples(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row of batch size 1.

    >>> pack_examples([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...                {"input_ids": [8, 9], "labels": [8, 9]}])
    {'input_ids': tensor([[5, 6, 7, 8, 9]]),
     'labels': tensor([[-100, 6, 7, -100, 9]]),
     'position_ids': tensor([[0, 1, 2, 0, 1]])}

    The first label of every example is masked: the model shifts labels by one, so that label
    would be predicted from the previous example's last token.
    """
    input_ids, labels, positions = [], [], []
    for example in examples:
        ids = list(example["input_ids"])
        input_ids.extend(ids)
        labels.extend([IGNORE_INDEX, *list(example["labels"])[1:]])
        positions.extend(range(len(ids)))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }


def pad_row(batch: dict[str, torch.Tensor], multiple: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """One packed row padded to a multiple of `multiple` tokens, the padding a segment of its own
    (positions restart, labels ignored), so no real token attends to it. Compiled kernels then see
    few distinct lengths instead of a new one at every step.

    >>> pad_row(pack_examples([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]), 4, pad_token_id=0)
    {'input_ids': tensor([[5, 6, 7, 0]]),
     'labels': tensor([[-100, 6, 7, -100]]),
     'position_ids': tensor([[0, 1, 2, 0]])}
    """
    width = batch["input_ids"].shape[1]
    return _pad_to(batch, width + -width % multiple, pad_token_id)


def _pad_to(row: dict[str, torch.Tensor], width: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """A packed row (batch of one) padded to `width` with a padding segment of its own."""
    missing = width - row["input_ids"].shape[1]
    if not missing:
        return row
    fill = {"input_ids": torch.full((1, missing), pad_token_id), "labels": torch.full((1, missing), IGNORE_INDEX),
            "position_ids": torch.arange(missing).unsqueeze(0)}
    return {name: torch.cat([row[name], fill[name].long()], dim=1) for name in row}


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` (an item longer than that gets
    a row of its own): longest first, each into the first row it fits."""
    rows: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, load in enumerate(loads) if load + lengths[i] <= capacity), None)
        if row is None:
            rows.append([]), loads.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        loads[row] += lengths[i]
    return rows


def packed_shape(lengths: Sequence[int], capacity: int) -> tuple[int, int]:
    """(rows, width) of pack_rows' output for examples of these lengths."""
    rows = first_fit_decreasing(lengths, capacity)
    return len(rows), max(sum(lengths[i] for i in row) for row in rows)


def pack_rows(examples: Sequence[dict], row_tokens: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pack examples into rows of at most `row_tokens` tokens (first-fit decreasing), then pad the
    rows to the longest one. Capped rows keep attention's cost at rows x row_tokens^2 for kernels
    that compute the masked blocks too (sdpa): one row of a whole micro-batch would be quadratic
    in all its tokens. An example longer than `row_tokens` gets a row of its own.

    >>> pack_rows([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...            {"input_ids": [8, 9], "labels": [8, 9]},
    ...            {"input_ids": [4], "labels": [4]}], row_tokens=4, pad_token_id=0)
    {'input_ids': tensor([[5, 6, 7, 4], [8, 9, 0, 0]]),
     'labels': tensor([[-100, 6, 7, -100], [-100, 9, -100, -100]]),
     'position_ids': tensor([[0, 1, 2, 0], [0, 1, 0, 1]])}

    Padding is a segment of its own (positions restart), so no real token attends to it.
    """
    layout = first_fit_decreasing([len(e["input_ids"]) for e in examples], row_tokens)
    rows = [pack_examples([examples[i] for i in row]) for row in layout]
    width = max(row["input_ids"].shape[1] for row in rows)
    padded = [_pad_to(row, width, pad_token_id) for row in rows]
    return {name: torch.cat([row[name] for row in padded]) for name in padded[0]}


def pad_examples(examples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad examples into a rectangular batch; padding is masked out of attention and loss.

    >>> pad_examples([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...               {"input_ids": [8, 9], "labels": [-100, 9]}], pad_token_id=0)
    {'input_ids': tensor([[5, 6, 7], [8, 9, 0]]),
     'labels': tensor([[-100, 6, 7], [-100, 9, -100]]),
     'attention_mask': tensor([[1, 1, 1], [1, 1, 0]])}

    The pad id may equal EOS: padding is excluded by the attention mask and IGNORE_INDEX labels,
    never by token id, so a real EOS keeps its loss.
    """
    longest = max(len(example["input_ids"]) for example in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.as_tensor(example["input_ids"])
        labels[row, :length] = torch.as_tensor(example["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
