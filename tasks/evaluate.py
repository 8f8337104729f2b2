"""evaluate: the base model and the tuned model on the same held-out rows, and the quality gate.

Loss and perplexity are token-weighted over response tokens only (labels != IGNORE_INDEX), with
eval rows packed like training batches. Greedy answers to the first `num_generate` eval prompts
are scored against the references (the last assistant turn). The entry folder holds metrics.json
({base, tuned, delta}), gate.json, generations.json, loss_curve.png and report.md; the flow calls
`enforce_gate` before export, so a model that fails the gate is never published."""

from __future__ import annotations

import base64
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import fsspec
import torch
import torch.nn.functional as F
from prefect import task

from schemas.config import EvalOptions, GateOptions, TemplateOptions
from schemas.manifests import DataArtifact, EvalArtifact, ModelArtifact, TokenizedArtifact, TrainArtifact
from tasks.artifacts import publisher
from tasks.caching import content_cache_key
from tasks.core import collate, formatting, hashing, metrics, modeling, storage
from tasks.retrying import retry_transient

logger = logging.getLogger(__name__)

LOSS_METRICS = ("eval_loss", "perplexity")
REPORTED = (*LOSS_METRICS, *metrics.TEXT_METRICS)


class QualityGateError(RuntimeError):
    """The tuned model failed the quality gate; the message names the metric, both values and the threshold."""


def evaluate_entry(
    data: DataArtifact,
    tokenized: TokenizedArtifact,
    model: ModelArtifact,
    trained: TrainArtifact,
    options: EvalOptions,
    template: TemplateOptions,
    cache_dir: str,
    trust_remote_code: bool = False,
) -> tuple[str, str]:
    # trust_remote_code is in the key: for a repository with both its own code and a transformers
    # class, it picks which modeling code computes the metrics.
    key = hashing.hash_parts(
        "evaluate", data.key, tokenized.key, model.key, trained.key,
        options.model_dump(mode="json"), template.model_dump(mode="json"), trust_remote_code, CODE_VERSION,
    )[:24]
    return key, storage.join(cache_dir, "eval", key)


def evaluate_models(
    data: DataArtifact,
    tokenized: TokenizedArtifact,
    model: ModelArtifact,
    trained: TrainArtifact,
    options: EvalOptions,
    template: TemplateOptions,
    cache_dir: str,
    trust_remote_code: bool = False,
) -> EvalArtifact:
    """Evaluate base and tuned models (or reuse a complete entry) and apply the gate."""
    key, url = evaluate_entry(data, tokenized, model, trained, options, template, cache_dir, trust_remote_code)
    store_hit = storage.is_complete(url)
    if not store_hit:
        with storage.atomic_directory(url) as scratch:
            if options.enabled:
                _evaluate_into(scratch, data, tokenized, model, trained, options, template, trust_remote_code)
            else:
                _write_results(scratch, {}, {}, [], [], options.gate, enabled=False)
    return _artifact(url, key, store_hit)


def _evaluate_into(scratch: Path, data, tokenized, model, trained, options, template, trust_remote_code) -> None:
    from datasets import load_from_disk

    device = modeling.pick_device()
    dtype = modeling.pick_dtype(device)
    base_dir, trained_dir = storage.local_copy(model.uri), storage.local_copy(trained.uri)
    tokenizer = formatting.load_tokenizer(base_dir)
    eval_split = load_from_disk(tokenized.uri)
    eval_split = eval_split["eval"] if "eval" in eval_split else []
    examples = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in eval_split]
    samples = eval_samples(data.uri, options.num_generate)
    prompts = [_prompt_ids(sample["messages"], tokenizer, template, options.max_new_tokens) for sample in samples]
    references = [sample["reference"] for sample in samples]

    scores, answers = {}, {}
    current = modeling.load_causal_lm(base_dir, trust_remote_code, dtype, device)
    for name in ("base", "tuned"):
        if name == "tuned":  # LoRA wraps the loaded base in place; a full model replaces it
            current = modeling.load_tuned(base_dir, trained_dir, trained.method, trust_remote_code, dtype, device, base=current)
        logger.info("Evaluating the %s model on %d eval rows and %d prompts", name, len(examples), len(prompts))
        scores[name] = response_loss(current, examples, options.batch_size)
        answers[name] = generate(current, tokenizer, prompts, options.max_new_tokens, options.batch_size)
        scores[name].update(metrics.score_generations(answers[name], references))
        scores[name]["num_generated"] = len(answers[name])
    del current
    generations = [
        {"prompt": sample["prompt"], "reference": sample["reference"], "base": b, "tuned": t}
        for sample, b, t in zip(samples, answers["base"], answers["tuned"])
    ]
    _write_results(scratch, scores["base"], scores["tuned"], generations, read_loss_curve(trained), options.gate)


