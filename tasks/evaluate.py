"""evaluate: the base model and the tuned model on the same held-out rows, and the quality gate.

Scores come from `tasks/core/scoring.py` (response-only loss of packed rows, greedy answers to
the first `num_generate` eval prompts, compared with the references by `tasks/core/metrics.py`;
references that end in tool calls also score the calls the answers make).
The entry folder holds metrics.json ({base, tuned, delta, champion, comparison}), gate.json,
generations.json, loss_curve.png and report.md (`tasks/reporting.py`). When a release is in
production (the champion), it is scored on the same rows and the gate compares the tuned model
with it, else with the base model; export then promotes the model or keeps it as a rejected
candidate (tasks/releases.py). With eval.enabled off nothing is computed and the gate passes,
saying so."""

from __future__ import annotations

import base64
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any

from prefect import task

from schemas.config import EvalOptions, GateOptions, TemplateOptions
from schemas.manifests import Champion, DataArtifact, EvalArtifact, ModelArtifact, TokenizedArtifact, TrainArtifact
from tasks import reporting
from tasks.artifacts import publisher
from tasks.core import collate, formatting, hashing, metrics, modeling, rows, scoring, storage
from tasks.core.scoring import finite
from tasks.reporting import number
from tasks.retrying import cached_stage

logger = logging.getLogger(__name__)


def evaluate_entry(
    data: DataArtifact,
    tokenized: TokenizedArtifact,
    model: ModelArtifact,
    trained: TrainArtifact,
    options: EvalOptions,
    template: TemplateOptions,
    cache_dir: str,
    trust_remote_code: bool = False,
    champion: Champion | None = None,
) -> tuple[str, str]:
    # The champion (the release in production) is in the key by its content key: a new champion
    # is a new comparison. trust_remote_code is in the key: for a repository with both its own code and a transformers
    # class, it picks which modeling code computes the metrics. Storage options are not: they say
    # where the cache is, not what it holds.
    key = hashing.hash_parts(
        "evaluate", data.key, tokenized.key, model.key, trained.key,
        options.model_dump(mode="json"), template.model_dump(mode="json"), trust_remote_code,
        champion.key if champion else None, CODE_VERSION,
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
    cache_storage_options: dict[str, Any] | None = None,
    champion: Champion | None = None,
    champion_storage_options: dict[str, Any] | None = None,
) -> EvalArtifact:
    """Evaluate base, tuned and (when there is one) champion models, or reuse a complete entry, and
    apply the gate: tuned against the champion, else against the base model. The champion's
    release is read with `champion_storage_options` (the output's)."""
    key, url = evaluate_entry(data, tokenized, model, trained, options, template, cache_dir, trust_remote_code, champion)
    store_hit = storage.is_complete(url, cache_storage_options)
    if not store_hit:
        with storage.atomic_directory(url, cache_storage_options) as scratch:
            if options.enabled:
                rival = (champion, champion_storage_options or {}) if champion else None
                _evaluate_into(scratch, data, tokenized, model, trained, options, template, trust_remote_code, cache_storage_options,
                               rival, cache_dir)
            else:
                _write_results(scratch, {}, {}, [], [], options.gate, enabled=False)
    return _artifact(url, key, store_hit, cache_storage_options)


