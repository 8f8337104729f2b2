"""The train stage on the tiny Llama: LoRA and full, accumulation, resume after kill -9, torchrun.

Every run is a few steps on a 2-layer width-64 model, one CPU thread per process (oversubscribed
intra-op threads make tiny steps 10-50x slower on a busy machine)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from schemas.config import LoraOptions, TrainOptions
from schemas.manifests import TokenizedArtifact
from tasks.core import storage, trainer
from tasks.core.collate import IGNORE_INDEX
from tasks.model import import_model
from tasks.train import checkpoint_url, train_entry, train_model, train_spec, train_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tiny_model_dir, tmp_path_factory):
    return import_model(str(tiny_model_dir), str(tmp_path_factory.mktemp("model-cache")))


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, base) -> TokenizedArtifact:
    """24 examples of 6-24 tokens whose prompts (no loss) and answers differ in length."""
    import datasets

    rng = random.Random(0)
    vocab = base.stats.get("vocab_size") or 390
    rows = []
    for _ in range(24):
        length = rng.randint(6, 24)
        prompt = rng.randint(1, length - 2)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": length})
    folder = tmp_path_factory.mktemp("tokenized") / "store"
    store = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "eval": datasets.Dataset.from_list(rows[:4])})
    store.save_to_disk(str(folder))
    return TokenizedArtifact(stage="tokenize-and-cache", uri=str(folder), key="tiny-tokenized", stats={})


def options(**changes) -> TrainOptions:
    defaults = dict(
        method="lora",
        lora=LoraOptions(r=4, alpha=8.0),
        learning_rate=1e-2,
        warmup_ratio=0.0,
        max_steps=3,
        micro_batch_size=4,
        seed=0,
    )
    return TrainOptions(**{**defaults, **changes})


def weights(artifact) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = Path(artifact.uri)
    path = folder / "adapter" / "adapter_model.safetensors" if artifact.method == "lora" else folder / "model" / "model.safetensors"
    return load_file(str(path))


def assert_same_weights(a, b, atol=1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=1e-4, msg=name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------ one code path


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_changes_trainable_and_only_trainable_parameters(method, base, tokenized, tmp_path):
    opts = options(method=method, learning_rate=1e-2 if method == "lora" else 1e-3).model_dump(mode="json")
    spec = trainer.TrainSpec(base.uri, tokenized.uri, str(tmp_path / "out"), str(tmp_path / "ckpt"), opts, 1e-2)
    session = trainer.Session(spec, trainer.start_runtime(opts), trainer.load_rows(tokenized.uri))
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


def test_train_model_outputs_curve_stats_and_store_hit(base, tokenized, tmp_path):
    events = []
    result = train_model(tokenized, base, options(checkpoint_every=2), str(tmp_path), progress=events.append)
    folder = Path(result.uri)
    assert storage.is_complete(result.uri) and not result.store_hit
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert (folder / "adapter" / "adapter_config.json").is_file()
    curve = storage.read_json(result.loss_curve_uri)
    assert [r["step"] for r in curve] == [1, 2, 3]
    assert {"step", "loss", "lr", "tokens", "loss_tokens", "elapsed_s"} <= set(curve[0])
    assert curve[-1]["tokens"] > curve[0]["tokens"] > curve[0]["loss_tokens"] > 0
    stats = result.stats
    assert stats["steps"] == 3 and stats["final_loss"] == curve[-1]["loss"]
    assert stats["device"] == "cpu" and stats["precision"] == "fp32" and stats["resumed_from_step"] == 0
    assert stats["tokens_per_s"] > stats["loss_tokens_per_s"] > 0 and stats["peak_memory_gib"] > 0
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert not storage.exists(checkpoint_url(str(tmp_path), result.key))  # removed once published
    again = train_model(tokenized, base, options(checkpoint_every=2), str(tmp_path))
    assert again.store_hit and again.key == result.key and again.stats == stats


def test_full_fine_tuning_saves_a_loadable_model(base, tokenized, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train_model(tokenized, base, options(method="full", max_steps=2), str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(Path(result.uri) / "model"))
    assert model.config.use_cache is True  # turned off for packed training only
    assert (Path(result.uri) / "model" / "tokenizer.json").is_file()


def test_key_ignores_placement_but_not_numerics(base, tokenized):
    key = train_entry(tokenized, base, options(), "c")[0]
    assert train_entry(tokenized, base, options(node_rank=1, rdzv_endpoint="10.0.0.1:1", checkpoint_every=7), "c")[0] == key
    assert train_entry(tokenized, base, options(devices=2), "c")[0] != key
    assert train_entry(tokenized, base, options(learning_rate=2e-2), "c")[0] != key
    assert train_entry(tokenized, base, options(), "c", trust_remote_code=True)[0] != key  # it can pick other code
    # The batch counts as its effective size: 4 x 2 trains what 8 x 1 trains (tested below).
    assert train_entry(tokenized, base, options(micro_batch_size=4, grad_accum=2), "c")[0] == train_entry(
        tokenized, base, options(micro_batch_size=8, grad_accum=1), "c"
    )[0]
    assert train_entry(tokenized, base, options(micro_batch_size=4, grad_accum=1), "c")[0] != train_entry(
        tokenized, base, options(micro_batch_size=8, grad_accum=1), "c"
    )[0]


def test_data_order_is_pure_and_ranks_are_disjoint():
    order = trainer.DataOrder(10, seed=3)
    batches = [trainer.DataOrder(10, seed=3).global_batch(step, 4) for step in range(5)]
    assert batches == [order.global_batch(step, 4) for step in range(5)]
    assert sorted(sum(batches[:2], []) + batches[2][:2]) == list(range(10))  # one epoch, then the next
    shares = [trainer.rank_micro_batches(batches[0], rank, 2, 1) for rank in range(2)]
    assert sorted(i for share in shares for micro in share for i in micro) == sorted(batches[0])


def test_epochs_decide_the_step_count_without_max_steps(tokenized):
    rows = trainer.load_rows(tokenized.uri)
    plan = trainer.plan_steps(rows, options(max_steps=None, epochs=2.0, micro_batch_size=4, grad_accum=2).model_dump(), world=1)
    assert (plan.global_batch, plan.total_steps) == (8, 6)  # 2 epochs x 24 rows / 8


@pytest.mark.parametrize("packing, row_tokens", [(True, 24), (True, 30), (True, None), (False, None)])
def test_memory_estimate_is_the_largest_batch_tensor_of_the_run(packing, row_tokens, tokenized):
    """The estimate equals the biggest input tensor make_batch builds over every step of the run
    (capped rows padded to their widest, one packed row, or padded examples)."""
    rows = trainer.load_rows(tokenized.uri)
    opts = options(max_steps=5, micro_batch_size=4, grad_accum=2, packing=packing).model_dump()
    plan = trainer.plan_steps(rows, opts, world=1)
    order = trainer.DataOrder(len(rows), opts["seed"])
    sizes = [
        trainer.make_batch(rows, micro, packing, 0, torch.device("cpu"), row_tokens)[0]["input_ids"].numel()
        for step in range(plan.total_steps)
        for micro in trainer.rank_micro_batches(order.global_batch(step, plan.global_batch), 0, 1, 4)
    ]
    assert trainer.largest_micro_batch(rows, plan, opts, row_tokens) == max(sizes)


def test_the_trainers_copy_of_the_defaults_matches_the_config():
    assert trainer.DEFAULT_OPTIONS == TrainOptions().model_dump(mode="json")


def test_schedule_warms_up_then_decays():
    factors = [trainer.lr_factor(step, 10, 2, "cosine") for step in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0 and factors[-1] < 0.05
    assert trainer.lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)


# ------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("packing", [True, False])
def test_accumulation_equals_a_bigger_batch(packing, base, tokenized, tmp_path):
    """micro 4 x accum 2 == micro 8 x accum 1: the loss is normalised by the loss tokens of the
    whole accumulated batch, not averaged per micro-batch (the examples' loss counts differ)."""
    counts = trainer.load_rows(tokenized.uri).loss_tokens
    assert len(set(counts.tolist())) > 5
    common = dict(method="full", learning_rate=1e-3, packing=packing)
    accumulated = train_model(tokenized, base, options(micro_batch_size=4, grad_accum=2, **common), str(tmp_path / "a"))
    single = train_model(tokenized, base, options(micro_batch_size=8, grad_accum=1, **common), str(tmp_path / "b"))
    assert not accumulated.store_hit and not single.store_hit  # both really trained
    assert_same_weights(accumulated, single)
    losses = lambda r: [x["loss"] for x in storage.read_json(r.loss_curve_uri)]  # noqa: E731
    assert losses(accumulated) == pytest.approx(losses(single), rel=1e-5)


def test_compiled_training_matches_eager(base, tokenized, tmp_path):
    """Regional torch.compile (each decoder layer, dynamic shapes for packed rows) is the GPU
    default for long runs; on CPU it compiles with inductor too and must train the same steps."""
    common = dict(method="full", learning_rate=1e-3, max_steps=3)
    eager = train_model(tokenized, base, options(compile="off", **common), str(tmp_path / "eager"))
    compiled = train_model(tokenized, base, options(compile="on", **common), str(tmp_path / "compiled"))
    assert (eager.stats["compiled"], compiled.stats["compiled"]) == (False, True)
    assert eager.key != compiled.key  # compiled kernels round differently: not interchangeable
    losses = lambda r: [x["loss"] for x in storage.read_json(r.loss_curve_uri)]  # noqa: E731
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-5)
    assert_same_weights(compiled, eager)


