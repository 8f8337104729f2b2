"""Quality parity: ours and TRL's SFTTrainer fine-tune the same model on the same rows with the
same settings, and one scorer grades both.

    python -m benchmarks.bench_quality [DATA] [--train-rows 160 --eval-rows 64 --epochs 1 --generate 16]   # CPU
    python -m benchmarks.bench_quality --train-rows 899 --eval-rows 100 --epochs 3 --generate 100           # GPU

DATA is an alpaca JSON file, by default ../shared/data/alpaca_en_demo.json next to the repository.
Records are ordered by the hash of their content: the first --eval-rows are held out, the next
--train-rows train, so the split does not depend on the file's order and a larger run holds out
the same rows. The base model is the embedded SmolLM2-135M-Instruct (`import_model`).

Ours runs the pipeline's own stages as plain functions (validate_data with the held-out rows as
eval data, tokenize_dataset, train_model) and keeps the adapter the train stage publishes. TRL
gets the same validated conversations as prompt-completion rows (completion-only loss, SmolLM2's
chat template) and a peft LoraConfig. Like for like: LoRA r/alpha/dropout/targets, peak learning
rate, cosine schedule with the same warmup share, epochs, weight decay, clipping, seed, max_length,
and B examples per optimizer step in one micro-batch (ours packs them, TRL pads them: the same
examples, so the same tokens per step over an epoch), loss normalised over the step's response
tokens on both. TRL keeps its own defaults otherwise (gradient checkpointing; bf16 on CUDA).

One scorer grades base, ours and TRL (`tasks.core.scoring`, as the evaluate stage does): the
response-token loss of the held-out rows as our tokenize stage masks them, and greedy answers to
the first --generate held-out prompts (token F1, ROUGE-L). Writes, under --out (default: a new
temporary folder): quality.json (every number), loss_curves.png (both training curves by
optimizer step, held-out losses as lines) and the stage caches. The diagnostics printed at the
end compare what could make the two differ: masks, steps, learning rate per step, tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: the report is what this prints

import torch  # noqa: E402

from schemas.config import EMBEDDED_MODEL, DataOptions, EvalOptions, LoraOptions, TemplateOptions, TrainOptions  # noqa: E402
from tasks.core.collate import IGNORE_INDEX  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
PARITY_TOLERANCE = 0.01  # the goal: our held-out loss at most 1% above TRL's


# ------------------------------------------------------------------------------------------ data


def hash_ordered_split(records: list[dict], train_rows: int, eval_rows: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records: ordered by content hash, the first eval_rows held out, the next
    train_rows trained on. Independent of file order; growing train_rows keeps the held-out rows."""
    ordered = sorted(records, key=lambda r: hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest())
    if train_rows + eval_rows > len(ordered):
        raise SystemExit(f"--train-rows {train_rows} + --eval-rows {eval_rows} > the {len(ordered)} records")
    return ordered[eval_rows : eval_rows + train_rows], ordered[:eval_rows]


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------ ours


def train_options(args) -> TrainOptions:
    """Our run's options; every one that changes the weights is handed to TRL too (`trl_config`)."""
    return TrainOptions(
        method="lora", lora=LoraOptions(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout),
        learning_rate=args.learning_rate, lr_scheduler=args.scheduler, warmup_ratio=args.warmup_ratio,
        epochs=args.epochs, micro_batch_size=args.batch, grad_accum=1, seed=args.seed,
    )