@torch.no_grad()
def response_loss(model, examples: Sequence[dict], batch_size: int) -> dict[str, Any]:
    """Token-weighted loss over response tokens. `batch_size` examples are packed into one row per
    forward pass, positions restarting per example, as in training (use_cache=False keeps packed
    examples independent); logits are computed only where a label carries loss."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate.pack_examples(examples[start : start + batch_size])
        targets = batch["labels"][0, 1:]
        keep = (targets != collate.IGNORE_INDEX).nonzero().squeeze(-1)
        if keep.numel() == 0:
            continue
        logits = model(
            input_ids=batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            use_cache=False,
            logits_to_keep=keep.to(device),
        ).logits[0]
        total_nll += F.cross_entropy(logits.float(), targets[keep].to(device), reduction="sum").item()
        total_tokens += keep.numel()
    loss = total_nll / total_tokens if total_tokens else None
    return {
        "eval_loss": loss,
        "perplexity": _safe_exp(loss) if loss is not None else None,
        "eval_tokens": total_tokens,
        "eval_examples": len(examples),
    }


def _safe_exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding (the pad id may equal EOS: padding is excluded by
    the attention mask, and each answer is cut at its first end-of-sequence token)."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    device = next(model.parameters()).device
    stop_ids = _stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stop_ids, use_cache=True
    )
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
        for row in output[:, width:].tolist():
            cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def _stop_token_ids(model, tokenizer) -> list[int]:
    ids = []
    configured = getattr(modeling.unwrap(model).generation_config, "eos_token_id", None)
    for value in [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]:
        if value is not None and value not in ids:
            ids.append(int(value))
    if not ids:
        raise ValueError("the tokenizer has no EOS token and the model's generation config names none")
    return ids


def _prompt_ids(messages: list[dict], tokenizer, template: TemplateOptions, max_new_tokens: int) -> list[int]:
    ids = formatting.render_prompt_ids(messages, tokenizer, template)
    room = max(1, template.max_length - max_new_tokens)
    return ids[-room:]  # an over-long prompt keeps its end, where the question and generation prompt are


def eval_samples(data_uri: str, limit: int) -> list[dict]:
    """The first `limit` eval rows in file order: messages, readable prompt and reference answer."""
    samples = []
    if limit <= 0:
        return samples
    with fsspec.open(data_uri, "r", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            messages = row["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if row.get("split") != "eval" or last is None:
                continue
            asked = [m["content"] for m in messages[:last] if m["role"] == "user"]
            samples.append(
                {"messages": messages, "prompt": asked[-1] if asked else "", "reference": messages[last]["content"]}
            )
            if len(samples) >= limit:
                break
    return samples


def read_loss_curve(trained: TrainArtifact) -> list[dict]:
    try:
        records = storage.read_json(trained.loss_curve_uri)
    except FileNotFoundError:
        logger.warning("No loss curve at %s", trained.loss_curve_uri)
        return []
    return [r for r in records if isinstance(r, dict) and "step" in r]


# ---------------------------------------------------------------------------------------------
# The gate


def check_gate(base: dict, tuned: dict, gate: GateOptions) -> tuple[bool, str]:
    """(passed, message). eval_loss (and perplexity) are lower-is-better, text metrics higher."""
    name = gate.metric
    lower = not metrics.HIGHER_IS_BETTER[name]
    b, t = base.get(name), tuned.get(name)
    rules = []
    if gate.max_regression is not None:
        rules.append(f"max_regression {gate.max_regression:g}")
    if gate.min_value is not None:
        rules.append(f"min_value {gate.min_value:g}")
    if gate.max_value is not None:
        rules.append(f"max_value {gate.max_value:g}")
    head = (
        f"gate on {name} ({'lower' if lower else 'higher'} is better): base {_fmt(b)}, tuned {_fmt(t)}; "
        f"threshold {', '.join(rules) or 'none'}"
    )
    failures = []
    if t is None:
        failures.append(f"tuned {name} is unavailable (no eval rows, or num_generate is 0)")
    elif not _finite(t):
        failures.append(f"tuned {name} is {t}, not a number: the model diverged in training (lower the learning rate)")
    else:
        if gate.max_regression is not None:
            if not _finite(b):
                failures.append(f"base {name} is unavailable, so the regression cannot be checked")
            else:
                regression = (t - b) if lower else (b - t)
                if regression > gate.max_regression + 1e-12:
                    failures.append(f"tuned is worse than base by {regression:.6g} > max_regression {gate.max_regression:g}")
        if gate.min_value is not None and t < gate.min_value:
            failures.append(f"tuned {_fmt(t)} < min_value {gate.min_value:g}")
        if gate.max_value is not None and t > gate.max_value:
            failures.append(f"tuned {_fmt(t)} > max_value {gate.max_value:g}")
    if failures:
        return False, f"FAILED {head}: " + "; ".join(failures)
    return True, f"passed {head}"


def enforce_gate(result: EvalArtifact) -> None:
    """Raise QualityGateError when the tuned model did not pass; the flow calls this before export."""
    if not result.passed:
        raise QualityGateError(f"Quality gate: {result.gate_message}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# Results on disk


def delta(base: dict, tuned: dict) -> dict:
    return {k: tuned[k] - base[k] for k in REPORTED if _finite(base.get(k)) and _finite(tuned.get(k))}


def _write_results(scratch: Path, base: dict, tuned: dict, generations: list, curve: list, gate: GateOptions, enabled: bool = True) -> None:
    if enabled:
        passed, message = check_gate(base, tuned, gate)
    else:
        passed, message = True, "evaluation disabled (eval.enabled = false): the gate was not applied"
    logger.info("Quality gate %s", message)
    (scratch / "metrics.json").write_text(json.dumps({"base": base, "tuned": tuned, "delta": delta(base, tuned)}, indent=2) + "\n")
    (scratch / "gate.json").write_text(json.dumps({"passed": passed, "message": message, **gate.model_dump(mode="json")}, indent=2) + "\n")
    (scratch / "generations.json").write_text(json.dumps(generations, indent=2, ensure_ascii=False) + "\n")
    plot_loss_curve(curve, scratch / "loss_curve.png", base.get("eval_loss"), tuned.get("eval_loss"))
    (scratch / "report.md").write_text(render_report(base, tuned, generations, passed, message, "loss_curve.png"))


def _artifact(url: str, key: str, store_hit: bool) -> EvalArtifact:
    results = storage.read_json(storage.join(url, "metrics.json"))
    gate = storage.read_json(storage.join(url, "gate.json"))
    return EvalArtifact(
        stage="evaluate",
        uri=url,
        key=key,
        passed=gate["passed"],
        gate_message=gate["message"],
        stats={"base": results["base"], "tuned": results["tuned"]},
        store_hit=store_hit,
    )


def plot_loss_curve(records: Sequence[dict], path: str | Path, base_loss: float | None = None, tuned_loss: float | None = None) -> None:
    """Training loss (and learning rate) per step, with the base and tuned eval losses as lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 3.6), dpi=80)
    FigureCanvasAgg(figure)  # Agg, no pyplot: no global state, no display needed
    axes = figure.add_subplot()
    points = [(r["step"], r["loss"]) for r in records if _finite(r.get("loss"))]
    if points:
        axes.plot(*zip(*points), label="train loss", color="tab:blue")
    for value, label, color in ((base_loss, "base eval loss", "tab:gray"), (tuned_loss, "tuned eval loss", "tab:green")):
        if _finite(value):
            axes.axhline(value, linestyle="--", color=color, label=label)
    lrs = [(r["step"], r["lr"]) for r in records if _finite(r.get("lr"))]
    if lrs:
        twin = axes.twinx()
        twin.plot(*zip(*lrs), color="tab:orange", alpha=0.5, linewidth=1)
        twin.set_ylabel("learning rate", color="tab:orange")
    if not points:
        axes.text(0.5, 0.5, "no training loss recorded", ha="center", va="center", transform=axes.transAxes)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title("Training loss")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    figure.savefig(str(path), format="png")


