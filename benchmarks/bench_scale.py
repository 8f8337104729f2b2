"""Data at scale: our preparation (validate + tokenize) against TRL's `datasets.map(num_proc=...)`
preparation, at growing sizes and worker counts, with peak memory.

    python benchmarks/bench_scale.py [--sizes 20000 100000 1000000] [--workers 1 N] [--kind alpaca|chat]
        [--trl-max-rows 100000] [--append-rows 1000] [--shard-rows N] [--timeout 1800]
        [--model-cache /tmp/sftcache-bench] [--workdir DIR] [--keep] [--results benchmarks/results/scale.json]

Rows are generated, not downloaded: alpaca records (instruction, input, output) or two-turn chats,
700-900 characters each, drawn from a fixed word list with a fixed seed; every row carries its own
number, so no two are alike. Each size is written once, as JSONL, streaming.

Every (size, workers) pair runs in a fresh child process (this file with the hidden `--child`), so
each peak belongs to one run. Ours gets a fresh cache folder and runs `validate_data` then
`tokenize_dataset` with `workers=`; TRL gets `datasets.load_dataset("json")`, a map onto
prompt-completion rows and `SFTTrainer._prepare_dataset` with `dataset_num_proc=workers`. Both use
SmolLM2's tokenizer (`import_model("embedded:smollm2-135m-instruct", ...)`), completion-only loss
and max_length 1024. Ours' wall time includes loading the tokenizer; TRL's does not (its trainer is
built before the clock starts). TRL runs only up to `--trl-max-rows` rows.

Memory is sampled from outside every 0.1 s over the child's whole process tree: "tree peak RSS" is
the largest sum of RSS seen (an upper bound: pages that forked workers share with their parent are
counted in each; TRL's workers are forks of a process that has torch loaded), "tree peak PSS" the
largest sum of PSS (shared pages split between their sharers: what the tree really holds; sampled
every 0.5 s, Linux only), "largest process peak" the largest single process's high-water mark
(VmHWM on Linux, exact).

The append run: after ours at the largest size with the most workers, `--append-rows` new rows go
into a second file and both files are prepared again with the same cache folder; the row reports
the shards built and reused (`data.stats["shards"]`, `tokenized.stats["shards"]`); its rows/s and
tokens/s count the rows of both files, so its wall time is the figure to read.

Progress goes to stderr; the markdown table, the ratios and the memory growth go to stdout as runs
finish; everything, with the machine's facts, goes to `--results` as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas.config import EMBEDDED_MODEL  # noqa: E402

WORDS = """
the a of to and in is it for on with as at by from that this these those which when where while
model data token answer question request user system value table river city garden market window
letter engine memory signal paper music winter summer morning evening history science
language number pattern problem method result example reason process student teacher
doctor farmer writer painter bridge forest mountain valley ocean island harbor station library
museum kitchen bottle candle mirror ladder basket pocket button pencil wallet ticket journey
quickly slowly carefully gently rarely often always never together already almost perhaps
simple careful bright quiet heavy narrow gentle honest early late modern ancient useful common
small large green silver golden wooden broken hidden open clear strong warm cold fresh
explain describe compare measure build repair collect divide follow improve imagine prepare
remember consider discover protect deliver travel gather balance borrow create decide design
find give keep make show take tell think turn write read learn carry change choose draw grow
""".split()
SENTENCES = 8192  # the pool each row draws its sentences from
ROW_CHARS = (700, 900)
MB = 1024 * 1024


# --- generated data ---------------------------------------------------------------------------


def sentence_pool(rng: random.Random) -> list[str]:
    """Sentences of 6-18 words. Letters, spaces, commas and periods only, so a row is valid JSON
    without escaping (what keeps a million rows well under a minute)."""
    pool = []
    for _ in range(SENTENCES):
        words = rng.choices(WORDS, k=rng.randint(6, 18))
        if len(words) > 9:
            words[len(words) // 2] += ","
        pool.append(" ".join(words).capitalize() + ".")
    return pool


def fill(pool: list[str], rng: random.Random, chars: int) -> str:
    parts, length = [], 0
    while length < chars:
        parts.append(pool[rng.getrandbits(13)])
        length += len(parts[-1]) + 1
    return " ".join(parts)[:chars].rsplit(" ", 1)[0].rstrip(",.") + "."  # cut at a word's end


def records(count: int, seed: int, first: int) -> Iterator[tuple[str, str, str]]:
    """(instruction, input, output) numbered from `first`; four in ten without input, as in alpaca."""
    rng = random.Random(seed)
    pool = sentence_pool(rng)
    for number in range(first, first + count):
        instruction = f"Request {number}. {pool[rng.getrandbits(13)]}"
        context = fill(pool, rng, rng.randint(80, 240)) if rng.random() < 0.6 else ""
        output = fill(pool, rng, rng.randint(*ROW_CHARS) - len(instruction) - len(context))
        yield instruction, context, output


def alpaca_line(instruction: str, context: str, output: str) -> str:
    return f'{{"instruction": "{instruction}", "input": "{context}", "output": "{output}"}}\n'


def chat_line(instruction: str, context: str, output: str) -> str:
    question = instruction + ("\\n\\n" + context if context else "")  # JSON-escaped newlines
    return (f'{{"messages": [{{"role": "user", "content": "{question}"}}, '
            f'{{"role": "assistant", "content": "{output}"}}]}}\n')


LINES = {"alpaca": alpaca_line, "chat": chat_line}


def write_rows(path: Path, count: int, kind: str, seed: int, first: int = 0) -> Path:
    line = LINES[kind]
    with path.open("w", buffering=MB) as out:
        out.writelines(line(*record) for record in records(count, seed, first))
    return path


# --- the children: one preparation each, timed from inside ---------------------------------------


def prepare_ours(args) -> dict:
    from schemas.config import DataOptions, TemplateOptions
    from schemas.manifests import ModelArtifact
    from tasks.tokenize import tokenize_dataset
    from tasks.validate import validate_data

    model = ModelArtifact.model_validate_json(Path(args.model_json).read_text())
    workers = args.workers[0]
    # None leaves the pipeline's own default shard size in force
    options = DataOptions() if args.shard_rows is None else DataOptions(shard_rows=args.shard_rows)
    started = time.perf_counter()
    data = validate_data(args.child_data, [], options, args.child_cache, workers=workers)
    validated = time.perf_counter()
    tokenized = tokenize_dataset(data, model, TemplateOptions(max_length=args.max_length), args.child_cache, workers=workers)
    done = time.perf_counter()
    splits = tokenized.stats
    return {
        "validate_s": validated - started, "tokenize_s": done - validated, "total_s": done - started,
        "rows": data.stats["rows_kept"], "tokens": splits["train"]["tokens"] + splits["eval"]["tokens"],
        "shards": data.stats.get("shards"), "tokenize_shards": splits.get("shards"),
    }


def prompt_completion_alpaca(record: dict) -> dict:
    question = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
    return {"prompt": [{"role": "user", "content": question}], "completion": [{"role": "assistant", "content": record["output"]}]}


def prompt_completion_chat(record: dict) -> dict:
    return {"prompt": record["messages"][:-1], "completion": record["messages"][-1:]}


PROMPT_COMPLETION = {"alpaca": prompt_completion_alpaca, "chat": prompt_completion_chat}


def num_proc(workers: int) -> int | None:
    return workers if workers > 1 else None  # None: datasets maps in this process, no pool


def trl_trainer(tokenizer, workers: int, max_length: int, workdir: str):
    """An SFTTrainer on a 1-layer model (as in bench_tokenize.py) whose `_prepare_dataset` maps
    with `dataset_num_proc=workers`, completion-only loss."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id)
    args = SFTConfig(output_dir=workdir, max_length=max_length, completion_only_loss=True, packing=False,
                     dataset_num_proc=num_proc(workers), report_to=[], use_cpu=True, bf16=False)
    two_rows = datasets.Dataset.from_list([prompt_completion_alpaca({"instruction": "Hi", "output": "Hello."})] * 2)
    trainer = SFTTrainer(model=LlamaForCausalLM(config), args=args, train_dataset=two_rows, processing_class=tokenizer)
    return trainer, args