def _evaluate_into(scratch: Path, data, tokenized, model, trained, options, template, trust_remote_code, cache_options, rival=None,
                   cache_dir: str = "") -> None:
    from datasets import load_from_disk

    device = modeling.pick_device()
    dtype = modeling.pick_dtype(device)
    base_dir, trained_dir = storage.local_copy(model.uri, cache_options), storage.local_copy(trained.uri, cache_options)
    tokenizer = formatting.load_tokenizer(base_dir)
    eval_split = load_from_disk(tokenized.uri, storage_options=cache_options or None)
    eval_split = eval_split["eval"] if "eval" in eval_split else []
    examples = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in eval_split]
    samples = eval_samples(data.uri, options.num_generate, cache_options)
    prompts = [scoring.prompt_ids(s["messages"], tokenizer, template, options.max_new_tokens, s["tools"]) for s in samples]
    references = [sample["reference"] for sample in samples]
    expected = [sample["expected_calls"] for sample in samples]

    scores, answers = {}, {}
    curve = reporting.read_loss_curve(trained, cache_options)
    measured = loss_from_training(trained, curve, examples)
    current = modeling.load_causal_lm(base_dir, trust_remote_code, dtype, device)
    for name in ("base", "tuned"):
        if name == "tuned":  # LoRA wraps the loaded base in place; a full model replaces it
            current = modeling.load_tuned(base_dir, trained_dir, trained.method, trust_remote_code, dtype, device, base=current)
        logger.info("Evaluating the %s model on %d eval rows and %d prompts", name, len(examples), len(prompts))
        reuse = name == "tuned" and measured is not None
        scores[name] = measured if reuse else scoring.response_loss(current, examples, options.batch_size)
        answers[name] = scoring.generate(current, tokenizer, prompts, options.max_new_tokens, options.batch_size)
        scores[name].update(metrics.score_generations(answers[name], references, expected))
        scores[name]["num_generated"] = len(answers[name])
        if any(expected):  # how many answers the tool-call metrics average over
            scores[name]["num_tool_call_references"] = sum(1 for calls in expected if calls)
    del current
    generations = [_generation(sample, b, t) for sample, b, t in zip(samples, answers["base"], answers["tuned"])]
    champion = None
    if rival is not None:
        scored = champion_scores(rival, base_dir, examples, prompts, references, expected, tokenizer, options, trust_remote_code,
                                 (dtype, device), (storage.join(cache_dir, "champion-scores"), cache_options, tokenized.key))
        champion = {"name": rival[0].name, "scores": scored}
    _write_results(scratch, scores["base"], scores["tuned"], generations, curve, options.gate, champion=champion)


def loss_from_training(trained: TrainArtifact, curve: list[dict], examples: list[dict]) -> dict | None:
    """The tuned model's held-out loss as training measured it (train.eval_every) at the step
    whose weights it published: the same eval rows, token-weighted, packed with per-example
    attention as here, so it is not computed twice. None when training did not measure it."""
    step = trained.stats.get("exported_step")
    measured = next((record["eval_loss"] for record in curve if record.get("step") == step and "eval_loss" in record), None)
    if measured is None or not examples:
        return None
    tokens = sum(sum(label != collate.IGNORE_INDEX for label in example["labels"][1:]) for example in examples)
    return {"eval_loss": measured, "perplexity": scoring.safe_exp(measured), "eval_tokens": tokens, "eval_examples": len(examples),
            "eval_loss_source": f"training, step {step}"}


def champion_scores(rival, base_dir, examples, prompts, references, expected, tokenizer, options: EvalOptions, trust_remote_code: bool,
                    placement, cache) -> dict:
    """The champion release's scores on the same held-out rows and prompts. They are cached under
    the champion's key and the data's, so a nightly run with unchanged data scores it only once."""
    champion, release_options = rival
    folder, cache_options, tokenized_key = cache
    settings = options.model_dump(mode="json", exclude={"gate", "enabled"})
    url = storage.join(folder, hashing.hash_parts(champion.key, tokenized_key, settings, prompts, CODE_VERSION)[:24] + ".json")
    if storage.exists(url, cache_options):
        return storage.read_json(url, cache_options)
    dtype, device = placement
    logger.info("Evaluating the champion %s on %d eval rows and %d prompts", champion.name, len(examples), len(prompts))
    current = modeling.load_release(storage.local_copy(champion.url, release_options), base_dir, trust_remote_code, dtype, device)
    scores = scoring.response_loss(current, examples, options.batch_size)
    answers = scoring.generate(current, tokenizer, prompts, options.max_new_tokens, options.batch_size)
    scores.update(metrics.score_generations(answers, references, expected))
    scores["num_generated"] = len(answers)
    storage.write_json_atomic(url, scores, cache_options)
    return scores


def eval_samples(data_uri: str, limit: int, storage_options: dict[str, Any] | None = None) -> list[dict]:
    """The first `limit` eval rows in file order: messages and tool definitions (None when the row
    has none), a readable prompt (the last user or tool text before the last answer), the reference
    answer as the model was trained to write it, and the calls that answer makes ([] for none)."""
    samples = []
    if limit <= 0:
        return samples
    for row in rows.read_dataset(data_uri, storage_options):
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if row.get("split") != "eval" or last is None:
            continue
        asked = [m["content"] for m in messages[:last] if m["role"] in ("user", "tool")]
        calls = expected_calls(messages[last])
        samples.append({
            "messages": messages, "tools": row.get("tools"), "prompt": asked[-1] if asked else "",
            # What the model was trained to write: the fallback's call markup (Qwen and Hermes templates write the same).
            "reference": formatting.assistant_text(messages[last]["content"], messages[last].get("tool_calls") or []),
            "expected_calls": calls,
        })
        if len(samples) >= limit:
            break
    return samples