def kill_after_first_checkpoint(tokenized, base, opts, cache: Path, progress_delay_s: float = 0.0):
    """Train in a child process that runs the training core alone (no Prefect import); SIGKILL it,
    not its group, once the checkpoint of step 2 is complete. Returns the process, its
    descendants at the moment of the kill and the URL of the entry it was building."""
    key, url = train_entry(tokenized, base, opts, str(cache))
    marker = Path(checkpoint_url(str(cache), key)) / "step-00000002" / storage.COMPLETE_MARKER
    spec_file = cache.with_name(cache.name + ".spec.json")
    spec_file.write_text(json.dumps(asdict(train_spec(tokenized, base, opts, str(cache)))))
    script = (
        "import json, sys, time\n"
        "from tasks.core.trainer import TrainSpec, train\n"
        f"train(TrainSpec(**json.load(open(sys.argv[1]))), progress=lambda event: time.sleep({progress_delay_s}))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(spec_file)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        descendants = process_tree(process.pid)[1:]
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    return process, descendants, url


def test_resume_after_kill_matches_an_uninterrupted_run(base, tokenized, tmp_path):
    opts = options(max_steps=8, checkpoint_every=2, keep_checkpoints=2)
    crashed_cache = tmp_path / "crashed"
    # Slowed by its progress callback, so the kill lands well before the end.
    process, _, url = kill_after_first_checkpoint(tokenized, base, opts, crashed_cache, progress_delay_s=0.4)
    assert process.returncode == -signal.SIGKILL and not storage.is_complete(url)

    resumed = train_model(tokenized, base, opts, str(crashed_cache))
    assert resumed.stats["resumed_from_step"] >= 2 and resumed.stats["steps"] == 8
    assert [r["step"] for r in storage.read_json(resumed.loss_curve_uri)] == list(range(1, 9))
    uninterrupted = train_model(tokenized, base, opts, str(tmp_path / "clean"))
    assert uninterrupted.stats["resumed_from_step"] == 0
    assert_same_weights(resumed, uninterrupted, atol=1e-6)


# ------------------------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module")
def single_process_reference(base, tokenized, tmp_path_factory):
    """One process, micro 2 x accum 2: the same global batch as two ranks of micro 2."""
    return train_model(tokenized, base, options(micro_batch_size=2, grad_accum=2, max_steps=2), str(tmp_path_factory.mktemp("ref")))


def test_torchrun_ddp_two_processes_match_one(base, tokenized, tmp_path, single_process_reference):
    events = []
    result = train_model(tokenized, base, options(micro_batch_size=2, devices=2, max_steps=2), str(tmp_path), progress=events.append)
    assert result.stats["world_size"] == 2 and result.stats["strategy"] == "ddp"
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]  # rank 0's events reach the caller
    assert_same_weights(result, single_process_reference)


