"""Running the training core: in this process for one device, else as torchrun workers.

Workers speak to the launcher over their stdout: a line starting with EVENT_PREFIX is a progress
event (rank 0's drive the progress bar and the caller's callback). A worker's exception is written
to its own file in ERRORS_ENV's folder, which the launcher raises as its own (WorkerError) instead of
torchrun's generic exit status: a file, because every rank shares one pipe and a report printed
there can be cut by another rank's traceback. On a bare GPU box, without Prefect:

    python -m tasks.core.launcher --spec spec.json          # a TrainSpec as JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import asdict
from pathlib import Path

from tasks.core import storage
from tasks.core.processes import die_with_parent
from tasks.core.train_settings import TrainSettings
from tasks.core.trainer import Progress, ProgressBar, TrainSpec, WorkerError, run_worker

logger = logging.getLogger(__name__)

EVENT_PREFIX = "@@sft-event "  # a worker's progress line on stdout, read by the launcher
EVENTS_ENV = "SFT_TRAIN_EVENTS"  # set for torchrun's workers: report over stdout, no bar of their own
ERRORS_ENV = "SFT_TRAIN_ERRORS"  # a folder where a failing worker writes rank-<N>.json
WORKER_MODULE = "tasks.core.launcher"  # what torchrun runs: this file's main(), named, since __name__ may be __main__
ROOT = Path(__file__).resolve().parents[2]


def needs_torchrun(settings: TrainSettings) -> bool:
    """More than one process asked for, and this is not already one of torchrun's workers."""
    return (settings.devices > 1 or settings.nnodes > 1) and "LOCAL_RANK" not in os.environ


def train(spec: TrainSpec, progress: Progress | None = None) -> dict:
    """Train: in this process for one device, else through torchrun. Returns train_stats."""
    if needs_torchrun(spec.settings):
        return launch_torchrun(spec, progress)
    return run_worker(spec, progress)


def torchrun_command(spec_file: str | Path, settings: TrainSettings, run_id: str) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={settings.devices}", f"--nnodes={settings.nnodes}"]
    if settings.nnodes == 1:
        command.append("--standalone")
    else:
        command += [
            f"--node_rank={settings.node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={settings.rdzv_endpoint}",
            f"--rdzv_id={run_id}",
        ]
    return command + ["-m", WORKER_MODULE, "--spec", str(spec_file)]


def launch_torchrun(spec: TrainSpec, progress: Progress | None = None) -> dict:
    """Run the workers with torchrun, stream their output, drive the progress bar from rank 0's
    events, and fail with the worker's own error when one fails."""
    with tempfile.TemporaryDirectory(prefix="sft-train-") as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(asdict(spec)))
        errors_dir = Path(tmp) / "errors"
        errors_dir.mkdir()
        env = {**os.environ, EVENTS_ENV: "1", ERRORS_ENV: str(errors_dir), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        command = torchrun_command(spec_file, spec.settings, spec.run_id)
        logger.info("Launching %s", " ".join(command))
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True, bufsize=1, preexec_fn=die_with_parent()
        )
        tail = _stream(process, progress)
        errors = _read_errors(errors_dir)
    if process.returncode != 0:
        if errors:
            first = errors[0]
            raise WorkerError(f"training worker (rank {first['rank']}) failed: {first['type']}: {first['message']}")
        raise WorkerError(f"torchrun exited with {process.returncode}:\n" + "".join(tail), crashed=True)
    return storage.read_json(storage.join(spec.output_url, "train_stats.json"), spec.storage_options)


def _stream(process: subprocess.Popen, progress: Progress | None) -> deque:
    """Read the workers' output to its end: returns the last plain lines."""
    tail, bar = deque(maxlen=120), None  # torchrun's own failure report alone is ~40 lines: keep the workers' last words too
    try:
        for line in process.stdout:
            event, line = _split_event(line)
            if event is not None:
                bar = bar or ProgressBar(event["total_steps"], event["step"] - 1, enabled=True)
                bar.update(event)
                if progress is not None:
                    progress(event)
            if line.strip():
                tail.append(line)
                logger.info("%s", line.rstrip())
                if progress is not None:
                    progress({"event": "log", "line": line.rstrip()})
        process.wait()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        if bar is not None:
            bar.close()
    return tail


def _split_event(line: str) -> tuple[dict | None, str]:
    """(the progress event a line starts with, or None; the rest of the line). Another rank's
    output can land on the same line after the event, so only the event's own JSON is decoded."""
    if not line.startswith(EVENT_PREFIX):
        return None, line
    try:
        event, end = json.JSONDecoder().raw_decode(line, len(EVENT_PREFIX))
    except json.JSONDecodeError:
        return None, line
    return event, line[end:]


def _read_errors(errors_dir: Path) -> list[dict]:
    """The failing workers' reports, lowest rank first."""
    reports = [json.loads(path.read_text()) for path in errors_dir.glob("rank-*.json")]
    return sorted(reports, key=lambda report: report["rank"])


def _print_event(event: dict) -> None:
    print(EVENT_PREFIX + json.dumps(event), flush=True)


def _write_error(error: Exception) -> None:
    if ERRORS_ENV not in os.environ:  # a worker started by hand: the traceback is all there is
        return
    rank = int(os.environ.get("RANK", "0"))
    report = {"rank": rank, "type": type(error).__name__, "message": str(error)}
    storage.write_json_atomic(str(Path(os.environ[ERRORS_ENV]) / f"rank-{rank}.json"), report)


def main(argv: list[str] | None = None) -> None:
    """A torchrun worker (EVENTS_ENV set: report over stdout), or a whole run from the shell."""
    parser = argparse.ArgumentParser(description="Run the SFT training core on a TrainSpec JSON file.")
    parser.add_argument("--spec", required=True, help="TrainSpec as JSON (see tasks.core.trainer.TrainSpec).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = TrainSpec.from_dict(json.loads(Path(args.spec).read_text()))
    if os.environ.get(EVENTS_ENV) != "1":
        print(json.dumps(train(spec), indent=2))
        return
    try:
        run_worker(spec, progress=_print_event, show_bar=False)
    except Exception as error:
        _write_error(error)
        raise
    _leave_now()


def _leave_now() -> None:
    """End a worker whose outputs are published without running the interpreter's teardown. There,
    gloo's threads can still be joinable, and destroying a joinable std::thread aborts the process
    ("terminate called without an active exception", SIGABRT): seen on CPU under load, after the
    work was done, and torchrun then fails the whole run."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
