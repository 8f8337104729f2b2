"""Quality parity: ours and TRL's SFTTrainer fine-tune the same model on the same rows with the
same settings, and one scorer grades both.

    python -m benchmarks.bench_quality [DATA]                                                      # CPU, < 15 min
    python -m benchmarks.bench_quality --train-rows 899 --eval-rows 100 --epochs 3 --generate 100  # GPU

DATA is an alpaca JSON file, by default ../shared/data/alpaca_en_demo.json next to the repository.
Records are ordered by the hash of their content: the first --eval-rows are held out, the next
--train-rows are trained on, so the split does not depend on the file's order and a larger run
holds out the same rows. The base model is the embedded SmolLM2-135M-Instruct (`import_model`).
The defaults (160 train rows, 1 epoch, 64 held-out rows, 16 generated answers) finish in under
15 minutes on a 2-core CPU; the same command runs on a GPU with larger numbers (it needs the
project's dependencies, since ours runs the real stages).

Ours runs the pipeline's stages as plain functions (validate_data with the held-out rows as eval
data, tokenize_dataset, train_model) and is scored from the adapter the train stage publishes.
TRL gets the same validated conversations as prompt-completion rows (completion-only loss,
SmolLM2's chat template) and a peft LoraConfig. Like for like: LoRA r/alpha/dropout/targets, peak
learning rate, cosine schedule and warmup share, epochs, weight decay, clipping, seed, max_length,
and --batch examples per optimizer step in one micro-batch (ours packs them, TRL pads them: the
same examples, so the same tokens per step), the loss normalised over the step's response tokens
on both. With --order ours (the default) TRL reads the rows in the order our trainer visits them,
so step s of both trains on the same examples and the two loss curves compare step by step;
--order own lets TRL shuffle. --trl-input our-tokens hands TRL our input_ids and labels instead
of conversations, which takes tokenization and masking out of the comparison. TRL keeps its own
defaults otherwise (gradient checkpointing on; bf16 on CUDA).

One scorer grades base, ours and TRL (`tasks.core.scoring`, loaded as the evaluate stage loads
them): the response-token loss of the held-out rows as our tokenize stage masks them, and greedy
answers to the first --generate held-out prompts (token F1, ROUGE-L). Writes, under --out (default:
a new temporary folder), quality.json (every number), loss_curves.png (both training losses by
optimizer step, the held-out losses as lines) and the stage caches. The diagnostics printed last
compare what could make the two differ: tokens and masks, loss per step, learning rate per step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
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
        eval_every=0,  # the last step's weights, as TRL's, and no evaluation inside the timed loop
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
        "tokens": stats["tokens"], "loss_tokens": stats["loss_tokens"], "steps": stats["steps"], "attention": stats["attention"],
        "curve": [{"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in curve],
    }


# ------------------------------------------------------------------------------------------- TRL


def trl_dataset(ours: dict, source: str):
    """What TRL trains on. 'conversations': the validated training conversations as TRL's
    conversational prompt-completion rows (TRL renders, tokenizes and masks them itself).
    'our-tokens': our tokenized train split, input_ids and labels as is (TRL keeps a labels
    column), which takes masking out of the comparison."""
    import datasets

    from tasks.core.rows import read_dataset

    if source == "our-tokens":
        return datasets.load_from_disk(ours["tokenized"].uri)["train"].select_columns(["input_ids", "labels"])
    rows = [{"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
            for row in read_dataset(ours["data"].uri) if row["split"] == "train"]
    if len(rows) != ours["tokenized"].stats["train"]["kept"]:  # row i of both must be the same example
        raise SystemExit("our tokenize stage dropped training rows (longer than --max-length?): raise --max-length")
    return datasets.Dataset.from_list(rows)


def our_order(ours: dict, args) -> list[int]:
    """The training rows in the order our trainer visits them, step after step (its DataOrder over
    the steps it plans), so TRL, reading them sequentially, sees the same examples at every step."""
    from tasks.core import trainer

    rows = trainer.load_rows(ours["tokenized"].uri)
    settings = train_options(args).settings()
    plan = trainer.plan_steps(rows, settings, world=1)
    order = trainer.DataOrder(len(rows), settings.seed)
    return [i for step in range(plan.total_steps) for i in order.global_batch(step, plan.global_batch)]


def trl_config(args, output_dir: str, cuda: bool):
    """SFTConfig with our run's settings; TRL's own defaults for the rest. On CPU the base is loaded
    in fp32 (SmolLM2's config says bf16, which `dtype='auto'` would load: ours trains fp32 on CPU).
    --order ours: one sequential pass over rows already in our order (`our_order`)."""
    from trl import SFTConfig

    ours = train_options(args).settings()
    same_order = args.order == "ours"
    return SFTConfig(
        output_dir=output_dir, num_train_epochs=1 if same_order else args.epochs,
        train_sampling_strategy="sequential" if same_order else "random", per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=ours.peak_learning_rate, lr_scheduler_type=ours.lr_scheduler,
        warmup_steps=min(ours.warmup_ratio, 0.999999),  # below 1 it is a share of the steps (1 would mean one step)
        weight_decay=ours.weight_decay, max_grad_norm=ours.max_grad_norm, seed=ours.seed,
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
    dataset = trl_dataset(ours, args.trl_input)
    rows_of = our_order(ours, args) if args.order == "ours" else list(range(len(dataset)))  # our row of each TRL row
    dataset = dataset.select(rows_of)
    started, cpu = time.perf_counter(), time.process_time()
    trainer = SFTTrainer(model=model_dir, args=trl_config(args, str(out / "trl-run"), cuda), train_dataset=dataset,
                         peft_config=lora_config(args), callbacks=[LearningRates()])
    trainer.remove_callback(PrinterCallback)  # its per-step dicts; the curve is read from log_history
    result = trainer.train()
    trainer.save_model(str(out / "trl" / "adapter"))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    prepared = trainer.train_dataset
    tokens = sum(len(ids) for ids in prepared["input_ids"]) * (1 if args.order == "ours" else args.epochs)
    curve = [{"step": log["step"], "loss": log["loss"], "lr": lrs.get(log["step"])} for log in trainer.state.log_history if "loss" in log]
    del trainer
    return {"trained_dir": str(out / "trl"), "wall_s": wall, "cpu_s": cpu, "train_s": result.metrics["train_runtime"], "tokens": tokens,
            "steps": result.global_step, "curve": curve, "prepared": prepared, "rows_of": rows_of}


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


def mask_agreement(ours_train, trl_prepared, rows_of: list[int], newline_id: int) -> dict:
    """Each training row once, ours beside TRL's preparation of it: identical input_ids and labels;
    loss tokens of each; rows whose TRL labels are ours plus the newline after <|im_end|> (TRL's
    completion keeps the template's trailing newline)."""
    theirs_of = {}
    for j, i in enumerate(rows_of):
        theirs_of.setdefault(i, j)
    same_ids = newline_only = identical = ours_loss = trl_loss = 0
    for i, j in sorted(theirs_of.items()):
        mine, theirs = ours_train[i], trl_prepared[j]
        ids, labels, other = mine["input_ids"], list(mine["labels"]), list(theirs["labels"])
        same_ids += ids == theirs["input_ids"]
        ours_loss += sum(label != IGNORE_INDEX for label in labels)
        trl_loss += sum(label != IGNORE_INDEX for label in other)
        identical += labels == other
        plus_newline = labels[:-1] + [newline_id] if ids and ids[-1] == newline_id else labels
        newline_only += labels != other and plus_newline == other
    return {"rows": len(theirs_of), "same_input_ids": same_ids, "same_labels": identical, "trl_adds_only_final_newline": newline_only,
            "ours_loss_tokens": ours_loss, "trl_loss_tokens": trl_loss}


def curve_gap(ours_curve: list[dict], trl_curve: list[dict]) -> dict:
    """Training loss step by step. With --order ours both steps see the same examples, and step 1
    runs the unchanged base model (LoRA's B starts at zero): equal losses there mean the same
    tokens carry loss and the loss is normalised the same way."""
    pairs = [(a["loss"], b["loss"]) for a, b in zip(ours_curve, trl_curve)]
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return {"step_1": {"ours": pairs[0][0], "trl": pairs[0][1]} if pairs else None,
            "mean_ours": mean([a for a, _ in pairs]), "mean_trl": mean([b for _, b in pairs]),
            "mean_abs_gap": mean([abs(a - b) for a, b in pairs])}


def schedule_gap(ours_curve: list[dict], trl_curve: list[dict]) -> dict:
    """Learning rate per optimizer step of both, and where they differ most."""
    pairs = [(a["step"], a["lr"], b["lr"]) for a, b in zip(ours_curve, trl_curve) if b["lr"] is not None]
    worst = max(pairs, key=lambda p: abs(p[1] - p[2]), default=None)
    return {"first_steps": [{"step": s, "ours": a, "trl": b} for s, a, b in pairs[:4]],
            "largest_gap": {"step": worst[0], "ours": worst[1], "trl": worst[2]} if worst else None,
            "equal_steps": sum(abs(a - b) <= 1e-9 * max(a, 1e-12) for _, a, b in pairs), "steps": len(pairs)}


def diagnostics(ours: dict, trl: dict, tokenizer) -> dict:
    from datasets import load_from_disk

    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    ours_train = load_from_disk(ours["tokenized"].uri)["train"]
    return {
        "masks": mask_agreement(ours_train, trl["prepared"], trl["rows_of"], newline),
        "train_loss": curve_gap(ours["curve"], trl["curve"]),
        "steps": {"ours": ours["steps"], "trl": trl["steps"]},
        "tokens": {"ours": ours["tokens"], "trl": trl["tokens"]},
        "learning_rate": schedule_gap(ours["curve"], trl["curve"]),
    }


# ---------------------------------------------------------------------------------------- report


def plot_curves(ours: dict, trl: dict, results: dict, path: Path) -> None:
    """Both training losses by optimizer step; the held-out losses of base, ours and TRL as lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7.2, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, run, color in (("ours", ours, "tab:blue"), ("TRL SFTTrainer", trl, "tab:orange")):
        axes.plot([r["step"] for r in run["curve"]], [r["loss"] for r in run["curve"]], label=f"{name}: train loss", color=color)
    for name, label, color in (("base", "base", "tab:gray"), ("ours", "ours", "tab:blue"), ("trl", "TRL", "tab:orange")):
        axes.axhline(results[name]["eval_loss"], linestyle="--", color=color, linewidth=1, label=f"{label}: held-out loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    names = {"base": "base SmolLM2-135M-Instruct", "ours": f"ours (packed, {ours['attention']})",
             "trl": "TRL SFTTrainer (padded, its defaults)"}
    for name, run in {"base": None, "ours": ours, "trl": trl}.items():
        r = results[name]
        gap = (r["eval_loss"] - results["trl"]["eval_loss"]) / results["trl"]["eval_loss"]
        timing = (f"{run['train_s']:.0f} | {run['tokens'] / run['train_s']:,.0f} | {run['wall_s']:.0f} | {run['cpu_s']:.0f}"
                  if run else "- | - | - | -")
        lines.append(f"| {names[name]} | {r['eval_loss']:.4f} | {r['perplexity']:.3f} | {r['token_f1']:.3f} | {r['rouge_l']:.3f} "
                     f"| {gap:+.2%} | {timing} |")
    return "\n".join(lines)


def summary_lines(results: dict, ours: dict, trl: dict, checks: dict, args) -> list[str]:
    gap = (results["ours"]["eval_loss"] - results["trl"]["eval_loss"]) / results["trl"]["eval_loss"]
    masks, lr, curve = checks["masks"], checks["learning_rate"], checks["train_loss"]
    verdict = "PASS" if gap <= PARITY_TOLERANCE else "FAIL"
    return [
        f"parity: ours {results['ours']['eval_loss']:.4f} vs TRL {results['trl']['eval_loss']:.4f} held-out loss: {gap:+.2%} "
        f"({verdict}, goal <= +{PARITY_TOLERANCE:.0%}); ours vs TRL: train loop {trl['train_s'] / ours['train_s']:.2f}x, "
        f"stage wall {trl['wall_s'] / ours['wall_s']:.2f}x, CPU seconds {trl['cpu_s'] / ours['cpu_s']:.2f}x",
        f"masks: input_ids identical on {masks['same_input_ids']}/{masks['rows']} training rows, labels identical on "
        f"{masks['same_labels']}, TRL's = ours + the newline after <|im_end|> on {masks['trl_adds_only_final_newline']}; "
        f"loss tokens ours {masks['ours_loss_tokens']:,}, TRL {masks['trl_loss_tokens']:,}",
        f"train loss per step ({'same examples' if args.order == 'ours' else 'different examples'} at each step): step 1 "
        f"(the base model) ours {curve['step_1']['ours']:.4f}, TRL {curve['step_1']['trl']:.4f}; mean over the run ours "
        f"{curve['mean_ours']:.4f}, TRL {curve['mean_trl']:.4f}; mean |gap| {curve['mean_abs_gap']:.4f}",
        f"steps: ours {checks['steps']['ours']}, TRL {checks['steps']['trl']}; tokens trained: ours {checks['tokens']['ours']:,}, "
        f"TRL {checks['tokens']['trl']:,.0f} (non-padding)",
        "learning rate, first steps (ours / TRL): "
        + ", ".join(f"{p['step']}: {p['ours']:.2e} / {p['trl']:.2e}" for p in lr["first_steps"])
        + f"; largest gap at step {lr['largest_gap']['step']}; equal on {lr['equal_steps']}/{lr['steps']} steps",
    ]


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA), help="alpaca JSON file")
    parser.add_argument("--train-rows", type=int, default=160, help="rows trained on (the default fits 15 minutes on 2 CPU cores)")
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
    parser.add_argument("--order", choices=["ours", "own"], default="ours",
                        help="TRL's data order: ours (the same examples at every step) or its own shuffling")
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
    for line in summary_lines(results, ours, trl, checks, args):
        print("- " + line)
    print(f"- wrote {out / 'quality.json'} and {out / 'loss_curves.png'}; total {report['total_s']:.0f} s")


if __name__ == "__main__":
    main()