def run_ours(train_file: Path, eval_file: Path, model, args, cache: str) -> dict:
    """validate -> tokenize -> train, the pipeline's stages as plain functions."""
    from tasks.tokenize import tokenize_dataset
    from tasks.train import train_model
    from tasks.validate import validate_data

    started, cpu = time.perf_counter(), time.process_time()
    data = validate_data([str(train_file)], [str(eval_file)], DataOptions(), cache)
    tokenized = tokenize_dataset(data, model, TemplateOptions(max_length=args.max_length), cache)
    trained = train_model(tokenized, model, train_options(args), cache)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    curve = json.loads(Path(trained.loss_curve_uri).read_text())
    stats = trained.stats
    return {
        "data": data, "tokenized": tokenized, "trained_dir": trained.uri, "wall_s": wall, "cpu_s": cpu, "train_s": stats["train_s"],
        "tokens": stats["tokens"], "loss_tokens": stats["loss_tokens"], "steps": stats["steps"],
        "curve": [{"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in curve],
    }


# ------------------------------------------------------------------------------------------- TRL


def trl_dataset(ours: dict, source: str):
    """What TRL trains on. 'conversations': the validated training conversations as TRL's
    conversational prompt-completion rows (TRL renders, tokenizes and masks them itself).
    'our-tokens': our tokenized train split, input_ids and labels as is (TRL keeps a labels
    column), which takes masking out of the comparison."""
    import datasets

    from tasks.core.rows import read_canonical

    if source == "our-tokens":
        return datasets.load_from_disk(ours["tokenized"].uri)["train"].select_columns(["input_ids", "labels"])
    rows = [{"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
            for row in read_canonical(ours["data"].uri) if row["split"] == "train"]
    return datasets.Dataset.from_list(rows)


def trl_config(args, output_dir: str, cuda: bool):
    """SFTConfig with our run's settings; TRL's own defaults for the rest. On CPU the base is loaded
    in fp32 (SmolLM2's config says bf16, which `dtype='auto'` would load: ours trains fp32 on CPU)."""
    from trl import SFTConfig

    ours = train_options(args).settings()
    return SFTConfig(
        output_dir=output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=ours.peak_learning_rate, lr_scheduler_type=ours.lr_scheduler,
        warmup_steps=ours.warmup_ratio, weight_decay=ours.weight_decay, max_grad_norm=ours.max_grad_norm, seed=ours.seed,
        max_length=args.max_length, completion_only_loss=True, packing=False, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=not cuda, bf16=cuda,
        model_init_kwargs={"attn_implementation": "sdpa", **({} if cuda else {"dtype": torch.float32})},
    )


def lora_config(args):
    from peft import LoraConfig

    lora = train_options(args).settings().lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                      task_type="CAUSAL_LM")


def run_trl(ours: dict, model_dir: str, args, out: Path) -> dict:
    """SFTTrainer from the model folder (TRL loads it, prepares the rows, trains); its adapter is
    saved where `modeling.load_tuned` finds ours (<folder>/adapter)."""
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTTrainer

    lrs: dict[int, float] = {}

    class LearningRates(TrainerCallback):  # the rate each optimizer step used (logs show the next one)
        def on_pre_optimizer_step(self, _args, state, control, optimizer=None, **kwargs):
            lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    cuda = torch.cuda.is_available()
    started, cpu = time.perf_counter(), time.process_time()
    trainer = SFTTrainer(model=model_dir, args=trl_config(args, str(out / "trl-run"), cuda),
                         train_dataset=trl_dataset(ours, args.trl_input), peft_config=lora_config(args),
                         callbacks=[LearningRates()])
    trainer.remove_callback(PrinterCallback)  # its per-step dicts; the curve is read from log_history
    result = trainer.train()
    trainer.save_model(str(out / "trl" / "adapter"))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    prepared = trainer.train_dataset
    tokens = sum(len(ids) for ids in prepared["input_ids"]) * args.epochs
    curve = [{"step": log["step"], "loss": log["loss"], "lr": lrs.get(log["step"])} for log in trainer.state.log_history if "loss" in log]
    del trainer
    return {"trained_dir": str(out / "trl"), "wall_s": wall, "cpu_s": cpu, "train_s": result.metrics["train_runtime"], "tokens": tokens,
            "steps": result.global_step, "curve": curve, "prepared": prepared}


# --------------------------------------------------------------------------------------- scoring


def held_out(ours: dict, model, args) -> dict:
    """The held-out rows as the scorer reads them: our tokenized eval split (examples), and the
    first --generate eval prompts with their references, exactly as the evaluate stage builds them."""
    from datasets import load_from_disk

    from tasks.core import formatting, scoring
    from tasks.evaluate import eval_samples

    tokenizer = formatting.load_tokenizer(model.uri)
    split = load_from_disk(ours["tokenized"].uri)["eval"]
    samples = eval_samples(ours["data"].uri, args.generate)
    template = TemplateOptions(max_length=args.max_length)
    return {
        "tokenizer": tokenizer,
        "examples": [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in split],
        "prompts": [scoring.prompt_ids(s["messages"], tokenizer, template, args.max_new_tokens, s["tools"]) for s in samples],
        "references": [s["reference"] for s in samples],
    }


def score(model, rows: dict, args) -> dict:
    """Held-out response loss, perplexity and the generation metrics of one model."""
    from tasks.core import metrics, scoring

    started = time.perf_counter()
    scores = scoring.response_loss(model, rows["examples"], args.eval_batch)
    answers = scoring.generate(model, rows["tokenizer"], rows["prompts"], args.max_new_tokens, args.eval_batch)
    scores.update(metrics.score_generations(answers, rows["references"], [[] for _ in answers]))
    scores.update(num_generated=len(answers), score_s=round(time.perf_counter() - started, 1), answers=answers)
    return scores


def score_all(model_dir: str, trained: dict[str, str], rows: dict, args) -> dict[str, dict]:
    """base, then each trained adapter on a freshly loaded base: the same loading the evaluate stage uses."""
    from tasks.core import modeling

    device = modeling.pick_device()
    dtype = modeling.pick_dtype(device)
    results = {"base": score(modeling.load_causal_lm(model_dir, False, dtype, device), rows, args)}
    for name, folder in trained.items():
        results[name] = score(modeling.load_tuned(model_dir, folder, "lora", False, dtype, device), rows, args)
    for name, scores in results.items():
        print(f"scored {name}: held-out loss {scores['eval_loss']:.4f} in {scores['score_s']} s", flush=True)
    return results


# ----------------------------------------------------------------------------------- diagnostics


def mask_agreement(ours_train, trl_prepared, newline_id: int) -> dict:
    """Same rows, same order: identical input_ids and labels; loss tokens of each; rows whose TRL
    labels are ours plus the newline after <|im_end|> (TRL's completion keeps the template's
    trailing newline)."""
    same_ids = newline_only = identical = 0
    ours_loss = trl_loss = 0
    for mine, theirs in zip(ours_train, trl_prepared):
        ids, labels, other = mine["input_ids"], list(mine["labels"]), list(theirs["labels"])
        same_ids += ids == theirs["input_ids"]
        ours_loss += sum(label != IGNORE_INDEX for label in labels)
        trl_loss += sum(label != IGNORE_INDEX for label in other)
        identical += labels == other
        plus_newline = labels[:-1] + [newline_id] if ids and ids[-1] == newline_id else labels
        newline_only += labels != other and plus_newline == other
    return {"rows": len(trl_prepared), "same_input_ids": same_ids, "same_mask": identical, "trl_adds_only_final_newline": newline_only,
            "ours_loss_tokens": ours_loss, "trl_loss_tokens": trl_loss}


def schedule_gap(ours_curve: list[dict], trl_curve: list[dict]) -> dict:
    """Learning rate per optimizer step of both, and where they differ most."""
    pairs = [(a["step"], a["lr"], b["lr"]) for a, b in zip(ours_curve, trl_curve) if b["lr"] is not None]
    worst = max(pairs, key=lambda p: abs(p[1] - p[2]), default=None)
    return {"first_steps": [{"step": s, "ours": a, "trl": b} for s, a, b in pairs[:4]],
            "largest_gap": {"step": worst[0], "ours": worst[1], "trl": worst[2]} if worst else None,
            "steps_after_warmup_equal": sum(abs(a - b) <= 1e-9 * max(a, 1e-12) for _, a, b in pairs[4:])}


def diagnostics(ours: dict, trl: dict, tokenizer) -> dict:
    from datasets import load_from_disk

    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    ours_train = load_from_disk(ours["tokenized"].uri)["train"]
    return {
        "masks": mask_agreement(ours_train, trl["prepared"], newline),
        "steps": {"ours": ours["steps"], "trl": trl["steps"]},
        "tokens": {"ours": ours["tokens"], "trl": trl["tokens"]},
        "learning_rate": schedule_gap(ours["curve"], trl["curve"]),
    }


# ---------------------------------------------------------------------------------------- report


def plot_curves(ours: dict, trl: dict, results: dict, path: Path) -> None:
    """Both training losses by optimizer step; the held-out losses of base, ours and TRL as lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, run, color in (("ours", ours, "tab:blue"), ("TRL SFTTrainer", trl, "tab:orange")):
        axes.plot([r["step"] for r in run["curve"]], [r["loss"] for r in run["curve"]], label=f"{name}: train loss", color=color)
    for name, color in (("base", "tab:gray"), ("ours", "tab:blue"), ("trl", "tab:orange")):
        axes.axhline(results[name]["eval_loss"], linestyle="--", color=color, linewidth=1, label=f"{name}: held-out loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("response-token loss")
    axes.set_title("SmolLM2-135M LoRA: ours vs TRL SFTTrainer")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(str(path), format="png")


def markdown(results: dict, ours: dict, trl: dict) -> str:
    """The README table: one row per model, the relative loss gap against TRL, the run's times."""
    lines = ["| model | held-out loss | perplexity | token F1 | ROUGE-L | loss vs TRL | train loop s | tokens/s | wall s | CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"base": "base SmolLM2-135M-Instruct", "ours": "ours (packed, sdpa)", "trl": "TRL SFTTrainer (padded, its defaults)"}
    for name, run in {"base": None, "ours": ours, "trl": trl}.items():
        r = results[name]
        gap = (r["eval_loss"] - results["trl"]["eval_loss"]) / results["trl"]["eval_loss"]
        timing = (f"{run['train_s']:.0f} | {run['tokens'] / run['train_s']:,.0f} | {run['wall_s']:.0f} | {run['cpu_s']:.0f}"
                  if run else "- | - | - | -")
        lines.append(f"| {names[name]} | {r['eval_loss']:.4f} | {r['perplexity']:.3f} | {r['token_f1']:.3f} | {r['rouge_l']:.3f} "
                     f"| {gap:+.2%} | {timing} |")
    return "\n".join(lines)


def summary_lines(results: dict, ours: dict, trl: dict, checks: dict) -> list[str]:
    gap = (results["ours"]["eval_loss"] - results["trl"]["eval_loss"]) / results["trl"]["eval_loss"]
    masks, lr = checks["masks"], checks["learning_rate"]
    verdict = "PASS" if gap <= PARITY_TOLERANCE else "FAIL"
    return [
        f"parity: ours {results['ours']['eval_loss']:.4f} vs TRL {results['trl']['eval_loss']:.4f} held-out loss: {gap:+.2%} "
        f"({verdict}, goal <= +{PARITY_TOLERANCE:.0%}); ours vs TRL: train loop {trl['train_s'] / ours['train_s']:.2f}x, "
        f"stage wall {trl['wall_s'] / ours['wall_s']:.2f}x, CPU seconds {trl['cpu_s'] / ours['cpu_s']:.2f}x",
        f"masks: input_ids identical on {masks['same_input_ids']}/{masks['rows']} training rows, loss masks identical on "
        f"{masks['same_mask']}, TRL's = ours + the newline after <|im_end|> on {masks['trl_adds_only_final_newline']}; "
        f"loss tokens ours {masks['ours_loss_tokens']:,}, TRL {masks['trl_loss_tokens']:,}",
        f"steps: ours {checks['steps']['ours']}, TRL {checks['steps']['trl']}; tokens trained: ours {checks['tokens']['ours']:,}, "
        f"TRL {checks['tokens']['trl']:,.0f} (non-padding)",
        f"learning rate, first steps (ours / TRL): "
        + ", ".join(f"{p['step']}: {p['ours']:.2e} / {p['trl']:.2e}" for p in lr["first_steps"])
        + f"; largest gap at step {lr['largest_gap']['step']}; later steps equal: {lr['steps_after_warmup_equal']}",
    ]


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA), help="alpaca JSON file")
    parser.add_argument("--train-rows", type=int, default=160, help="rows trained on (CPU default sized to finish in 15 minutes)")
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out rows scored by response loss")
    parser.add_argument("--generate", type=int, default=16, help="held-out prompts answered greedily (token F1, ROUGE-L)")
    parser.add_argument("--max-new-tokens", type=int, default=EvalOptions().max_new_tokens)
    parser.add_argument("--eval-batch", type=int, default=EvalOptions().batch_size)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step, both (one micro-batch)")
    parser.add_argument("--learning-rate", type=float, default=None, help="peak; default: ours' LoRA default")
    parser.add_argument("--scheduler", choices=["cosine", "linear"], default="cosine")
    parser.add_argument("--warmup-ratio", type=float, default=TrainOptions().warmup_ratio)
    parser.add_argument("--lora-r", type=int, default=LoraOptions().r)
    parser.add_argument("--lora-alpha", type=float, default=LoraOptions().alpha)
    parser.add_argument("--lora-dropout", type=float, default=LoraOptions().dropout)
    parser.add_argument("--max-length", type=int, default=TemplateOptions().max_length)
    parser.add_argument("--seed", type=int, default=TrainOptions().seed)
    parser.add_argument("--trl-input", choices=["conversations", "our-tokens"], default="conversations",
                        help="TRL's rows: prompt-completion conversations it tokenizes itself, or our tokenized input_ids/labels")
    parser.add_argument("--model-cache", default=str(REPO / ".sft-cache"), help="cache_dir for import_model")
    parser.add_argument("--out", default=None, help="folder for quality.json, loss_curves.png and the stage caches")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def quiet() -> None:
    """Progress bars and library warnings off: the report is what this prints."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.disable(logging.WARNING)
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tasks.model import import_model

    started, load_start = time.perf_counter(), os.getloadavg()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-quality-"))
    train, held = hash_ordered_split(json.loads(Path(args.data).read_text()), args.train_rows, args.eval_rows)
    train_file, eval_file = write_json(out / "data" / "train.json", train), write_json(out / "data" / "eval.json", held)
    model = import_model(EMBEDDED_MODEL, args.model_cache)
    device = "cuda" if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"data: {args.data}: {len(train)} train rows, {len(held)} held-out rows (content-hash order); SmolLM2-135M-Instruct, "
          f"LoRA r {args.lora_r} alpha {args.lora_alpha:g} dropout {args.lora_dropout:g}, {args.scheduler}, "
          f"{args.epochs:g} epoch(s), {args.batch} examples/step, seed {args.seed}; {device}; out {out}", flush=True)

    ours = run_ours(train_file, eval_file, model, args, str(out / "cache"))
    print(f"ours: {ours['steps']} steps, train loop {ours['train_s']:.1f} s, wall {ours['wall_s']:.1f} s", flush=True)
    trl = run_trl(ours, model.uri, args, out)
    print(f"TRL:  {trl['steps']} steps, train loop {trl['train_s']:.1f} s, wall {trl['wall_s']:.1f} s", flush=True)

    rows = held_out(ours, model, args)
    results = score_all(model.uri, {"ours": ours["trained_dir"], "trl": trl["trained_dir"]}, rows, args)
    checks = diagnostics(ours, trl, rows["tokenizer"])
    plot_curves(ours, trl, results, out / "loss_curves.png")
    table = markdown(results, ours, trl)
    report = {
        "args": vars(args), "device": device, "torch": torch.__version__, "results": results, "diagnostics": checks,
        "ours": {k: ours[k] for k in ("wall_s", "cpu_s", "train_s", "tokens", "loss_tokens", "steps", "curve")},
        "trl": {k: trl[k] for k in ("wall_s", "cpu_s", "train_s", "tokens", "steps", "curve")},
        "references": rows["references"], "markdown": table, "total_s": time.perf_counter() - started,
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }
    write_json(out / "quality.json", report)
    print()
    print(table)
    print()
    for line in summary_lines(results, ours, trl, checks):
        print("- " + line)
    print(f"- wrote {out / 'quality.json'} and {out / 'loss_curves.png'}; total {report['total_s']:.0f} s")


if __name__ == "__main__":
    main()
