"""The train stage and the training loop on the tiny Llama: LoRA and full, the cache key, the
options the trainer reads, accumulation, compilation, out-of-memory retries, divergence.
Resuming is in tests/test_checkpoints.py, torchrun in tests/test_launcher.py.

Every run is a few steps on a 2-layer width-64 model, one CPU thread per process (oversubscribed
intra-op threads make tiny steps 10-50x slower on a busy machine)."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

from schemas.config import LoraOptions, TrainOptions
from tasks.core import storage, trainer
from tasks.core.train_settings import LoraSettings, TrainSettings
from tasks.train import NOT_IN_KEY, checkpoint_url, train_entry, train_model, train_task
from tests.conftest import assert_same_weights
from tests.conftest import train_options as options

# ------------------------------------------------------------------------------ one code path


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_changes_trainable_and_only_trainable_parameters(method, tiny_base, tiny_tokenized, tmp_path):
    settings = options(method=method, learning_rate=1e-2 if method == "lora" else 1e-3).settings()
    spec = trainer.TrainSpec(tiny_base.uri, tiny_tokenized.uri, str(tmp_path / "out"), str(tmp_path / "ckpt"), settings)
    session = trainer.Session(spec, trainer.start_runtime(settings), trainer.load_rows(tiny_tokenized.uri))
    before = {name: p.detach().clone() for name, p in session.model.named_parameters()}
    session.model.train()
    for step in range(3):
        session.step(step)
    trainable = {name for name, p in session.model.named_parameters() if p.requires_grad}
    changed = {name for name, p in session.model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert changed == trainable
    if method == "lora":
        assert trainable and all("lora_" in name for name in trainable)
        assert len(trainable) < len(before)
    else:
        assert trainable == set(before)


def test_train_model_outputs_curve_stats_and_store_hit(tiny_base, tiny_tokenized, tmp_path):
    events = []
    result = train_model(tiny_tokenized, tiny_base, options(checkpoint_every=2), str(tmp_path), progress=events.append)
    folder = Path(result.uri)
    assert storage.is_complete(result.uri) and not result.store_hit
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert (folder / "adapter" / "adapter_config.json").is_file()
    curve = storage.read_json(result.loss_curve_uri)
    assert [r["step"] for r in curve] == [1, 2, 3]
    assert set(curve[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "loss_tokens", "elapsed_s"}
    assert curve[-1]["tokens"] > curve[0]["tokens"] > curve[0]["loss_tokens"] > 0
    assert [r["lr"] for r in curve] == pytest.approx([1e-2 * trainer.lr_factor(s, 3, 0, "cosine") for s in range(3)])
    stats = result.stats
    assert stats["steps"] == 3 and stats["final_loss"] == curve[-1]["loss"]
    assert (stats["tokens"], stats["loss_tokens"]) == (curve[-1]["tokens"], curve[-1]["loss_tokens"])
    assert stats["device"] == "cpu" and stats["precision"] == "fp32" and stats["resumed_from_step"] == 0
    assert stats["tokens_per_s"] > stats["loss_tokens_per_s"] > 0 and stats["peak_memory_gib"] > 0
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert not storage.exists(checkpoint_url(str(tmp_path), result.key))  # removed once published
    again = train_model(tiny_tokenized, tiny_base, options(checkpoint_every=2), str(tmp_path))
    assert again.store_hit and again.key == result.key and again.stats == stats


def test_full_fine_tuning_saves_a_loadable_model(tiny_base, tiny_tokenized, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train_model(tiny_tokenized, tiny_base, options(method="full", max_steps=2), str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(Path(result.uri) / "model"))
    assert model.config.use_cache is True  # turned off for packed training only
    assert (Path(result.uri) / "model" / "tokenizer.json").is_file()


def test_key_ignores_placement_but_not_numerics(tiny_base, tiny_tokenized):
    key = train_entry(tiny_tokenized, tiny_base, options(), "c")[0]
    placement = dict(node_rank=1, rdzv_endpoint="10.0.0.1:1", checkpoint_every=7, keep_checkpoints=5, gradient_checkpointing="on",
                     micro_batch_tokens=64)
    assert set(placement) == set(NOT_IN_KEY)
    assert train_entry(tiny_tokenized, tiny_base, options(**placement), "c")[0] == key
    assert train_entry(tiny_tokenized, tiny_base, options(devices=2), "c")[0] != key
    assert train_entry(tiny_tokenized, tiny_base, options(learning_rate=2e-2), "c")[0] != key
    assert train_entry(tiny_tokenized, tiny_base, options(lora=LoraOptions(r=4, alpha=8.0, target_modules=["q_proj"])), "c")[0] != key
    assert train_entry(tiny_tokenized, tiny_base, options(), "c", trust_remote_code=True)[0] != key  # it can pick other code
    # The batch counts as its effective size: 4 x 2 trains what 8 x 1 trains (tested below).
    eight = train_entry(tiny_tokenized, tiny_base, options(micro_batch_size=8, grad_accum=1), "c")[0]
    assert train_entry(tiny_tokenized, tiny_base, options(micro_batch_size=4, grad_accum=2), "c")[0] == eight
    assert train_entry(tiny_tokenized, tiny_base, options(micro_batch_size=4, grad_accum=1), "c")[0] != eight


# --------------------------------------------------------------------------- what the trainer reads


def test_the_trainers_settings_have_the_options_names_and_defaults():
    """TrainOptions (pydantic) takes its defaults from TrainSettings, the dataclass the trainer
    reads on GPU boxes without pydantic: one declaration, the same names, the same values."""
    assert list(TrainOptions.model_fields) == [f.name for f in fields(TrainSettings)]
    assert list(LoraOptions.model_fields) == [f.name for f in fields(LoraSettings)]
    assert TrainOptions().settings() == TrainSettings()
    assert TrainOptions().model_dump(mode="json") == json.loads(json.dumps(asdict(TrainSettings())))


def test_settings_carry_every_option_and_survive_json():
    opts = options(method="full", lora=LoraOptions(r=2, alpha=3.0, dropout=0.1, target_modules=["q_proj"]), devices=2, packing=False)
    settings = opts.settings()
    assert settings.lora == LoraSettings(r=2, alpha=3.0, dropout=0.1, target_modules=("q_proj",))
    assert json.loads(json.dumps(asdict(settings))) == opts.model_dump(mode="json")
    assert TrainSettings.from_dict(json.loads(json.dumps(asdict(settings)))) == settings
    with pytest.raises(TypeError, match="unknown"):
        TrainSettings.from_dict({**asdict(settings), "unknown": 1})


@pytest.mark.parametrize("method, learning_rate, peak", [("lora", None, 1e-3), ("full", None, 2e-5), ("full", 0.5, 0.5)])
def test_peak_learning_rate_defaults_by_method(method, learning_rate, peak):
    opts = options(method=method, learning_rate=learning_rate)
    assert opts.peak_learning_rate == opts.settings().peak_learning_rate == peak


# ------------------------------------------------------------------------------------- the loop


def test_data_order_is_pure_and_ranks_are_disjoint():
    order = trainer.DataOrder(10, seed=3)
    batches = [trainer.DataOrder(10, seed=3).global_batch(step, 4) for step in range(5)]
    assert batches == [order.global_batch(step, 4) for step in range(5)]
    assert sorted(sum(batches[:2], []) + batches[2][:2]) == list(range(10))  # one epoch, then the next
    one_each = trainer.Batching(packing=True, pad_token_id=0, micro_examples=1)
    shares = [one_each.rank_micro_batches(batches[0], [5] * 10, rank, 2) for rank in range(2)]
    assert shares == [[[batches[0][0]], [batches[0][1]]], [[batches[0][2]], [batches[0][3]]]]


def test_epochs_decide_the_step_count_without_max_steps(tiny_tokenized):
    rows = trainer.load_rows(tiny_tokenized.uri)
    plan = trainer.plan_steps(rows, options(max_steps=None, epochs=2.0, micro_batch_size=4, grad_accum=2).settings(), world=1)
    assert (plan.global_batch, plan.total_steps) == (8, 6)  # 2 epochs x 24 rows / 8


@pytest.mark.parametrize(
    "packing, row_tokens, pad_multiple, micro_tokens",
    [(True, 24, 1, None), (True, 30, 1, None), (True, None, 1, None), (True, None, 16, None), (False, None, 1, None),
     (True, None, 1, 40), (False, None, 1, 40)],
)
def test_memory_estimate_is_the_largest_batch_tensor_of_the_run(packing, row_tokens, pad_multiple, micro_tokens, tiny_tokenized):
    """The estimate equals the biggest input tensor make_batch builds over every step of the run
    (capped rows padded to their widest, one packed row padded to whole blocks, padded examples,
    each with and without a token budget)."""
    rows = trainer.load_rows(tiny_tokenized.uri)
    settings = options(max_steps=5, micro_batch_size=4, grad_accum=2, packing=packing, micro_batch_tokens=micro_tokens).settings()
    batching = trainer.Batching(packing, 0, 4, micro_tokens, row_tokens, pad_multiple)
    plan = trainer.plan_steps(rows, settings, world=1)
    order = trainer.DataOrder(len(rows), settings.seed)
    micro_batches = [
        micro for step in range(plan.total_steps)
        for micro in batching.rank_micro_batches(order.global_batch(step, plan.global_batch), rows.lengths, 0, 1)
    ]
    sizes = [batching.build(rows, micro, torch.device("cpu")).inputs["input_ids"].numel() for micro in micro_batches]
    assert trainer.largest_micro_batch(rows, plan, settings, batching) == max(sizes)
    if micro_tokens:  # the budget binds: more micro-batches than 2 a step, each within it unless one example is longer
        assert len(micro_batches) > 2 * plan.total_steps
        assert all(size <= micro_tokens for size, micro in zip(sizes, micro_batches) if len(micro) > 1)


def test_token_budget_cuts_micro_batches_and_an_example_longer_than_it_goes_alone():
    lengths = [10, 30, 5, 50, 7, 8]
    packed = trainer.Batching(packing=True, pad_token_id=0, micro_examples=4, micro_tokens=40)
    assert packed.cut(range(6), lengths) == [[0, 1], [2], [3], [4, 5]]
    padded = trainer.Batching(packing=False, pad_token_id=0, micro_examples=4, micro_tokens=40)
    assert padded.cut(range(6), lengths) == [[0], [1], [2], [3], [4, 5]]  # 2 x 30 slots > 40
    unbounded = trainer.Batching(packing=True, pad_token_id=0, micro_examples=4)
    assert unbounded.cut(range(6), lengths) == [[0, 1, 2, 3], [4, 5]]


def test_fsdp_ranks_run_the_same_number_of_micro_batches():
    """Every FSDP forward is a collective: a rank with fewer micro-batches pads with empty ones."""
    lengths = [30, 30, 30, 5, 5, 5]
    batching = trainer.Batching(packing=True, pad_token_id=0, micro_examples=3, micro_tokens=40)
    assert batching.rank_micro_batches(range(6), lengths, 0, 2) == [[0], [1], [2]]
    assert batching.rank_micro_batches(range(6), lengths, 1, 2) == [[3, 4, 5]]
    assert batching.rank_micro_batches(range(6), lengths, 1, 2, aligned=True) == [[3, 4, 5], [], []]


def test_token_budget_trains_the_same_weights(tiny_base, tiny_tokenized, tmp_path):
    """A budget that cuts every step into more micro-batches changes memory, not the result."""
    common = dict(method="full", max_steps=3, micro_batch_size=8, seed=0)
    rows, order = trainer.load_rows(tiny_tokenized.uri), trainer.DataOrder(24, seed=0)
    cut = trainer.Batching(packing=True, pad_token_id=0, micro_examples=8, micro_tokens=48)
    assert all(len(cut.cut(order.global_batch(step, 8), rows.lengths)) > 1 for step in range(3))  # every step is cut
    whole = train_model(tiny_tokenized, tiny_base, options(**common, micro_batch_tokens=None), str(tmp_path / "whole"))
    cut = train_model(tiny_tokenized, tiny_base, options(**common, micro_batch_tokens=48), str(tmp_path / "cut"))
    assert whole.key == cut.key  # the budget is not part of the cache key
    losses = lambda artifact: [r["loss"] for r in json.loads((Path(artifact.uri) / "loss_curve.json").read_text())]  # noqa: E731
    assert losses(cut) == pytest.approx(losses(whole), rel=1e-5)


def test_schedule_warms_up_then_decays():
    factors = [trainer.lr_factor(step, 10, 2, "cosine") for step in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0 and factors[-1] < 0.05
    assert trainer.lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)
    assert [trainer.lr_factor(step, 10, 2, "constant") for step in range(2, 10)] == [1.0] * 8


# ------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("packing", [True, False])
def test_accumulation_equals_a_bigger_batch(packing, tiny_base, tiny_tokenized, tmp_path):
    """micro 4 x accum 2 == micro 8 x accum 1: the loss is normalised by the loss tokens of the
    whole accumulated batch, not averaged per micro-batch (the examples' loss counts differ)."""
    counts = trainer.load_rows(tiny_tokenized.uri).loss_tokens
    assert len(set(counts.tolist())) > 5
    common = dict(method="full", learning_rate=1e-3, packing=packing)
    accumulated = train_model(tiny_tokenized, tiny_base, options(micro_batch_size=4, grad_accum=2, **common), str(tmp_path / "a"))
    single = train_model(tiny_tokenized, tiny_base, options(micro_batch_size=8, grad_accum=1, **common), str(tmp_path / "b"))
    assert not accumulated.store_hit and not single.store_hit  # both really trained
    assert_same_weights(accumulated, single)
    losses = lambda r: [x["loss"] for x in storage.read_json(r.loss_curve_uri)]  # noqa: E731
    assert losses(accumulated) == pytest.approx(losses(single), rel=1e-5)


def test_compiled_training_matches_eager(tiny_base, tiny_tokenized, tmp_path):
    """Regional torch.compile (each decoder layer, dynamic shapes for packed rows) is the GPU
    default for long runs; on CPU it compiles with inductor too and must train the same steps."""
    common = dict(method="full", learning_rate=1e-3, max_steps=3)
    eager = train_model(tiny_tokenized, tiny_base, options(compile="off", **common), str(tmp_path / "eager"))
    compiled = train_model(tiny_tokenized, tiny_base, options(compile="on", **common), str(tmp_path / "compiled"))
    assert (eager.stats["compiled"], compiled.stats["compiled"]) == (False, True)
    assert eager.key != compiled.key  # compiled kernels round differently: not interchangeable
    losses = lambda r: [x["loss"] for x in storage.read_json(r.loss_curve_uri)]  # noqa: E731
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-5)
    assert_same_weights(compiled, eager)