def prepare_trl(args) -> dict:
    import datasets
    import pyarrow.compute as pc

    from schemas.manifests import ModelArtifact
    from tasks.core import formatting

    model = ModelArtifact.model_validate_json(Path(args.model_json).read_text())
    workers, cache = args.workers[0], Path(args.child_cache)
    tokenizer = formatting.load_tokenizer(model.uri)
    trainer, config = trl_trainer(tokenizer, workers, args.max_length, str(cache / "trainer"))
    started = time.perf_counter()
    raw = datasets.load_dataset("json", data_files=args.child_data, split="train", cache_dir=str(cache / "hf"))
    loaded = time.perf_counter()
    rows = raw.map(PROMPT_COMPLETION[args.kind], remove_columns=raw.column_names, num_proc=num_proc(workers))
    converted = time.perf_counter()
    prepared = trainer._prepare_dataset(rows, tokenizer, config, False, None, "train")
    done = time.perf_counter()
    # counted in Arrow: a Python list of every row's ids would itself raise the peak being measured
    tokens = pc.sum(pc.list_value_length(prepared.data.column("input_ids"))).as_py()
    return {"load_s": loaded - started, "convert_s": converted - loaded, "prepare_s": done - converted,
            "total_s": done - started, "rows": prepared.num_rows, "tokens": tokens}


