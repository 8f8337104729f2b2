"""The training core's CUDA paths: bf16 autocast, flex attention on packed rows (forward and
backward), fused AdamW, regional torch.compile. Skipped without a CUDA device.

Imports only torch, transformers, peft, pytest and the repo's training core (no Prefect, pydantic
or datasets), so it runs unchanged on a bare GPU box; `benchmarks/device_check.sh` runs it there."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tasks.core import trainer
from tasks.core.collate import IGNORE_INDEX, pack_examples
from tasks.core.modeling import unwrap
from tasks.core.train_settings import TrainSettings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def tf32_as_it_was():
    """start_runtime turns TF32 on for the process (what training wants); each test gets the flags
    back as they were, so a later fp32 check is not run on TF32 by accident."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture(scope="module")
def rows(tiny_model_dir) -> trainer.TokenRows:
    """24 examples of 6-24 tokens whose prompts (no loss) and answers differ in length."""
    rng = random.Random(0)
    examples = []
    for _ in range(24):
        length = rng.randint(6, 24)
        prompt = rng.randint(1, length - 2)
        ids = [rng.randrange(3, 300) for _ in range(length)]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return trainer.TokenRows.from_examples(examples)


def session(tiny_model_dir, rows, tmp_path, **changes) -> trainer.Session:
    settings = TrainSettings(max_steps=3, micro_batch_size=4, seed=0, learning_rate=1e-3, **changes)
    spec = trainer.TrainSpec(str(tiny_model_dir), "", str(tmp_path / "out"), str(tmp_path / "ckpt"), settings)
    return trainer.Session(spec, trainer.start_runtime(settings), rows)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_cuda_defaults_are_bf16_flex_attention_and_fused_adamw(method, tiny_model_dir, rows, tmp_path):
    run = session(tiny_model_dir, rows, tmp_path, method=method)
    assert (run.rt.device.type, run.rt.precision) == ("cuda", "bf16")
    assert unwrap(run.model).config._attn_implementation == "flex_attention"
    assert run.batching.row_tokens is None  # flex skips the blocks between examples: one row per micro-batch
    assert run.batching.pad_multiple == trainer.FLEX_BLOCK
    assert run.optimizer.defaults.get("fused") is True
    assert not run.compiled  # 3 steps are too short to repay compilation
    run.model.train()
    losses = [run.step(step)["loss"] for step in range(3)]
    assert all(math.isfinite(loss) for loss in losses)


def test_compiled_steps_match_eager_steps(tiny_model_dir, rows, tmp_path):
    runs = {name: session(tiny_model_dir, rows, tmp_path / name, method="full", compile=name) for name in ("off", "on")}
    assert runs["on"].compiled and not runs["off"].compiled
    losses = {}
    for name, run in runs.items():
        run.model.train()
        losses[name] = [run.step(step)["loss"] for step in range(3)]
    assert losses["on"] == pytest.approx(losses["off"], rel=2e-2)  # bf16 kernels round differently


def test_flex_attention_packed_rows_give_solo_logits_and_gradients(tiny_model_dir):
    """Forward and backward: the packed row's loss and gradients are the sum of its examples', in
    true fp32 (TF32 off: its 10-bit mantissa would need a looser tolerance than 1e-4)."""
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def fresh(attention: str):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=attention, dtype=torch.float32)
        return model.cuda().train()

    examples = [list(range(3 + n, 3 + 2 * n)) for n in (9, 4, 17)]
    packed = pack_examples([{"input_ids": ids, "labels": ids} for ids in examples])
    flex, reference = fresh("flex_attention"), fresh("sdpa")
    row = flex(input_ids=packed["input_ids"].cuda(), position_ids=packed["position_ids"].cuda(), labels=packed["labels"].cuda(), use_cache=False)
    row_loss = row.loss * (len(packed["labels"][0]) - len(examples))  # mean -> sum over the targets
    row_loss.backward()
    solo_loss = 0.0
    start = 0
    for ids in examples:
        alone = reference(input_ids=torch.tensor([ids]).cuda(), labels=torch.tensor([ids]).cuda(), use_cache=False)
        torch.testing.assert_close(row.logits[0, start : start + len(ids)], alone.logits[0], atol=1e-3, rtol=1e-3)
        (alone.loss * (len(ids) - 1)).backward()
        solo_loss += alone.loss.item() * (len(ids) - 1)
        start += len(ids)
    assert row_loss.item() == pytest.approx(solo_loss, rel=1e-4)
    for (name, p_flex), (_, p_ref) in zip(flex.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p_flex.grad, p_ref.grad, atol=1e-4, rtol=1e-3, msg=name)