def metric_rows(base: dict, tuned: dict) -> list[dict]:
    """The (metric, base, tuned, delta) table, non-finite values as None."""
    change = delta(base, tuned)
    clean = lambda v: round(v, 6) if _finite(v) else None  # noqa: E731
    return [
        {"metric": k, "base": clean(base.get(k)), "tuned": clean(tuned.get(k)), "delta": clean(change.get(k))}
        for k in REPORTED
        if k in base or k in tuned
    ]


def render_report(base: dict, tuned: dict, generations: list[dict], passed: bool, message: str, image: str) -> str:
    lines = ["# Evaluation: base vs tuned", "", f"**Quality gate: {'PASSED' if passed else 'FAILED'}** - {message}", ""]
    rows = metric_rows(base, tuned)
    if rows:
        lines += ["| metric | base | tuned | delta |", "|---|---|---|---|"]
        lines += [f"| {r['metric']} | {_cell(r['base'])} | {_cell(r['tuned'])} | {_cell(r['delta'])} |" for r in rows]
        lines += ["", f"Eval rows: {base.get('eval_examples', 0)} ({base.get('eval_tokens', 0)} response tokens); "
                  f"generated answers: {base.get('num_generated', 0)} (greedy). eval_loss and perplexity: lower is better."]
    lines += ["", "## Training loss", "", f"![loss curve]({image})", ""]
    if generations:
        lines += ["## Sample generations", "", "| prompt | reference | base | tuned |", "|---|---|---|---|"]
        lines += [f"| {_cell(g['prompt'])} | {_cell(g['reference'])} | {_cell(g['base'])} | {_cell(g['tuned'])} |" for g in generations]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", "<br>")