CHILDREN = {"ours": prepare_ours, "trl": prepare_trl}


def run_child(args) -> None:
    logging.disable(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()
    print(json.dumps(CHILDREN[args.child](args)), flush=True)


# --- the parent: start a child, watch its memory, read its line -----------------------------------


def proc_field(pid: int, file: str, name: str) -> int:
    """A "Name:  123 kB" figure of /proc/<pid>/<file>, in bytes; 0 where there is none (not Linux,
    or the process is gone)."""
    try:
        with open(f"/proc/{pid}/{file}") as status:
            for line in status:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples a process and its descendants: the largest RSS sum, the largest PSS sum (every
    `PSS_EVERY`th sample: reading smaps_rollup walks the page tables, ~3 ms per GB) and each
    process's own peak (VmHWM, which the kernel keeps exactly, between samples too)."""

    PSS_EVERY = 5

    def __init__(self, pid: int):
        import psutil

        self.root, self.samples = psutil.Process(pid), 0
        self.tree_rss = self.tree_pss = 0
        self.peaks: dict[int, int] = {}

    def processes(self) -> list:
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        import psutil

        with_pss, rss_sum, pss_sum = self.samples % self.PSS_EVERY == 0, 0, 0
        self.samples += 1
        for process in self.processes():
            try:
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:
                continue  # exited between the listing and the read
            rss_sum += rss
            pss_sum += proc_field(process.pid, "smaps_rollup", "Pss:") if with_pss else 0
            self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss, proc_field(process.pid, "status", "VmHWM:"))
        self.tree_rss = max(self.tree_rss, rss_sum)
        self.tree_pss = max(self.tree_pss, pss_sum)

    def stop(self) -> None:
        import psutil

        for process in reversed(self.processes()):  # the workers first, so none is left orphaned
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass

    def figures(self) -> dict:
        return {"tree_peak_mb": self.tree_rss / MB, "tree_peak_pss_mb": self.tree_pss / MB,
                "largest_process_peak_mb": max(self.peaks.values(), default=0) / MB}


