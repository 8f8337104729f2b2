"""Ours against TRL's SFTTrainer on the same workload, side by side.

Workload: the records of alpaca_en_demo.json in the SmolLM2 chat template (ChatML with its default
system prompt), max_length 1024, loss on the response only, on a random-init Llama of a given
shape. Every row trains the same tokenized examples for --steps optimizer steps of about the same
work: TRL takes --micro-batch rows per step (padded: one example each; packed: examples filling
max_length tokens each); ours packs as many examples as fill --micro-batch x max_length tokens
(or --ours-examples) into micro-batches capped at that many tokens (train.micro_batch_tokens), so
no step of ours carries more than a packed step of TRL. Tokens per step are reported for both.

    python -m benchmarks.bench_train --shape tiny --steps 8 --records 200 --threads 2        # CPU, all rows
    python -m benchmarks.bench_train --shape smollm2-135m --steps 60 --tokenizer /path/to/tok  # GPU
    python -m benchmarks.bench_train --shape llama-1.7b --runs ours trl-best --compile on --trl-compile on ...

Rows: `ours` (our defaults: compile 'auto' unless --compile says otherwise), `trl-defaults`,
`trl-best` (packing, no gradient checkpointing, flex attention and torch_compile on CUDA unless
--trl-compile off). Each row is printed as soon as it is measured and, with --out, appended to a
JSON Lines file, so separate processes (one per row: clean memory figures, and a `timeout` that
cuts one row off keeps the others) build one table: `--table rows.jsonl`. --model-dir shares one
saved model between them.

Reported per row: non-padding tokens/s and label tokens/s (steady state: from the end of warm-up
step --warmup-steps to the end of the last step, for every tool, so compilation and the
recompilations of the first lengths stay out of it), tokens per step, peak memory (CUDA: max
allocated; CPU: peak RSS of this process since the row started), time to first step (from loading
the model to the end of step 1), tokens/s of a 200-step run counted from launch (time to the end of
warm-up plus the other steps at the steady rate: where compiling pays), MFU = 6 x params x tokens/s
/ peak FLOPs (989e12 on H100/H200, bf16 dense), and the graphs torch.compile built in all and after
warm-up (recompilations in steady state; 0 when nothing is compiled).

Needs torch, transformers, peft; TRL rows need trl and datasets: without them they are skipped
with a note, and the run exits non-zero after printing the rows it measured. Tokenizes with tasks.core.formatting when it imports (it needs pydantic), else
with a local ChatML masking function.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.core import trainer  # noqa: E402
from tasks.core.collate import IGNORE_INDEX  # noqa: E402
from tasks.core.train_settings import LoraSettings, TrainSettings  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536),
    "llama-1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192),
}
VOCAB = 49152
MAX_LENGTH = 1024
H100_BF16_FLOPS = 989e12
LAUNCH_STEPS = 200
DATA_CANDIDATES = [base / "shared" / "data" / "alpaca_en_demo.json" for base in (ROOT, ROOT.parent)]
DEFAULT_DATA = next((path for path in DATA_CANDIDATES if path.exists()), DATA_CANDIDATES[0])


# ------------------------------------------------------------------------------------- workload


def alpaca_conversations(path: Path, records: int) -> list[list[dict]]:
    rows = json.loads(Path(path).read_text())[:records]
    conversations = []
    for row in rows:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}])
    return conversations


def encode(conversations: list[list[dict]], tokenizer) -> tuple[list[dict], str]:
    """(examples, which encoder): the project's formatter when importable, else local ChatML."""
    try:
        from schemas.config import TemplateOptions
        from tasks.core.formatting import encode_batch
    except ImportError:
        return [e for e in (chatml_encode(c, tokenizer) for c in conversations) if e], "local ChatML"
    encoded = encode_batch(conversations, tokenizer, TemplateOptions(max_length=MAX_LENGTH))
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded if hasattr(e, "input_ids")]
    return examples, "tasks.core.formatting"