def test_torchrun_two_nodes_on_localhost_match_one_process(base, tokenized, tmp_path, single_process_reference):
    endpoint = f"127.0.0.1:{free_port()}"
    results, errors = {}, []

    def node(rank: int) -> None:
        try:
            opts = options(micro_batch_size=2, nnodes=2, node_rank=rank, rdzv_endpoint=endpoint, max_steps=2)
            results[rank] = train_model(tokenized, base, opts, str(tmp_path))
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=400)
    assert not errors, errors
    assert results[0].key == results[1].key  # node_rank is not part of the key
    assert results[0].stats["world_size"] == 2
    assert_same_weights(results[0], single_process_reference)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_torchrun_fsdp_two_processes_match_one(method, base, tokenized, tmp_path):
    """FSDP2 shards every decoder layer across the two gloo ranks; the result is the same step."""
    reference = train_model(tokenized, base, options(method=method, micro_batch_size=2, grad_accum=2, max_steps=2), str(tmp_path / "ref"))
    sharded = train_model(tokenized, base, options(method=method, micro_batch_size=2, devices=2, strategy="fsdp", max_steps=2), str(tmp_path))
    assert sharded.stats["world_size"] == 2 and sharded.stats["strategy"] == "fsdp"
    assert_same_weights(sharded, reference)