def watch(command: list[str], log: Path, timeout: float, interval: float = 0.1) -> dict:
    """Run `command`, sampling its process tree until it exits or `timeout` passes."""
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO)
        memory, deadline = TreeMemory(child.pid), time.monotonic() + timeout
        while child.poll() is None:
            if time.monotonic() > deadline:
                memory.stop()
                child.wait()
                return {"status": "timed out", "timeout_s": timeout, **memory.figures()}  # the peaks until then
            memory.sample()
            time.sleep(interval)
    return {**memory.figures(), **child_result(child.returncode, log)}


def child_result(returncode: int, log: Path) -> dict:
    lines = [line for line in log.with_suffix(".out").read_text().splitlines() if line.startswith("{")]
    if returncode == 0 and lines:
        return {"status": "ok", **json.loads(lines[-1])}
    stderr = log.with_suffix(".err").read_text().strip().splitlines()
    return {"status": "failed", "returncode": returncode, "error": "\n".join(stderr[-15:])}


def child_command(args, tool: str, data: list[Path], cache: Path, workers: int) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", tool, "--child-data", *map(str, data),
               "--child-cache", str(cache), "--model-json", args.model_json, "--workers", str(workers),
               "--kind", args.kind, "--max-length", str(args.max_length)]
    return command + (["--shard-rows", str(args.shard_rows)] if args.shard_rows is not None else [])


def measure(args, tool: str, data: list[Path], cache: Path, workers: int, size: int) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    print(f"[bench_scale] {tool}: {size:,} rows, {workers} worker(s) ...", file=sys.stderr, flush=True)
    outcome = watch(child_command(args, tool, data, cache, workers), cache.parent / f"{cache.name}.log", args.timeout)
    return {"size": size, "tool": tool, "workers": workers, **outcome}


# --- the report -------------------------------------------------------------------------------