# ---------------------------------------------------------------------------------------------
# Prefect


@publisher("evaluation report")
def publish_eval_artifacts(result: EvalArtifact) -> None:
    """Metrics table and markdown report (loss curve embedded as a data: URI) as Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    base, tuned = result.stats.get("base", {}), result.stats.get("tuned", {})
    create_table_artifact(
        table=metric_rows(base, tuned), key="sft-eval-metrics",
        description=f"Base vs tuned ({'gate passed' if result.passed else 'GATE FAILED'}): {result.gate_message}",
    )
    fs, path = storage.filesystem(storage.join(result.uri, "loss_curve.png"))
    image = "data:image/png;base64," + base64.b64encode(fs.cat_file(path)).decode("ascii")
    generations = storage.read_json(storage.join(result.uri, "generations.json"))
    create_markdown_artifact(
        markdown=render_report(base, tuned, generations, result.passed, result.gate_message, image),
        key="sft-eval-report", description="Evaluation report with sample generations side by side",
    )


CODE_VERSION = hashing.code_version(sys.modules[__name__], metrics, modeling, collate, formatting)


@task(
    name="evaluate",
    cache_key_fn=content_cache_key(evaluate_entry),
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def evaluate_task(
    data: DataArtifact,
    tokenized: TokenizedArtifact,
    model: ModelArtifact,
    trained: TrainArtifact,
    options: EvalOptions,
    template: TemplateOptions,
    cache_dir: str,
    trust_remote_code: bool = False,
) -> EvalArtifact:
    result = evaluate_models(data, tokenized, model, trained, options, template, cache_dir, trust_remote_code)
    publish_eval_artifacts(result)
    return result
