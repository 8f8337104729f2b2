"""The launcher: the torchrun command, the spec the workers read, and real torchrun runs on CPU
(gloo): DDP, two nodes on localhost and FSDP each train what one process trains; a failing worker
fails the stage with its own error; a killed launcher takes its workers down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from schemas.manifests import TokenizedArtifact
from tasks.core import launcher, storage, trainer
from tasks.core.train_settings import TrainSettings
from tasks.train import train_entry, train_model, train_spec
from tests.conftest import assert_same_weights, kill_after_first_checkpoint, process_tree
from tests.conftest import train_options as options

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------------------- the command


def test_torchrun_runs_the_launchers_worker_standalone_or_at_the_rendezvous():
    one_node = launcher.torchrun_command("spec.json", TrainSettings(devices=2), "run")
    assert one_node[1:] == [
        "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--standalone",
        "-m", "tasks.core.launcher", "--spec", "spec.json",
    ]  # fmt: skip
    two_nodes = launcher.torchrun_command("spec.json", TrainSettings(nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29400"), "abc")
    assert two_nodes[1:] == [
        "-m", "torch.distributed.run", "--nproc_per_node=1", "--nnodes=2",
        "--node_rank=1", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29400", "--rdzv_id=abc",
        "-m", "tasks.core.launcher", "--spec", "spec.json",
    ]  # fmt: skip


def test_torchrun_only_for_several_processes_and_never_from_a_worker(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not launcher.needs_torchrun(TrainSettings())
    assert launcher.needs_torchrun(TrainSettings(devices=2)) and launcher.needs_torchrun(TrainSettings(nnodes=2))
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside a worker the run is already distributed
    assert not launcher.needs_torchrun(TrainSettings(devices=2))


def test_the_spec_survives_the_json_file_the_workers_read(tiny_base, tiny_tokenized, tmp_path):
    spec = train_spec(tiny_tokenized, tiny_base, options(devices=2, strategy="fsdp"), str(tmp_path))
    assert trainer.TrainSpec.from_dict(json.loads(json.dumps(asdict(spec)))) == spec
    # The workers reach the cache with its storage options; they stay out of reprs (logs, tracebacks).
    cache_options = {"token": "worker-s3cr3t"}
    spec = train_spec(tiny_tokenized, tiny_base, options(devices=2), str(tmp_path), cache_storage_options=cache_options)
    read_back = trainer.TrainSpec.from_dict(json.loads(json.dumps(asdict(spec))))
    assert read_back == spec and read_back.storage_options == cache_options
    assert "worker-s3cr3t" not in repr(spec)
    assert trainer.TrainSpec.from_dict({k: v for k, v in asdict(spec).items() if k != "storage_options"}).storage_options == {}


# ------------------------------------------------------------------------------- real torchrun


@pytest.fixture(scope="module")
def single_process_reference(tiny_base, tiny_tokenized, tmp_path_factory):
    """One process, micro 2 x accum 2: the same global batch as two ranks of micro 2."""
    return train_model(tiny_tokenized, tiny_base, options(micro_batch_size=2, grad_accum=2, max_steps=2), str(tmp_path_factory.mktemp("ref")))


def test_torchrun_ddp_two_processes_match_one(tiny_base, tiny_tokenized, tmp_path, single_process_reference):
    events = []
    result = train_model(tiny_tokenized, tiny_base, options(micro_batch_size=2, devices=2, max_steps=2), str(tmp_path), progress=events.append)
    assert result.stats["world_size"] == 2 and result.stats["strategy"] == "ddp"
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]  # rank 0's events reach the caller
    assert_same_weights(result, single_process_reference)


def test_torchrun_two_nodes_on_localhost_match_one_process(tiny_base, tiny_tokenized, tmp_path, single_process_reference):
    endpoint = f"127.0.0.1:{free_port()}"
    results, errors = {}, []

    def node(rank: int) -> None:
        try:
            opts = options(micro_batch_size=2, nnodes=2, node_rank=rank, rdzv_endpoint=endpoint, max_steps=2)
            results[rank] = train_model(tiny_tokenized, tiny_base, opts, str(tmp_path))
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
def test_torchrun_fsdp_two_processes_match_one(method, tiny_base, tiny_tokenized, tmp_path):
    """FSDP2 shards every decoder layer across the two gloo ranks; the result is the same step, and
    the held-out loss measured during training (each rank scores its share; the sums are reduced)
    is the one process's."""
    common = dict(method=method, micro_batch_size=2, max_steps=2, eval_every=1)
    reference = train_model(tiny_tokenized, tiny_base, options(grad_accum=2, **common), str(tmp_path / "ref"))
    sharded = train_model(tiny_tokenized, tiny_base, options(devices=2, strategy="fsdp", **common), str(tmp_path))
    assert sharded.stats["world_size"] == 2 and sharded.stats["strategy"] == "fsdp"
    assert_same_weights(sharded, reference)
    held_out = [[r["eval_loss"] for r in storage.read_json(result.loss_curve_uri)] for result in (sharded, reference)]
    assert held_out[0] == pytest.approx(held_out[1], rel=1e-5) and len(held_out[0]) == 2