HEADER = ("| size | tool | workers | wall s | rows/s | tokens/s | tokens/s per worker | tree peak RSS MB "
          "| tree peak PSS MB | largest process peak MB | note |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def add_rates(result: dict) -> dict:
    if result["status"] == "ok":
        seconds = result["total_s"]
        result["rows_per_s"] = result["rows"] / seconds
        result["tokens_per_s"] = result["tokens"] / seconds
        result["tokens_per_s_per_worker"] = result["tokens_per_s"] / result["workers"]
    return result


def note(result: dict) -> str:
    if result["status"] == "failed":
        return "failed: " + (result["error"].splitlines() or ["?"])[-1].replace("|", "/")[:160]
    if result["tool"] == "trl":
        return f"load {result['load_s']:.1f} s + convert {result['convert_s']:.1f} s + prepare {result['prepare_s']:.1f} s"
    shards = "".join(f"; {stage} shards {json.dumps(result[key])}" for stage, key in
                     (("validate", "shards"), ("tokenize", "tokenize_shards")) if result.get(key) is not None)
    return f"validate {result['validate_s']:.1f} s + tokenize {result['tokenize_s']:.1f} s{shards}"


def table_row(result: dict) -> str:
    size, tool = f"{result['size']:,}", result.get("label", result["tool"])
    if result["status"] != "ok":
        failure = note(result) if result["status"] == "failed" else ""
        return f"| {size} | {tool} | {result['workers']} | {result['status']} | | | | | | | {failure} |"
    return (f"| {size} | {tool} | {result['workers']} | {result['total_s']:.1f} | {result['rows_per_s']:,.0f} "
            f"| {result['tokens_per_s']:,.0f} | {result['tokens_per_s_per_worker']:,.0f} | {result['tree_peak_mb']:,.0f} "
            f"| {result['tree_peak_pss_mb']:,.0f} | {result['largest_process_peak_mb']:,.0f} | {note(result)} |")


PEAKS = {"tree RSS": "tree_peak_mb", "tree PSS": "tree_peak_pss_mb", "largest process": "largest_process_peak_mb"}


def peak_ratios(run: dict, reference: dict) -> dict[str, float | None]:
    return {name: run[key] / reference[key] if reference[key] else None for name, key in PEAKS.items()}


def completed(results: list[dict]) -> dict[tuple[int, str, int], dict]:
    """The finished main runs by (size, tool, workers); the append run is no main run."""
    return {(r["size"], r["tool"], r["workers"]): r for r in results if r["status"] == "ok" and "label" not in r}


def ratios(results: list[dict]) -> list[dict]:
    """ours / TRL at the same size and workers: throughput (rows/s) and the peaks."""
    runs, found = completed(results), []
    for (size, tool, workers), ours in runs.items():
        trl = runs.get((size, "trl", workers))
        if tool == "ours" and trl:
            found.append({"size": size, "workers": workers, "throughput": ours["rows_per_s"] / trl["rows_per_s"],
                          "peaks": peak_ratios(ours, trl), "tokens": {"ours": ours["tokens"], "trl": trl["tokens"]}})
    return found


def growth(results: list[dict]) -> list[dict]:
    """Ours' peaks at every larger size against 100,000 rows (the smallest size when 100,000 was not run)."""
    ours = {(size, workers): run for (size, tool, workers), run in completed(results).items() if tool == "ours"}
    sizes = sorted({size for size, _ in ours})
    base = 100_000 if 100_000 in sizes else (sizes[0] if sizes else 0)
    found = []
    for (size, workers), run in sorted(ours.items()):
        reference = ours.get((base, workers))
        if size > base and reference:
            found.append({"size": size, "base": base, "workers": workers, "peaks": peak_ratios(run, reference)})
    return found


def ratio_text(peaks: dict[str, float | None]) -> str:
    return ", ".join(f"{name} {value:.2f}x" if value is not None else f"{name} n/a" for name, value in peaks.items())


def print_summary(found_ratios: list[dict], found_growth: list[dict]) -> None:
    print()
    for r in found_ratios:
        print(f"ours / TRL at {r['size']:,} rows, {r['workers']} worker(s): throughput {r['throughput']:.2f}x; "
              f"peaks: {ratio_text(r['peaks'])}; tokens {r['tokens']['ours']:,} vs {r['tokens']['trl']:,}")
    for g in found_growth:
        print(f"ours' peaks, {g['size']:,} vs {g['base']:,} rows ({g['size'] / g['base']:.0f}x the rows), "
              f"{g['workers']} worker(s): {ratio_text(g['peaks'])}")


def machine_facts() -> dict:
    import psutil

    versions = {}
    for package in ("torch", "transformers", "datasets", "trl", "tokenizers", "pyarrow", "psutil"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu_count": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 1024**3,
            "platform": platform.platform(), "python": platform.python_version(), **versions}


# --- the benchmark ----------------------------------------------------------------------------


def generate(path: Path, size: int, args, seed: int, first: int = 0) -> Path:
    started = time.perf_counter()
    write_rows(path, size, args.kind, seed, first)
    print(f"[bench_scale] wrote {size:,} {args.kind} rows ({path.stat().st_size / MB:,.0f} MB) in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return path


def import_model_json(args, scratch: Path) -> str:
    """Convert (or reuse) the model once, before any clock starts; the children read its manifest."""
    from tasks.model import import_model

    model = import_model(EMBEDDED_MODEL, args.model_cache)
    path = scratch / "model.json"
    path.write_text(model.model_dump_json())
    return str(path)


def run_size(args, scratch: Path, size: int, workers_list: list[int], keep_cache: Path | None) -> list[dict]:
    data = generate(scratch / f"{args.kind}-{size}.jsonl", size, args, args.seed)
    results = []
    for workers in workers_list:
        cache = scratch / f"ours-{size}-w{workers}"
        results.append(report(measure(args, "ours", [data], cache, workers, size)))
        if cache != keep_cache:
            shutil.rmtree(cache, ignore_errors=True)  # the disk holds one run's cache at a time
        if size > args.trl_max_rows:
            results.append(report({"size": size, "tool": "trl", "workers": workers, "status": "skipped (above --trl-max-rows)"}))
            continue
        cache = scratch / f"trl-{size}-w{workers}"
        results.append(report(measure(args, "trl", [data], cache, workers, size)))
        shutil.rmtree(cache, ignore_errors=True)
    return results


def run_append(args, scratch: Path, size: int, workers: int, cache: Path) -> dict:
    """Both files again, same cache: the big file's shards should be reused, the new rows built."""
    big = scratch / f"{args.kind}-{size}.jsonl"
    # another seed and numbers past the big file's, so every new row is new
    extra = generate(scratch / f"{args.kind}-append-{args.append_rows}.jsonl", args.append_rows, args, args.seed + 1, first=size)
    result = measure(args, "ours", [big, extra], cache, workers, size)
    return report({**result, "label": f"ours, +{args.append_rows:,} rows (same cache)"})


def report(result: dict) -> dict:
    print(table_row(add_rates(result)), flush=True)
    return result


def run_benchmark(args) -> None:
    sizes = sorted(set(args.sizes))
    workers_list = args.workers = list(dict.fromkeys(args.workers or [1, os.cpu_count() or 1]))
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir))  # only this folder is ever deleted
    largest, most = sizes[-1], max(workers_list)
    append_cache = scratch / f"ours-{largest}-w{most}" if args.append_rows else None
    try:
        args.model_json = import_model_json(args, scratch)
        print(f"data: {args.kind} rows, {ROW_CHARS[0]}-{ROW_CHARS[1]} characters; SmolLM2 tokenizer; max_length "
              f"{args.max_length}; {os.cpu_count()} CPU cores; scratch {scratch}\n")
        print(HEADER, flush=True)
        results = []
        for size in sizes:
            results += run_size(args, scratch, size, workers_list, append_cache if size == largest else None)
            if size != largest:
                (scratch / f"{args.kind}-{size}.jsonl").unlink()
        if append_cache:
            results.append(run_append(args, scratch, largest, most, append_cache))
        found_ratios, found_growth = ratios(results), growth(results)
        print_summary(found_ratios, found_growth)
        save(args, results, found_ratios, found_growth)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