def process_tree(pid: int) -> list[int]:
    """pid and every live descendant, from /proc (Linux)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += parents.get(current, [])
    return tree


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_fsdp_launcher_takes_its_workers_down_and_a_rerun_resumes(base, tokenized, tmp_path):
    """kill -9 of the stage's process (not its group) after a sharded checkpoint: torchrun and
    both workers stop, and the re-run resumes to the weights of one uninterrupted process.
    (Here the workers would also die at their next line of output into the closed pipe; the test
    below shows the launch does not depend on that.)"""
    opts = options(method="full", micro_batch_size=2, devices=2, strategy="fsdp", max_steps=16, checkpoint_every=2)
    cache = tmp_path / "crashed"
    _, workers, url = kill_after_first_checkpoint(tokenized, base, opts, cache)
    assert len(workers) >= 3  # torchrun and its two ranks
    deadline = time.monotonic() + 60
    while any(is_running(pid) for pid in workers):
        assert time.monotonic() < deadline, "torchrun outlived the process that launched it"
        time.sleep(0.1)
    assert not storage.is_complete(url)

    resumed = train_model(tokenized, base, opts, str(cache))
    assert 2 <= resumed.stats["resumed_from_step"] < 16 and resumed.stats["steps"] == 16
    reference = options(method="full", micro_batch_size=2, grad_accum=2, max_steps=16)
    assert_same_weights(resumed, train_model(tokenized, base, reference, str(tmp_path / "clean")))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_launched_process_dies_with_its_launcher_even_when_silent(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "from tasks.core.processes import die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], preexec_fn=die_with_parent())\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while is_running(child):
        assert time.monotonic() < deadline, "the silent child outlived its launcher"
        time.sleep(0.05)


def test_a_failing_worker_fails_the_stage_with_its_error(base, tokenized, tmp_path):
    """Both workers find labels that do not match their input_ids; the stage raises their error."""
    import datasets

    broken = tmp_path / "broken"
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6], "length": 3}] * 4
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "eval": datasets.Dataset.from_list(rows)}).save_to_disk(str(broken))
    store = TokenizedArtifact(stage="tokenize-and-cache", uri=str(broken), key="broken", stats={})
    with pytest.raises(trainer.WorkerError, match=r"rank \d\) failed: ValueError: .*input_ids and labels differ in length"):
        train_model(store, base, options(devices=2), str(tmp_path))
    assert not storage.is_complete(train_entry(store, base, options(devices=2), str(tmp_path))[1])


def test_train_task_outside_a_flow(base, tokenized, tmp_path):
    """The Prefect wrapper's progress callback is harmless without a flow run."""
    result = train_task.fn(tokenized, base, options(max_steps=1), str(tmp_path))
    assert result.stats["steps"] == 1 and json.loads(Path(result.uri, "train_stats.json").read_text())["steps"] == 1