def chatml_encode(messages: list[dict], tokenizer) -> dict | None:
    """The chat template renders the prompt; the answer and its <|im_end|> carry loss."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids, answer_ids, tail_ids = ids(prompt), ids(messages[-1]["content"] + "<|im_end|>"), ids("\n")
    input_ids = prompt_ids + answer_ids + tail_ids
    if len(input_ids) > MAX_LENGTH:
        return None
    return {"input_ids": input_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [IGNORE_INDEX] * len(tail_ids)}


def find_tokenizer(path: str | None) -> str:
    if path:
        return path
    try:
        from tasks.model import import_model
    except ImportError as error:
        raise SystemExit(f"pass --tokenizer (a folder with SmolLM2's tokenizer): {error}")
    return import_model("embedded:smollm2-135m-instruct", os.environ.get("SFT_BENCH_CACHE", "/tmp/sftcache")).uri


def build_model(shape: str, tokenizer, folder: Path, dtype: torch.dtype, device: str) -> int:
    """A random-init Llama of the shape, built on `device` in `dtype` (no fp32 copy on the CPU) and
    saved to `folder`, unless the folder already holds one (another row's process built it).
    Returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )
    if (folder / "config.json").is_file():
        with torch.device("meta"):
            return sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    scratch = folder.with_name(folder.name + f".partial-{os.getpid()}")  # a row killed while saving leaves no half model
    model.save_pretrained(str(scratch))
    tokenizer.save_pretrained(str(scratch))
    for item in sorted(scratch.iterdir(), key=lambda item: item.name == "config.json"):  # config.json, the mark, last
        item.replace(folder / item.name)
    scratch.rmdir()
    params = sum(p.numel() for p in model.parameters())
    del model
    return params


# ------------------------------------------------------------------------------------- measuring