def save(args, results: list[dict], found_ratios: list[dict], found_growth: list[dict]) -> None:
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    from schemas.config import DataOptions

    settings = {k: v for k, v in vars(args).items() if not k.startswith("child") and k != "model_json"}
    settings["shard_rows"] = args.shard_rows or DataOptions().shard_rows  # the figure the runs used
    path.write_text(json.dumps({"args": settings, "machine": machine_facts(), "results": results,
                                "ours_over_trl": found_ratios, "ours_peak_growth": found_growth}, indent=1) + "\n")
    print(f"\nresults: {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 1_000_000], help="rows per run")
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts (default: 1 and os.cpu_count())")
    parser.add_argument("--kind", choices=sorted(LINES), default="alpaca", help="generated row format")
    parser.add_argument("--trl-max-rows", type=int, default=100_000, help="largest size TRL is run at (it is slow)")
    parser.add_argument("--append-rows", type=int, default=1000, help="rows appended at the largest size; 0: no append run")
    parser.add_argument("--shard-rows", type=int, help="DataOptions.shard_rows (default: the pipeline's)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated text")
    parser.add_argument("--model-cache", default="/tmp/sftcache-bench", help="cache_dir for import_model, kept across runs")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the scratch folder goes")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (data, caches, child logs)")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    # what the parent passes to a child, not for people
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-data", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--child-cache", help=argparse.SUPPRESS)
    parser.add_argument("--model-json", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # One process is one core, on both sides, as in the flow (flows/sft.py sets the same): the fast
    # tokenizer's own threads would otherwise make "1 worker" use every core.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        run_child(args)
    else:
        logging.disable(logging.WARNING)
        run_benchmark(args)


if __name__ == "__main__":
    main()