def expected_calls(answer: dict) -> list[dict]:
    """The {"name", "arguments"} of each call of a canonical assistant turn, in order."""
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in answer.get("tool_calls", [])]


def _generation(sample: dict, base: str, tuned: str) -> dict:
    """A generations.json entry; one whose reference ends in calls also shows them and whether each
    model made exactly those calls (what tool_call_accuracy counts)."""
    entry = {"prompt": sample["prompt"], "reference": sample["reference"], "base": base, "tuned": tuned}
    if sample["expected_calls"]:
        entry["expected_calls"] = sample["expected_calls"]
        for name, answer in (("base", base), ("tuned", tuned)):
            entry[f"{name}_calls_right"] = metrics.calls_right(metrics.parse_tool_calls(answer), sample["expected_calls"])
    return entry


# ---------------------------------------------------------------------------------------------
# The gate


def check_gate(base: dict, tuned: dict, gate: GateOptions, reference: str = "base") -> tuple[bool, str]:
    """(passed, message): `tuned` against `base`, the reference model's scores (`reference` names it:
    'base', or 'champion <release>'). eval_loss (and perplexity) are lower-is-better, text metrics higher."""
    name = gate.metric
    lower = not metrics.HIGHER_IS_BETTER[name]
    b, t = base.get(name), tuned.get(name)
    rules = [f"{rule} {value:g}" for rule, value in
             (("max_regression", gate.max_regression), ("min_value", gate.min_value), ("max_value", gate.max_value)) if value is not None]
    head = (
        f"gate on {name} ({'lower' if lower else 'higher'} is better): {reference} {number(b)}, tuned {number(t)}; "
        f"threshold {', '.join(rules) or 'none'}"
    )
    failures = _gate_failures(name, lower, b, t, gate, reference)
    if failures:
        return False, f"FAILED {head}: " + "; ".join(failures)
    return True, f"passed {head}"


def _gate_failures(name: str, lower: bool, b: Any, t: Any, gate: GateOptions, reference: str = "base") -> list[str]:
    if t is None:
        if name in metrics.TOOL_METRICS:
            return [f"tuned {name} is unavailable (no generated eval row ends in a tool call, or num_generate is 0)"]
        return [f"tuned {name} is unavailable (no eval rows, or num_generate is 0)"]
    if not finite(t):
        return [f"tuned {name} is {t}, not a number: the model diverged in training (lower the learning rate)"]
    failures = []
    if gate.max_regression is not None:
        if not finite(b):
            failures.append(f"{reference} {name} is unavailable, so the regression cannot be checked")
        else:
            regression = (t - b) if lower else (b - t)
            if regression > gate.max_regression + 1e-12:
                failures.append(f"tuned is worse than {reference} by {regression:.6g} > max_regression {gate.max_regression:g}")
    if gate.min_value is not None and t < gate.min_value:
        failures.append(f"tuned {number(t)} < min_value {gate.min_value:g}")
    if gate.max_value is not None and t > gate.max_value:
        failures.append(f"tuned {number(t)} > max_value {gate.max_value:g}")
    return failures


def comparison(reference: dict, tuned: dict, gate: GateOptions, label: str, passed: bool) -> dict[str, Any]:
    """The champion-vs-challenger row the release, its card and the Prefect artifacts show."""
    name = gate.metric
    ref, new = reference.get(name), tuned.get(name)
    return {
        "metric": name,
        "lower_is_better": not metrics.HIGHER_IS_BETTER[name],
        "champion": label,
        "champion_value": ref,
        "challenger_value": new,
        "delta": new - ref if finite(ref) and finite(new) else None,
        "decision": "promote" if passed else "reject",
    }


# ---------------------------------------------------------------------------------------------
# Results on disk