def test_trust_remote_code_reaches_the_training_process(base, tokenized, tmp_path, monkeypatch):
    """Off unless the config says so: a model repository's own code runs only when asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    for auto in (AutoModelForCausalLM, AutoTokenizer):
        real = auto.from_pretrained.__func__
        monkeypatch.setattr(auto, "from_pretrained", classmethod(lambda cls, *a, _real=real, **k: seen.append(k.get("trust_remote_code")) or _real(cls, *a, **k)))
    train_model(tokenized, base, options(max_steps=1), str(tmp_path / "default"))
    assert seen and not any(seen)
    seen.clear()
    train_task.fn(tokenized, base, options(max_steps=1), str(tmp_path / "trusted"), trust_remote_code=True)
    assert seen and all(seen)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(base, tokenized, tmp_path, monkeypatch):
    from tasks import train as stage

    tried = []
    real = stage.train_model

    def fails_above_two(tokenized, model, opts, cache_dir, progress=None, trust_remote_code=False):
        tried.append((opts.micro_batch_size, opts.grad_accum))
        if opts.micro_batch_size > 2:
            raise trainer.WorkerError("training worker (rank 0) failed: OutOfMemoryError: CUDA out of memory")
        return real(tokenized, model, opts, cache_dir, progress, trust_remote_code)

    monkeypatch.setattr(stage, "train_model", fails_above_two)
    result = stage.train_until_it_fits(tokenized, base, options(micro_batch_size=8, grad_accum=1, max_steps=1), str(tmp_path))
    assert tried == [(8, 1), (4, 2), (2, 4)]
    assert result.key == train_entry(tokenized, base, options(micro_batch_size=8, grad_accum=1, max_steps=1), str(tmp_path))[0]
    assert stage.split_micro_batch(options(micro_batch_size=1)) is None
    odd = stage.split_micro_batch(options(micro_batch_size=3, grad_accum=2))
    assert (odd.micro_batch_size, odd.grad_accum) == (1, 6)  # 3 x 2 == 1 x 6


def test_other_errors_are_not_retried_with_a_smaller_batch(base, tokenized, tmp_path, monkeypatch):
    from tasks import train as stage

    monkeypatch.setattr(stage, "train_model", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad data")))
    with pytest.raises(ValueError, match="bad data"):
        stage.train_until_it_fits(tokenized, base, options(micro_batch_size=8), str(tmp_path))


def test_a_diverging_loss_stops_training_with_a_message_that_names_it(base, tokenized, tmp_path):
    """Before: training ran to the end on NaN and the gate then blamed "no eval rows"."""
    opts = options(method="full", learning_rate=1e30, max_grad_norm=0.0, max_steps=6)
    with pytest.raises(trainer.TrainingDivergedError, match=r"training loss became (nan|inf) at step \d.*learning_rate"):
        train_model(tokenized, base, opts, str(tmp_path / "cache"))
    assert not storage.is_complete(train_entry(tokenized, base, opts, str(tmp_path / "cache"))[1])