class Memory:
    """Peak memory of one row: CUDA max allocated, or this process's peak RSS (VmHWM, reset)."""

    def __init__(self, device: str):
        self.device = device

    def reset(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        elif Path("/proc/self/clear_refs").exists():
            Path("/proc/self/clear_refs").write_text("5")

    def peak_gib(self) -> float | None:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        status = Path("/proc/self/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
        return None


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def reset_compiler() -> None:
    """Each row compiles from scratch: nothing cached by the row before counts for it."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()


def summarise(name: str, marks: list[tuple[float, int, int, int]], started: float, loss: float | None, memory: float | None,
              warmup: int) -> dict:
    """marks: (time at the end of step k, tokens so far, label tokens so far, graphs compiled so
    far) for k = 1..N. Steady state runs from the end of step `warmup` (at least 1) to the end."""
    warmup = max(1, min(warmup, len(marks) - 1))
    (tw, tokw, labw, graphsw), (tn, tokn, labn, graphsn) = marks[warmup - 1], marks[-1]
    steady_steps = len(marks) - warmup
    seconds = max(tn - tw, 1e-9)
    steady = (tokn - tokw) / seconds if steady_steps else tokn / max(tn - started, 1e-9)
    per_step = tokn / len(marks)
    # A 200-step run counted from launch: the warm-up steps as measured, the others at the steady rate.
    launch_s = (tw - started) + (LAUNCH_STEPS - warmup) * per_step / max(steady, 1e-9)
    return {
        "name": name,
        "steps": len(marks),
        "warmup_steps": warmup,
        "tokens_per_s": steady,
        "label_tokens_per_s": (labn - labw) / seconds if steady_steps else labn / max(tn - started, 1e-9),
        "tokens_per_step": per_step,
        "first_step_s": marks[0][0] - started,
        "launch_200_tokens_per_s": LAUNCH_STEPS * per_step / launch_s,
        "peak_gib": memory,
        "final_loss": loss,
        "graphs": graphsn,
        "graphs_after_warmup": graphsn - graphsw,
    }


def run_ours(model_dir: Path, examples: list[dict], args, device: str, memory: Memory) -> dict:
    settings = TrainSettings(  # the run's defaults (no pydantic needed), but for these
        method=args.method,
        max_steps=args.steps,
        micro_batch_size=ours_examples_per_step(args, examples),
        micro_batch_tokens=args.micro_batch * MAX_LENGTH,  # no micro-batch above a packed step of TRL
        checkpoint_every=args.steps + 1,
        **({"compile": args.compile} if args.compile else {}),
    )
    rows = trainer.TokenRows.from_examples(examples)
    marks, losses = [], []

    def progress(event: dict) -> None:
        marks.append((time.perf_counter(), event["tokens"], event["loss_tokens"], compiled_graphs()))
        losses.append(event["loss"])

    with tempfile.TemporaryDirectory(prefix="bench-ours-") as out:
        spec = trainer.TrainSpec(str(model_dir), "", f"{out}/result", f"{out}/checkpoints", settings)
        reset_compiler()
        memory.reset()
        started = time.perf_counter()
        stats = trainer.run_worker(spec, progress=progress, rows=rows, show_bar=False, publish=False)
        peak = memory.peak_gib()
    compiled = {"on": "compile on", "off": "compile off"}.get(settings.compile, "compile auto: " + ("on" if stats["compiled"] else "off"))
    label = f"ours ({stats['attention']}, packed, {compiled}, gc {'on' if stats['gradient_checkpointing'] else 'off'})"
    return summarise(label, marks, started, losses[-1], peak, args.warmup_steps)


def ours_examples_per_step(args, examples: list[dict]) -> int:
    """Examples per step (ours packs them into one micro-batch). By default as many as fill the
    micro-batch's rows of max_length, so a step carries about the tokens of a step of TRL with
    packing (micro-batch rows of max_length each): the same work per optimizer step."""
    if args.ours_examples:
        return args.ours_examples
    mean_length = sum(len(e["input_ids"]) for e in examples) / len(examples)
    return max(1, int(args.micro_batch * MAX_LENGTH / mean_length))


def run_trl(name: str, model_dir: Path, examples: list[dict], args, device: str, memory: Memory, best: bool) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = device == "cuda"
    dataset = datasets.Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]})
    flags = dict(packing=True, gradient_checkpointing=False, torch_compile=cuda and args.trl_compile == "on") if best else {}
    attention = "flex_attention" if best and cuda else "sdpa"
    peak_lr = TrainSettings(method=args.method).peak_learning_rate  # the same peak as ours
    marks, counts, losses = [], [], []

    class Marks(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            done = counts[: state.global_step]  # the dataloader may have collated one batch ahead
            marks.append((time.perf_counter(), sum(c[0] for c in done), sum(c[1] for c in done), compiled_graphs()))

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        config = SFTConfig(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.micro_batch, max_length=MAX_LENGTH,
            learning_rate=peak_lr, logging_steps=1, save_strategy="no", report_to=[], seed=0,
            bf16=cuda, use_cpu=not cuda, model_init_kwargs={"attn_implementation": attention}, **flags,
        )
        peft_config = None
        if args.method == "lora":
            from peft import LoraConfig

            lora = LoraSettings()  # ours' defaults
            peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        reset_compiler()
        memory.reset()
        started = time.perf_counter()
        sft = SFTTrainer(model=str(model_dir), args=config, train_dataset=dataset, peft_config=peft_config, callbacks=[Marks()])
        sft.data_collator = _Counting(sft.data_collator, counts)
        sft.train()
        peak = memory.peak_gib()
        del sft
    label = f"TRL {name} ({attention}, {'packed' if best else 'padded'}, gc {'off' if best else 'on'}{', compiled' if flags.get('torch_compile') else ''})"
    return summarise(label, marks, started, losses[-1] if losses else None, peak, args.warmup_steps)


class _Counting:
    """Wraps TRL's collator to count each batch's non-padding and label tokens, in order."""

    def __init__(self, collator, counts: list):
        self.collator, self.counts = collator, counts

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        self.counts.append((tokens, int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())))
        return batch


# ---------------------------------------------------------------------------------------- report


HEADER = (
    f"| run | tokens/s | label tokens/s | tokens/step | peak GiB | first step s | tokens/s, {LAUNCH_STEPS} steps from launch | MFU "
    "| graphs compiled (after warm-up) | final loss | ours vs it (tokens/s) | ours vs it (200 steps from launch) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def table_line(row: dict, ours: dict | None) -> str:
    """One markdown row; the ratios compare the first `ours` row with this one."""
    mfu = f"{6 * row['params'] * row['tokens_per_s'] / row['peak_flops']:.1%}" if row.get("peak_flops") else "n/a"
    peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "n/a"
    loss = f"{row['final_loss']:.3f}" if row["final_loss"] is not None else "n/a"
    ratio = f"{ours['tokens_per_s'] / row['tokens_per_s']:.2f}x" if ours else "n/a"
    launch_ratio = f"{ours['launch_200_tokens_per_s'] / row['launch_200_tokens_per_s']:.2f}x" if ours else "n/a"
    return (
        f"| {row['name']} | {row['tokens_per_s']:,.0f} | {row['label_tokens_per_s']:,.0f} | {row['tokens_per_step']:,.0f} "
        f"| {peak} | {row['first_step_s']:.1f} | {row['launch_200_tokens_per_s']:,.0f} | {mfu} "
        f"| {row['graphs']} ({row['graphs_after_warmup']}) | {loss} | {ratio} | {launch_ratio} |"
    )


def markdown(rows: list[dict], notes: list[str]) -> str:
    ours = next((row for row in rows if row["name"].startswith("ours")), None)
    return "\n".join([HEADER, *(table_line(row, ours) for row in rows), "", *(f"- {note}" for note in notes)])


def read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows and the distinct notes of a --out file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    notes = list(dict.fromkeys(note for row in rows for note in row.get("notes", [])))
    return rows, notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the steady-state rate, for every tool")
    parser.add_argument("--records", type=int, default=999, help="alpaca records to use (at most 999)")
    parser.add_argument("--micro-batch", type=int, default=8, help="TRL: rows per step; ours: micro_batch_tokens = this x max_length")
    parser.add_argument("--ours-examples", type=int, default=0,
                        help="ours: examples per step (default: as many as fill micro-batch x max_length tokens, like TRL's packed rows)")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="alpaca_en_demo.json")
    parser.add_argument("--tokenizer", default=None, help="folder with SmolLM2's tokenizer (default: import the embedded model)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="rows to measure, in this order")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default=None, help="ours: train.compile (default: ours' default, auto)")
    parser.add_argument("--trl-compile", choices=["on", "off"], default="on", help="TRL best: torch_compile on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-trl", action="store_true", help="same as --runs ours")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: 989 on H100/H200)")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random-init model is saved, or found (shared by processes)")
    parser.add_argument("--out", type=Path, default=None, help="append each measured row to this JSON Lines file")
    parser.add_argument("--table", type=Path, default=None, help="print the table of a --out file and exit")
    return parser.parse_args(argv)


RUNS = ("ours", "trl-defaults", "trl-best")


def measure(run: str, model_dir: Path, examples: list[dict], args, device: str, memory: Memory) -> dict:
    if run == "ours":
        return run_ours(model_dir, examples, args, device, memory)
    return run_trl(run.removeprefix("trl-"), model_dir, examples, args, device, memory, best=run == "trl-best")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        print(markdown(*read_rows(args.table)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(find_tokenizer(args.tokenizer))
    examples, encoder = encode(alpaca_conversations(Path(args.data), args.records), tokenizer)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else (H100_BF16_FLOPS if any(g in name for g in ("H100", "H200")) else None)
    notes = [
        f"{len(examples)} examples ({encoder}), {sum(len(e['input_ids']) for e in examples):,} tokens, shape {args.shape}, "
        f"method {args.method}, {args.steps} steps, device {name}, torch {torch.__version__}",
        f"a step: ours {ours_examples_per_step(args, examples)} examples packed into micro-batches of at most "
        f"{args.micro_batch * MAX_LENGTH} tokens; TRL {args.micro_batch} rows (padded: one example each; packed: examples filling "
        f"{MAX_LENGTH} tokens each)",
        f"tokens/s and label tokens/s are steady state (end of step {args.warmup_steps} to the end of the last step); first step includes loading.",
        f"{LAUNCH_STEPS} steps from launch: tokens of {LAUNCH_STEPS} steps over (time to the end of warm-up + the other steps at the steady rate).",
    ]
    runs = ["ours"] if args.skip_trl else args.runs
    skipped: list[str] = []
    if any(run.startswith("trl") for run in runs):
        try:
            import datasets  # noqa: F401  (the TRL rows need it too)
            import trl

            notes.append(f"TRL {trl.__version__}; TRL's bf16 default is kept on CUDA and turned off on CPU (fp32 everywhere on CPU).")
        except ImportError as error:
            notes.append(f"TRL rows skipped: {error}")
            skipped = [run for run in runs if run.startswith("trl")]
            runs = [run for run in runs if not run.startswith("trl")]
    memory = Memory(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-model-") as scratch:
        model_dir = args.model_dir or Path(scratch)
        model_dir.mkdir(parents=True, exist_ok=True)
        params = build_model(args.shape, tokenizer, model_dir, torch.bfloat16 if device == "cuda" else torch.float32, device)
        notes.append(f"{params / 1e6:.1f}M parameters; MFU = 6 x params x tokens/s / peak" + ("" if peak_flops else " (n/a: no known peak)"))
        print(HEADER, flush=True)
        for run in runs:
            row = {**measure(run, model_dir, examples, args, device, memory), "params": params, "peak_flops": peak_flops,
                   "shape": args.shape, "notes": notes}
            rows.append(row)
            print(table_line(row, next((r for r in rows if r["name"].startswith("ours")), None)), flush=True)
            if args.out:
                with args.out.open("a") as out:
                    out.write(json.dumps(row) + "\n")
    print()
    print(markdown(rows, notes))
    if skipped:  # the table is printed, but a run that asked for these rows did not get them
        raise SystemExit(f"rows not measured: {', '.join(skipped)} (see the notes)")


if __name__ == "__main__":
    main()