def _write_results(scratch: Path, base: dict, tuned: dict, generations: list, curve: list, gate: GateOptions, enabled: bool = True,
                   champion: dict | None = None) -> None:
    """metrics.json ({base, tuned, delta, champion?, comparison}), gate.json, generations.json, the
    plot and report.md. `champion` is {"name", "scores"} of the release in production, if any: the
    gate compares against it, else against the base model."""
    reference, label = (champion["scores"], f"champion {champion['name']}") if champion else (base, "base")
    if enabled:
        passed, message = check_gate(reference, tuned, gate, label)
    else:
        passed, message = True, "evaluation disabled (eval.enabled = false): the gate was not applied"
    logger.info("Quality gate %s", message)
    results = {"base": base, "tuned": tuned, "delta": scoring.delta(base, tuned)}
    if champion:
        results["champion"] = {"release": champion["name"], **champion["scores"]}
    results["comparison"] = comparison(reference, tuned, gate, label, passed) if enabled else {}
    (scratch / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (scratch / "gate.json").write_text(json.dumps({"passed": passed, "message": message, **gate.model_dump(mode="json")}, indent=2) + "\n")
    (scratch / "generations.json").write_text(json.dumps(generations, indent=2, ensure_ascii=False) + "\n")
    reporting.plot_loss_curve(curve, scratch / "loss_curve.png", base.get("eval_loss"), tuned.get("eval_loss"))
    report = reporting.render_report(base, tuned, generations, passed, message, "loss_curve.png", results["comparison"])
    (scratch / "report.md").write_text(report)


def _artifact(url: str, key: str, store_hit: bool, storage_options: dict[str, Any] | None) -> EvalArtifact:
    results = storage.read_json(storage.join(url, "metrics.json"), storage_options)
    gate = storage.read_json(storage.join(url, "gate.json"), storage_options)
    return EvalArtifact(
        stage="evaluate",
        uri=url,
        key=key,
        passed=gate["passed"],
        gate_message=gate["message"],
        stats={"base": results["base"], "tuned": results["tuned"], "champion": results.get("champion"),
               "comparison": results.get("comparison", {})},
        store_hit=store_hit,
    )


# ---------------------------------------------------------------------------------------------
# Prefect


def publish_eval_artifacts(result: EvalArtifact, cache_storage_options: dict[str, Any] | None = None) -> None:
    """Metrics table and markdown report (loss curve embedded as a data: URI) as Prefect artifacts;
    the report's files are read back from the cache entry with the cache's storage options."""
    publisher("evaluation report")(functools.partial(_publish_eval_artifacts, storage_options=cache_storage_options))(result)


def _publish_eval_artifacts(result: EvalArtifact, storage_options: dict[str, Any] | None) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    base, tuned = result.stats.get("base", {}), result.stats.get("tuned", {})
    create_table_artifact(
        table=reporting.metric_rows(base, tuned), key="sft-eval-metrics",
        description=f"Base vs tuned ({'gate passed' if result.passed else 'GATE FAILED'}): {result.gate_message}",
    )
    if result.stats.get("comparison"):
        create_table_artifact(
            table=[result.stats["comparison"]], key="sft-champion-vs-challenger",
            description=f"Champion vs challenger: {'promote' if result.passed else 'REJECTED, production unchanged'}",
        )
    fs, path = storage.filesystem(storage.join(result.uri, "loss_curve.png"), storage_options)
    image = "data:image/png;base64," + base64.b64encode(fs.cat_file(path)).decode("ascii")
    generations = storage.read_json(storage.join(result.uri, "generations.json"), storage_options)
    create_markdown_artifact(
        markdown=reporting.render_report(base, tuned, generations, result.passed, result.gate_message, image, result.stats.get("comparison")),
        key="sft-eval-report", description="Evaluation report with sample generations side by side",
    )


CODE_VERSION = hashing.code_version(sys.modules[__name__], scoring, reporting, rows, metrics, modeling, collate, formatting)


@task(**cached_stage("evaluate", evaluate_entry, delays=(0,)))
def evaluate_task(
    data: DataArtifact,
    tokenized: TokenizedArtifact,
    model: ModelArtifact,
    trained: TrainArtifact,
    options: EvalOptions,
    template: TemplateOptions,
    cache_dir: str,
    trust_remote_code: bool = False,
    cache_storage_options: dict[str, Any] | None = None,
    champion: Champion | None = None,
    champion_storage_options: dict[str, Any] | None = None,
) -> EvalArtifact:
    result = evaluate_models(data, tokenized, model, trained, options, template, cache_dir, trust_remote_code, cache_storage_options,
                             champion, champion_storage_options)
    publish_eval_artifacts(result, cache_storage_options)
    return result