# ------------------------------------------------------------------------------------ the stage


def test_train_task_outside_a_flow(tiny_base, tiny_tokenized, tmp_path):
    """The Prefect wrapper's progress callback is harmless without a flow run."""
    result = train_task.fn(tiny_tokenized, tiny_base, options(max_steps=1), str(tmp_path))
    assert result.stats["steps"] == 1 and json.loads(Path(result.uri, "train_stats.json").read_text())["steps"] == 1


def test_trust_remote_code_reaches_the_training_process(tiny_base, tiny_tokenized, tmp_path, monkeypatch):
    """Off unless the config says so: a model repository's own code runs only when asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    for auto in (AutoModelForCausalLM, AutoTokenizer):
        real = auto.from_pretrained.__func__
        monkeypatch.setattr(auto, "from_pretrained", classmethod(lambda cls, *a, _real=real, **k: seen.append(k.get("trust_remote_code")) or _real(cls, *a, **k)))
    train_model(tiny_tokenized, tiny_base, options(max_steps=1), str(tmp_path / "default"))
    assert seen and not any(seen)
    seen.clear()
    train_task.fn(tiny_tokenized, tiny_base, options(max_steps=1), str(tmp_path / "trusted"), trust_remote_code=True)
    assert seen and all(seen)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tiny_base, tiny_tokenized, tmp_path, monkeypatch):
    from tasks import train as stage

    tried = []
    real = stage.train_model

    def fails_above_two(tokenized, model, opts, cache_dir, progress=None, trust_remote_code=False, cache_storage_options=None):
        tried.append((opts.micro_batch_size, opts.grad_accum))
        if opts.micro_batch_size > 2:
            raise trainer.WorkerError("training worker (rank 0) failed: OutOfMemoryError: CUDA out of memory")
        return real(tokenized, model, opts, cache_dir, progress, trust_remote_code, cache_storage_options)

    monkeypatch.setattr(stage, "train_model", fails_above_two)
    result = stage.train_until_it_fits(tiny_tokenized, tiny_base, options(micro_batch_size=8, grad_accum=1, max_steps=1), str(tmp_path))
    assert tried == [(8, 1), (4, 2), (2, 4)]
    assert result.key == train_entry(tiny_tokenized, tiny_base, options(micro_batch_size=8, grad_accum=1, max_steps=1), str(tmp_path))[0]
    assert stage.split_micro_batch(options(micro_batch_size=1)) is None
    odd = stage.split_micro_batch(options(micro_batch_size=3, grad_accum=2))
    assert (odd.micro_batch_size, odd.grad_accum) == (1, 6)  # 3 x 2 == 1 x 6


def test_other_errors_are_not_retried_with_a_smaller_batch(tiny_base, tiny_tokenized, tmp_path, monkeypatch):
    from tasks import train as stage

    tried = []

    def fails(tokenized, model, opts, *rest):
        tried.append(opts.micro_batch_size)
        raise ValueError("bad data")

    monkeypatch.setattr(stage, "train_model", fails)
    with pytest.raises(ValueError, match="bad data"):
        stage.train_until_it_fits(tiny_tokenized, tiny_base, options(micro_batch_size=8), str(tmp_path))
    assert tried == [8]


def test_a_diverging_loss_stops_training_with_a_message_that_names_it(tiny_base, tiny_tokenized, tmp_path):
    """Before: training ran to the end on NaN and the gate then blamed "no eval rows"."""
    opts = options(method="full", learning_rate=1e30, max_grad_norm=0.0, max_steps=6)
    with pytest.raises(trainer.TrainingDivergedError, match=r"training loss became (nan|inf) at step \d.*learning_rate"):
        train_model(tiny_tokenized, tiny_base, opts, str(tmp_path / "cache"))
    assert not storage.is_complete(train_entry(tiny_tokenized, tiny_base, opts, str(tmp_path / "cache"))[1])


@pytest.mark.parametrize("strategy, placed", [("fsdp", "cpu"), ("ddp", "meta")])
def test_fsdp_ranks_never_hold_the_whole_model_on_their_device(strategy, placed, tiny_model_dir, tmp_path):
    """Under FSDP the model is loaded on the CPU and fully_shard moves it layer by layer, shard by
    shard; DDP replicates it, so it goes to the device whole. ("meta" stands in for a GPU here.)"""
    settings = TrainSettings(strategy=strategy, devices=2)
    spec = trainer.TrainSpec(str(tiny_model_dir), "", str(tmp_path / "out"), str(tmp_path / "ckpt"), settings)
    rt = trainer.Runtime(rank=0, world=2, local_rank=0, device=torch.device("meta"), precision="fp32")
    model = trainer.load_model(spec, rt)
    assert {p.device.type for p in model.parameters()} == {placed}


def test_the_next_micro_batch_is_built_before_the_step_ends(tiny_model_dir, tiny_tokenized, tmp_path):
    """While the device works on a step, the host builds the next step's first micro-batch; the
    step then uses exactly that batch, the one it would have built itself."""
    settings = TrainSettings(max_steps=3, micro_batch_size=4, grad_accum=2, seed=0)
    spec = trainer.TrainSpec(str(tiny_model_dir), "", str(tmp_path / "out"), str(tmp_path / "ckpt"), settings)
    session = trainer.Session(spec, trainer.start_runtime(settings), trainer.load_rows(tiny_tokenized.uri))
    session.step(0)
    (target, prepared) = session._prefetched
    assert target == (1, 0)
    fresh = session.batching.build(session.rows, session.micro_batches(1)[1][0], torch.device("cpu"))
    assert all(torch.equal(prepared.inputs[name], fresh.inputs[name]) for name in fresh.inputs)
    assert torch.equal(prepared.targets, fresh.targets) and session._micro_batch(1, 0, []) is prepared
    session.step(1), session.step(2)
    assert session._prefetched is None  # nothing after the last step
