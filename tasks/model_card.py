"""The release's README.md: a Hugging Face model card written from what the run recorded.

Every fact comes from a record: the upstream artifacts (`ReleaseInputs`), the validation report
(which files were read and how the held-out rows were chosen), the options the card describes and
the release manifest (key, hashes, whether the template reproduces training's prompts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from schemas.config import EMBEDDED_MODEL, TemplateOptions, TrainOptions
from schemas.manifests import EvalArtifact, ReleaseInputs
from tasks.reporting import code, comparison_table, metric_table, number

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def model_card(inputs: ReleaseInputs, train: TrainOptions, template: TemplateOptions, manifest: dict, validation: dict) -> str:
    """`manifest` is the release manifest (its `config` the redacted run config); `validation` the
    validation report the data artifact points at."""
    source = EMBEDDED_HUB_ID if inputs.model.source == EMBEDDED_MODEL else inputs.model.source
    sections = [
        _header(source, inputs.trained.method, manifest["release"]),
        _training(inputs, train, template, manifest, validation),
        _evaluation(inputs.evaluation),
        _usage(source, template, manifest["release"]),
        _files(manifest),
    ]
    return "\n\n".join(sections) + "\n"


def _header(source: str, method: str, release: dict) -> str:
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["sft", "prefect-sft", method]}
    if "/" in source and "://" not in source and not Path(source).exists():
        front["base_model"] = source  # a hub id; local folders are named in the text only
    kind = "LoRA" if method == "lora" else "full fine-tuning"
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False).strip()}\n---\n\n# Fine-tuned {source}\n\n"
        f"Supervised fine-tune ({kind}) of {code(source)}, produced by the prefect-sft pipeline. "
        f"Release key `{release['key']}`, exported {release['exported_at']}."
    )


def held_out(config: dict, validation: dict) -> str:
    """How the held-out rows were chosen, as validation settled it."""
    eval_files = [entry["file"] for entry in validation.get("files", []) if entry.get("split") == "eval"]
    if config.get("eval_data"):
        return f"held-out data {', '.join(code(url) for url in config['eval_data'])}"
    if eval_files:  # files that come with the data (the embedded dataset's own held-out file)
        return f"the held-out file shipped with the data ({', '.join(code(Path(name).name) for name in eval_files)})"
    fraction = validation.get("options", {}).get("eval_fraction", config.get("data_options", {}).get("eval_fraction"))
    return f"{fraction} of the rows held out, chosen by content hash"


def _training(inputs: ReleaseInputs, train: TrainOptions, template: TemplateOptions, manifest: dict, validation: dict) -> str:
    config = manifest["config"]
    lines = ["## Training data", "",
             f"- Sources: {', '.join(code(url) for url in config['data'])}; {held_out(config, validation)}",
             f"- Validation: {_summary(inputs.data.stats)}", f"- Tokenization: {_summary(inputs.tokenized.stats)}",
             f"- Content hash of the validated rows (sha256): `{manifest['hashes']['data']}`", "",
             "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in _settings(train, template).items()]
    lines += ["", "![training loss](training/loss_curve.png)"]
    return "\n".join(lines)


def _settings(train: TrainOptions, template: TemplateOptions) -> dict[str, Any]:
    settings = {
        "method": train.method,
        "peak learning rate": train.peak_learning_rate,
        "scheduler": f"{train.lr_scheduler}, warmup ratio {train.warmup_ratio}",
        "steps": train.max_steps or f"{train.epochs} epochs",
        "micro batch x grad accum": f"{train.micro_batch_size} x {train.grad_accum}",
        "packing": train.packing,
        "max length / truncation": f"{template.max_length} / {template.truncation}",
        "chat template / system prompt / loss on": f"{template.chat_template} / {template.system_prompt_mode} / {template.train_on}",
        "weight decay / grad clip": f"{train.weight_decay} / {train.max_grad_norm}",
        "seed": train.seed,
    }
    if train.method == "lora":
        lora = train.lora
        settings["LoRA"] = f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets={', '.join(lora.target_modules)}"
    return settings


def _evaluation(evaluation: EvalArtifact) -> str:
    lines = ["## Evaluation", "", f"Quality gate **{'passed' if evaluation.passed else 'FAILED'}**: {evaluation.gate_message}"]
    comparison = comparison_table(evaluation.stats.get("comparison") or {})
    if comparison:  # the release in production it had to beat (or the base model)
        lines += ["", "Champion vs challenger (this model):", "", *comparison]
    table = metric_table(evaluation.stats.get("base", {}), evaluation.stats.get("tuned", {}))
    if table:  # nothing was measured when evaluation was disabled; the gate message says so
        lines += ["", *table, "", "Loss and perplexity are over the response tokens of the held-out rows (lower is better); "
                  "the text metrics compare greedy answers with the reference answers (higher is better). Sample answers "
                  "side by side: `eval/report.md`."]
    return "\n".join(lines)


LOAD_MERGED = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", use_safetensors=True)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
messages = [{"role": "user", "content": "Hello!"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""
LOAD_ADAPTER = """The LoRA adapter alone is in `adapter/`; apply it to `{source}` with peft:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{source}", use_safetensors=True)
model = PeftModel.from_pretrained(base, "path/to/this/folder/adapter")
```"""


def _usage(source: str, template: TemplateOptions, release: dict) -> str:
    lines = ["## Intended use", "",
             "A research and demonstration model: a small model adapted to the conversations in its training data. It "
             "has not been evaluated for safety or factuality beyond the metrics above and can give wrong or biased "
             "answers. Prompt it with the bundled chat template (`tokenizer.apply_chat_template`), the format it was "
             "trained on."]
    mode = template.system_prompt_mode
    if not release["chat_template_matches_training"]:
        lines += ["", f"**Prompt format:** training used system_prompt_mode `{mode}`, which the bundled chat template "
                  "does not reproduce by itself: " + (f"pass {code(template.system_prompt)} as the system message."
                  if mode == "custom" else "training removed the template's default system prompt.")]
    lines += ["", "## How to load", ""]
    if release["merged"]:
        lines += [LOAD_MERGED, ""]
    if release["method"] == "lora":
        lines += [LOAD_ADAPTER.format(source=source)]
    return "\n".join(lines).rstrip()


def _files(manifest: dict) -> str:
    release = manifest["release"]
    model_files = "`model.safetensors` (or shards and `model.safetensors.index.json`), `config.json`, `generation_config.json`"
    lines = ["## Files", "",
             f"- {model_files}: the model" if release["merged"] else "- no merged model (export.merge_lora was off)",
             "- tokenizer files and `chat_template.jinja`: the tokenizer with the chat template used in training",
             "- `config.yaml`, `run_config.json`: the resolved run configuration (storage credentials redacted)",
             "- `run_manifest.json`: stages, cache keys, content hashes of data, tokenizer, base model and code, library versions",
             "- `training/loss_curve.json`, `training/loss_curve.png`: the training loss"]
    if release["method"] == "lora":
        lines.append("- `adapter/`: the LoRA adapter (peft, safetensors)")
    lines.append("- `eval/`: metrics.json (base, tuned, delta), gate.json, generations.json, loss_curve.png, report.md")
    lines += ["", "## Reproducibility", "", "| content | hash |", "|---|---|"]
    lines += [f"| {name} | `{value}` |" for name, value in manifest["hashes"].items()]
    return "\n".join(lines)


def _summary(stats: dict[str, Any]) -> str:
    flat = [f"{k}: {number(v)}" for k, v in stats.items() if not isinstance(v, (dict, list))]
    return ", ".join(flat) or "-"