def test_fsdp_ranks_with_uneven_micro_batches_join_every_collective(tiny_base, tiny_tokenized, tmp_path):
    """A token budget cuts one rank's share of a step in two and not the other's. The rank with
    fewer micro-batches runs an empty one (it adds nothing), so both join every FSDP collective:
    the run finishes, and its training and held-out losses are one process's. The weights differ
    from that run's only by the rounding of another summation order, which Adam's first steps
    amplify (an update is about lr x the sign of the gradient), hence the looser tolerance."""
    budget = 24
    assert uneven_micro_batches(tiny_tokenized, micro=2, budget=budget, steps=2)
    common = dict(method="full", micro_batch_size=2, max_steps=2, eval_every=1)
    reference = train_model(tiny_tokenized, tiny_base, options(grad_accum=2, **common), str(tmp_path / "ref"))
    sharded = train_model(tiny_tokenized, tiny_base, options(devices=2, strategy="fsdp", micro_batch_tokens=budget, **common), str(tmp_path))
    curves = [storage.read_json(result.loss_curve_uri) for result in (sharded, reference)]
    for name in ("loss", "eval_loss"):
        assert [r[name] for r in curves[0]] == pytest.approx([r[name] for r in curves[1]], rel=1e-5)
    assert_same_weights(sharded, reference, atol=1e-4)


def uneven_micro_batches(tokenized, micro: int, budget: int, steps: int) -> bool:
    """Whether, in the first `steps` steps of two ranks, the ranks' micro-batch counts differ."""
    from tasks.core import trainer

    rows = trainer.load_rows(tokenized.uri)
    batching = trainer.Batching(packing=True, pad_token_id=0, micro_examples=micro, micro_tokens=budget, row_tokens=int(rows.lengths.max()))
    order = trainer.DataOrder(len(rows), seed=0)
    counts = [[len(batching.rank_micro_batches(order.global_batch(step, 2 * micro), rows.lengths, rank, 2)) for rank in (0, 1)]
              for step in range(steps)]
    return any(a != b for a, b in counts)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_fsdp_launcher_takes_its_workers_down_and_a_rerun_resumes(tiny_base, tiny_tokenized, tmp_path):
    """kill -9 of the stage's process (not its group) after a sharded checkpoint: torchrun and
    both workers stop, and the re-run resumes to the weights of one uninterrupted process.
    (Here the workers would also die at their next line of output into the closed pipe; the test
    below shows the launch does not depend on that.)"""
    opts = options(method="full", micro_batch_size=2, devices=2, strategy="fsdp", max_steps=16, checkpoint_every=2)
    cache = tmp_path / "crashed"
    _, workers, url = kill_after_first_checkpoint(tiny_tokenized, tiny_base, opts, cache)
    assert len(workers) >= 3  # torchrun and its two ranks
    deadline = time.monotonic() + 60
    while any(is_running(pid) for pid in workers):
        assert time.monotonic() < deadline, "torchrun outlived the process that launched it"
        time.sleep(0.1)
    assert not storage.is_complete(url)

    resumed = train_model(tiny_tokenized, tiny_base, opts, str(cache))
    assert resumed.stats["resumed_from_step"] in range(2, 16, 2) and resumed.stats["steps"] == 16
    reference = options(method="full", micro_batch_size=2, grad_accum=2, max_steps=16)
    assert_same_weights(resumed, train_model(tiny_tokenized, tiny_base, reference, str(tmp_path / "clean")))


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
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert child in process_tree(parent.pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while is_running(child):
        assert time.monotonic() < deadline, "the silent child outlived its launcher"
        time.sleep(0.05)


def test_a_failing_worker_fails_the_stage_with_its_error(tiny_base, tmp_path):
    """Both workers find labels that do not match their input_ids; the stage raises their error."""
    import datasets

    broken = tmp_path / "broken"
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6], "length": 3}] * 4
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "eval": datasets.Dataset.from_list(rows)}).save_to_disk(str(broken))
    store = TokenizedArtifact(stage="tokenize-and-cache", uri=str(broken), key="broken", stats={})
    with pytest.raises(trainer.WorkerError, match=r"rank \d\) failed: ValueError: .*input_ids and labels differ in length") as error:
        train_model(store, tiny_base, options(devices=2), str(tmp_path))
    assert not error.value.crashed  # a Python error, reported: another attempt would fail the same way
    assert not storage.is_complete(train_entry(store, tiny_base, options(devices=2), str(tmp_path))[1])


def test_a_progress_event_survives_another_ranks_output_on_its_line():
    """Every rank shares one pipe: a traceback can land on the line an event is on."""
    line = launcher.EVENT_PREFIX + json.dumps({"step": 3, "total_steps": 9}) + "[rank1]: Traceback (most recent call last):\n"
    event, rest = launcher._split_event(line)
    assert event == {"step": 3, "total_steps": 9}
    assert rest == "[rank1]: Traceback (most recent call last):\n"
    cut = launcher.EVENT_PREFIX + '{"step": 3, "tot[rank1]: Traceback\n'
    assert launcher._split_event(cut) == (None, cut)  # a cut event is a plain line, not a crash of the launcher
