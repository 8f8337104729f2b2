"""Packing and padding: exact tensors, and packed examples that cannot see each other."""

from __future__ import annotations

import pytest
import torch

from tasks.core.collate import IGNORE_INDEX, pack_examples, pack_rows, pad_examples
from tasks.core.modeling import logits_only_at
from tasks.core.trainer import TokenRows, make_batch

EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
    {"input_ids": [8, 9], "labels": [8, 9]},
]


def test_pack_examples_restarts_positions_and_masks_boundaries():
    batch = pack_examples(EXAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_pack_rows_fills_capped_rows_first_fit_decreasing_and_pads_them_as_their_own_segment():
    examples = [{"input_ids": [10 + n] * n, "labels": [10 + n] * n} for n in (2, 5, 3, 4, 1)]
    batch = pack_rows(examples, row_tokens=6, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[15] * 5 + [11], [14] * 4 + [12] * 2, [13] * 3 + [0] * 3]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"].tolist()[2] == [IGNORE_INDEX, 13, 13] + [IGNORE_INDEX] * 3
    alone = pack_rows([{"input_ids": [7] * 9, "labels": [7] * 9}, *examples[:1]], row_tokens=6, pad_token_id=0)
    assert alone["input_ids"].shape == (2, 9)  # too long for a row: a row of its own


def test_pad_examples_masks_padding_by_mask_not_by_id():
    batch = pad_examples(EXAMPLES, pad_token_id=9)  # pad == a real token id (as pad == eos)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, 9, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("packing", [True, False])
def test_make_batch_keeps_only_positions_whose_next_token_has_loss(packing):
    rows = TokenRows.from_examples(EXAMPLES)
    assert rows.loss_tokens.tolist() == [2, 1]  # label 0 of an example is never a target
    batch = make_batch(rows, [0, 1], packing, pad_token_id=0, device=torch.device("cpu"))
    if packing:  # one row [5, 6, 7, 8, 9]: positions 0, 1 predict 6, 7; position 3 predicts 9
        assert batch.positions.tolist() == [0, 1, 3]
    else:  # rows [5, 6, 7] and [8, 9, pad]: flat positions 0, 1 and 3 (row 1, position 0)
        assert batch.positions.tolist() == [0, 1, 3]
    assert batch.targets.tolist() == [6, 7, 9]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def test_packed_examples_have_their_solo_logits(tiny_llama):
    """Each example's logits inside a packed row equal its logits run alone: attention is
    block-diagonal, positions restart, nothing leaks between examples."""
    generator = torch.Generator().manual_seed(0)
    lengths = [7, 3, 12, 5]
    examples = [torch.randint(3, tiny_llama.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    packed = pack_examples([{"input_ids": ids, "labels": ids} for ids in examples])
    with torch.no_grad():
        row = tiny_llama(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for ids in examples:
            alone = tiny_llama(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(row[start : start + len(ids)], alone, atol=1e-4, rtol=1e-4)
            start += len(ids)


def test_capped_packed_rows_keep_solo_logits(tiny_llama):
    """Several padded rows per micro-batch (the sdpa layout): every example still sees only itself."""
    generator = torch.Generator().manual_seed(1)
    examples = [torch.randint(3, tiny_llama.config.vocab_size, (n,), generator=generator).tolist() for n in (7, 3, 12, 5, 8)]
    batch = pack_rows([{"input_ids": ids, "labels": ids} for ids in examples], row_tokens=12, pad_token_id=0)
    assert batch["input_ids"].shape == (3, 12)
    with torch.no_grad():
        logits = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    found, pads = 0, 0
    for row, positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, position in enumerate(positions) if position == 0] + [len(positions)]
        for begin, end in zip(starts, starts[1:]):
            ids = batch["input_ids"][row, begin:end].tolist()
            if ids not in examples:
                assert set(ids) == {0}  # the padding segment
                pads += 1
                continue
            with torch.no_grad():
                alone = tiny_llama(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[row, begin:end], alone, atol=1e-4, rtol=1e-4)
            found += 1
    assert (found, pads) == (len(examples), 1)


@pytest.mark.parametrize("packing", [True, False])
def test_logits_only_at_the_kept_positions(packing, tiny_llama):
    """The LM-head hook returns exactly the kept rows of the full logits, for one packed row and for
    padded rows, and leaves the model as it was."""
    rows = TokenRows.from_examples([{"input_ids": [11, 12, 13, 14], "labels": [-100, -100, 13, 14]}, *EXAMPLES])
    batch = make_batch(rows, [0, 1, 2], packing=packing, pad_token_id=0, device=torch.device("cpu"))
    with torch.no_grad():
        with logits_only_at(tiny_llama, batch.positions):
            kept = tiny_llama(**batch.inputs, use_cache=False).logits
        full = tiny_llama(**batch.inputs, use_cache=False).logits
    torch.testing.assert_close(kept, full.flatten(0, 1)[batch.positions], atol=1e-5, rtol=1e-5)
    assert batch.targets.tolist() == [13, 14, 6, 7, 9] and kept.shape[0] == 5
    assert not tiny_llama.lm_head._forward_pre_hooks  # the hook is gone after the block


def test_a_model_without_output_embeddings_is_refused_clearly():
    class Headless(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match="no output embeddings"):
        with logits_only_at(Headless(), torch.tensor([0])):
            pass
