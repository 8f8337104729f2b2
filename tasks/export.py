"""export: an atomic, self-describing release folder at `config.output` (any fsspec URL).

The release is built in a local scratch folder and published with `storage.atomic_directory`:
a crash midway leaves the previous release untouched. It holds the model (merged LoRA or full
weights, safetensors, sharded above export.max_shard_size), the adapter for LoRA runs, the
tokenizer with the chat template the model was trained with, the resolved run config, the run
manifest with content hashes, the eval results and plots, and a model card. The optional `LATEST`
pointer next to the release is written last. Weights are read from safetensors only and model code
runs only when config.trust_remote_code is set."""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
import sys
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import yaml
from prefect import task

from schemas.config import EMBEDDED_MODEL, SFTConfig
from schemas.manifests import DataArtifact, EvalArtifact, ExportArtifact, ModelArtifact, TokenizedArtifact, TrainArtifact
from tasks.core import embedded, formatting, hashing, modeling, storage
from tasks import evaluate
from tasks.artifacts import publisher
from tasks.evaluate import metric_rows, plot_loss_curve, read_loss_curve
from tasks.retrying import retry_transient

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CODE_PACKAGES = ("flows", "schemas", "tasks")
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LIBRARIES = ("torch", "transformers", "peft", "datasets", "safetensors", "prefect")


RELEASE_MANIFEST = "run_manifest.json"
ATTEMPTS = "attempts"  # run records kept inside the output folder (tasks that did not build the release)
ATTEMPT_NAME = re.compile(r"^\d{8}T\d{6}Z-[a-z-]+$")


def check_output_target(output: str, storage_options: dict[str, Any] | None = None, cache_dir: str | None = None) -> None:
    """Refuse, before any work starts, an output that publishing a release would destroy.

    Publishing replaces the whole folder at `output`, so it may only be: missing, an empty folder,
    a release of ours (manifest with a release key, and no file the release did not write), or a
    folder holding nothing but our run records (`attempts/`). Anything else (a regular file, `.`,
    the folder with the user's data) raises RefusedTargetError naming the path. The cache may not
    live inside the output (the release would replace it) nor the output inside the cache."""
    fs, path = storage.filesystem(output, storage_options)
    shown = fs.unstrip_protocol(path) if "://" in output else output
    if cache_dir is not None and _overlaps(output, cache_dir):
        raise storage.RefusedTargetError(
            f"--output {shown} and --cache_dir {cache_dir} overlap: publishing the release replaces the whole output "
            "folder, so the two must be separate folders"
        )
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise storage.RefusedTargetError(
            f"--output {shown} is an existing file, not a release folder: refusing to replace it. Choose a new folder."
        )
    names = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
    foreign = _foreign_entries(fs, path, names)
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise storage.RefusedTargetError(
            f"--output {shown} is an existing folder that is not a release of this pipeline (it holds {listed}): "
            "refusing to replace it, nothing was changed. Choose a new or empty folder, or a previous release."
        )


def _foreign_entries(fs, path: str, names: list[str]) -> list[str]:
    """The entries of an existing output folder that a release must not replace."""
    if not names:
        return []
    ours = {ATTEMPTS, storage.COMPLETE_MARKER}
    release = _read_release(fs, f"{path}/{RELEASE_MANIFEST}") if RELEASE_MANIFEST in names else None
    if release is not None:
        # Releases list what they wrote; older ones did not, and count as wholly ours.
        ours |= set(release.get("files") or names)
    foreign = [name for name in names if name not in ours]
    if ATTEMPTS in names:
        foreign += [f"{ATTEMPTS}/{name}" for name in _names(fs, f"{path}/{ATTEMPTS}") if not ATTEMPT_NAME.match(name)]
    return foreign


def _read_release(fs, manifest_path: str) -> dict | None:
    try:
        with fs.open(manifest_path, "r", encoding="utf-8") as handle:
            release = json.load(handle).get("release")
    except (OSError, ValueError, AttributeError):
        return None
    return release if isinstance(release, dict) and release.get("key") else None


def _names(fs, path: str) -> list[str]:
    return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]


def _overlaps(output: str, cache_dir: str) -> bool:
    if not (storage.is_local(output) and storage.is_local(cache_dir)):
        return False
    first, second = (Path(storage.filesystem(url)[1]).resolve() for url in (output, cache_dir))
    return first == second or first in second.parents or second in first.parents


def export_release(
    config: SFTConfig,
    model: ModelArtifact,
    trained: TrainArtifact,
    evaluation: EvalArtifact | None,
    data: DataArtifact,
    tokenized: TokenizedArtifact,
    run_manifest: dict,
) -> ExportArtifact:
    """Write the release to config.output, or keep the release already there when it is complete
    and was built from exactly the same inputs (store_hit). An evaluation that failed the quality
    gate is refused here too (QualityGateError), whatever the caller did before."""
    if evaluation is not None:
        evaluate.enforce_gate(evaluation)
    options = config.data_options.storage_options
    key = export_key(config, model, trained, evaluation, data, tokenized)
    store_hit = _release_key(config.output, options) == key
    if not store_hit:
        check_output_target(config.output, options)  # again: the folder may have changed since the run began
        with storage.atomic_directory(config.output, options) as scratch:
            build_release(scratch, key, config, model, trained, evaluation, data, tokenized, run_manifest)
    files = _listing(config.output, options)
    latest = write_latest(config.output, options) if config.export.update_latest else None
    return ExportArtifact(
        stage="export",
        uri=config.output,
        key=key,
        store_hit=store_hit,
        stats={
            "method": trained.method,
            "merged": trained.method == "full" or config.export.merge_lora,
            "weight_shards": sum(name.endswith(".safetensors") and "/" not in name for name in files),
            "files": len(files),
            "bytes": sum(files.values()),
            "latest": latest,
        },
    )


def export_key(config, model, trained, evaluation, data, tokenized) -> str:
    return hashing.hash_parts(
        "export", model.key, data.key, tokenized.key, trained.key, evaluation.key if evaluation else None,
        config.redacted_dump(), CODE_VERSION,
    )[:24]


def build_release(scratch: Path, key, config, model, trained, evaluation, data, tokenized, run_manifest) -> None:
    base_dir, trained_dir = storage.local_copy(model.uri), storage.local_copy(trained.uri)
    tokenizer, template_matches = release_tokenizer(base_dir, config)
    tokenizer.save_pretrained(str(scratch))
    save_weights(scratch, base_dir, trained_dir, trained.method, config, tokenizer)
    resolved = config.redacted_dump()
    (scratch / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    (scratch / "run_config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    curve = read_loss_curve(trained)
    (scratch / "training").mkdir()
    (scratch / "training" / "loss_curve.json").write_text(json.dumps(curve, indent=2) + "\n")
    plot_loss_curve(curve, scratch / "training" / "loss_curve.png")
    if evaluation is not None:
        _copy_tree(storage.local_copy(evaluation.uri), scratch / "eval")
    manifest = release_manifest(key, config, model, trained, evaluation, data, tokenized, run_manifest)
    manifest["release"]["chat_template_matches_training"] = template_matches
    write_model_card(scratch, config, model, trained, evaluation, data, tokenized, manifest)
    # What the release wrote at its top level: a later run replaces the folder only while it
    # holds nothing else (check_output_target).
    manifest["release"]["files"] = sorted([path.name for path in scratch.iterdir()] + [RELEASE_MANIFEST])
    (scratch / RELEASE_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


# The plain template (tasks/core/formatting.py) as Jinja, for base models without a chat template,
# so `apply_chat_template` on the released tokenizer renders what training rendered.
PLAIN_CHAT_TEMPLATE = (
    "{% set ns = namespace(previous='') %}"
    "{% for message in messages %}"
    "{% if ns.previous == 'assistant' %}{{ '\\n\\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('the plain template has no role ' + message['role']) }}{% endif %}"
    "{% set ns.previous = message['role'] %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if ns.previous == 'assistant' %}{{ '\\n\\n' }}{% endif %}{{ '### Response:\\n' }}{% endif %}"
)
PROBE = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]


def release_tokenizer(base_dir: Path, config: SFTConfig):
    """The base tokenizer carrying the chat template training used, so `apply_chat_template` on the
    released tokenizer formats prompts as the model saw them. Returns (tokenizer, matches): whether
    the released template reproduces training's prompt tokens on a probe conversation (it cannot
    when training dropped a template's default system prompt or used a custom one)."""
    tokenizer = formatting.load_tokenizer(base_dir)
    expected = formatting.render_prompt_ids(PROBE, tokenizer, config.template)
    if formatting.template_kind(tokenizer, config.template) == "plain":
        text_ids = tokenizer.encode(formatting.render_plain(PROBE[:1], True, tokenizer.eos_token or ""), add_special_tokens=False)
        with_bos = expected != text_ids and expected[1:] == text_ids  # training put one BOS in front
        tokenizer.chat_template = ("{{ bos_token }}" if with_bos else "") + PLAIN_CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(PROBE[:1], tokenize=False, add_generation_prompt=True)
    matches = tokenizer.encode(rendered, add_special_tokens=False) == expected
    if not matches:
        logger.warning("The released chat template does not reproduce training's prompts (system_prompt_mode %r): the model card says so",
                       config.template.system_prompt_mode)
    return tokenizer, matches


def save_weights(scratch: Path, base_dir: Path, trained_dir: Path, method: str, config: SFTConfig, tokenizer) -> None:
    trust = config.trust_remote_code
    if method == "lora":
        adapter = trained_dir / "adapter"
        if not (adapter / modeling.ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"{adapter} has no {modeling.ADAPTER_WEIGHTS}")
        (scratch / "adapter").mkdir()
        for path in adapter.iterdir():  # weights as safetensors and JSON configs only, never pickles
            if path.is_file() and path.suffix in (".safetensors", ".json"):
                shutil.copy2(path, scratch / "adapter" / path.name)
        if not config.export.merge_lora:
            return
        final = modeling.merge_lora(base_dir, adapter, trust)
    elif method == "full":
        final = modeling.load_causal_lm(trained_dir / "model", trust, dtype="auto")
    else:
        raise ValueError(f"unknown training method {method!r}")
    final.config.use_cache = True  # training turns the KV cache off; generation wants it on
    generation = final.generation_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            setattr(final.config, name, getattr(tokenizer, name))
            if getattr(generation, name, None) is None:
                setattr(generation, name, getattr(tokenizer, name))
    final.save_pretrained(str(scratch), max_shard_size=config.export.max_shard_size)
    if not (scratch / "generation_config.json").exists():
        generation.save_pretrained(str(scratch))


def release_manifest(key, config, model, trained, evaluation, data, tokenized, run_manifest: dict) -> dict[str, Any]:
    """The flow's manifest plus what identifies the release: content hashes and versions."""
    manifest = json.loads(json.dumps(run_manifest, default=str))
    manifest["config"] = config.redacted_dump()  # whatever the caller passed, never credentials
    manifest["hashes"] = {
        **manifest.get("hashes", {}),
        "data": hashing.hash_url(data.uri),
        "data_key": data.key,
        "tokenized_key": tokenized.key,
        "tokenizer": model.tokenizer_hash,
        "base_model": model.key,
        "trained": trained.key,
        "evaluation": evaluation.key if evaluation else None,
        "code_version": pipeline_code_version(),
        "release": key,
    }
    manifest["release"] = {
        "key": key,
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "base_model": model.source,
        "method": trained.method,
        "merged": trained.method == "full" or config.export.merge_lora,
        "gate": {"passed": evaluation.passed, "message": evaluation.gate_message} if evaluation else None,
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in LIBRARIES}},
    }
    return manifest


def pipeline_code_version() -> str:
    """Hash of every Python source file of the pipeline (flows, schemas, tasks)."""
    files = [p for package in CODE_PACKAGES for p in (REPO_ROOT / package).rglob("*.py") if "__pycache__" not in p.parts]
    return hashing.hash_files(files, root=REPO_ROOT)[:16]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def write_latest(output: str, storage_options: dict[str, Any] | None = None) -> str:
    """Point `LATEST` (a text file next to the release, naming it) at this release; returns its URL."""
    fs, path = storage.filesystem(output, storage_options)
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    pointer = f"{parent}/LATEST" if parent or path.startswith("/") else f"{path}.latest"
    temporary = f"{pointer}.tmp-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(temporary, f"{name}\n".encode("utf-8"))
    fs.mv(temporary, pointer)
    return fs.unstrip_protocol(pointer)


def _release_key(output: str, storage_options: dict[str, Any]) -> str | None:
    if not storage.is_complete(output, storage_options):
        return None
    try:
        return storage.read_json(storage.join(output, "run_manifest.json"), storage_options).get("release", {}).get("key")
    except (FileNotFoundError, ValueError, AttributeError):
        return None


def _listing(output: str, storage_options: dict[str, Any]) -> dict[str, int]:
    fs, path = storage.filesystem(output, storage_options)
    root = path.rstrip("/") + "/"
    return {name[len(root):]: info.get("size") or 0 for name, info in fs.find(path, detail=True).items()}


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(storage.COMPLETE_MARKER, ".*"))


# ---------------------------------------------------------------------------------------------
# The model card


def write_model_card(scratch: Path, config, model, trained, evaluation, data, tokenized, manifest) -> None:
    (scratch / "README.md").write_text(model_card(config, model, trained, evaluation, data, tokenized, manifest))


def model_card(config: SFTConfig, model, trained, evaluation, data, tokenized, manifest) -> str:
    source = EMBEDDED_HUB_ID if model.source == EMBEDDED_MODEL else model.source
    sections = [
        _card_header(source, config, trained, manifest),
        _card_training(config, data, tokenized, manifest),
        _card_evaluation(evaluation),
        _card_usage(source, config, trained, manifest),
        _card_files(manifest, evaluation),
    ]
    return "\n\n".join(sections) + "\n"


def _card_header(source: str, config: SFTConfig, trained, manifest) -> str:
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["sft", "prefect-sft", trained.method]}
    if "/" in source and "://" not in source and not Path(source).exists():
        front["base_model"] = source  # a hub id; local folders are named in the text only
    method = "LoRA" if trained.method == "lora" else "full fine-tuning"
    release = manifest["release"]
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False).strip()}\n---\n\n# Fine-tuned {source}\n\n"
        f"Supervised fine-tune ({method}) of `{source}`, produced by the prefect-sft pipeline. "
        f"Release key `{release['key']}`, exported {release['exported_at']}."
    )


def _card_training(config: SFTConfig, data, tokenized, manifest) -> str:
    train = config.train
    shipped_eval = embedded.embedded_eval_urls(config.data)  # embedded datasets bring their own
    held_out = (
        f"held-out data {', '.join(f'`{url}`' for url in config.eval_data)}" if config.eval_data
        else "the embedded dataset's own held-out file" if shipped_eval
        else f"{config.data_options.eval_fraction} of the rows held out, chosen by content hash"
    )
    settings = {
        "method": train.method,
        "peak learning rate": train.peak_learning_rate,
        "scheduler": f"{train.lr_scheduler}, warmup ratio {train.warmup_ratio}",
        "steps": train.max_steps or f"{train.epochs} epochs",
        "micro batch x grad accum": f"{train.micro_batch_size} x {train.grad_accum}",
        "packing": train.packing,
        "max length / truncation": f"{config.template.max_length} / {config.template.truncation}",
        "chat template / system prompt / loss on": f"{config.template.chat_template} / {config.template.system_prompt_mode} / {config.template.train_on}",
        "weight decay / grad clip": f"{train.weight_decay} / {train.max_grad_norm}",
        "seed": train.seed,
    }
    if train.method == "lora":
        lora = train.lora
        settings["LoRA"] = f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets={', '.join(lora.target_modules)}"
    lines = ["## Training data", "", f"- Sources: {', '.join(f'`{url}`' for url in config.data)}; {held_out}",
             f"- Validation: {_summary(data.stats)}", f"- Tokenization: {_summary(tokenized.stats)}",
             f"- Content hash of the validated rows (sha256): `{manifest['hashes']['data']}`", "",
             "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in settings.items()]
    lines += ["", "![training loss](training/loss_curve.png)"]
    return "\n".join(lines)


def _card_evaluation(evaluation) -> str:
    if evaluation is None:
        return "## Evaluation\n\nNot evaluated (eval.enabled was off): no quality gate was applied."
    lines = ["## Evaluation", "", f"Quality gate **{'passed' if evaluation.passed else 'FAILED'}**: {evaluation.gate_message}",
             "", "| metric | base | tuned | delta |", "|---|---|---|---|"]
    for row in metric_rows(evaluation.stats.get("base", {}), evaluation.stats.get("tuned", {})):
        lines.append("| " + " | ".join(_num(row[k]) for k in ("metric", "base", "tuned", "delta")) + " |")
    lines += ["", "Loss and perplexity are over the response tokens of the held-out rows (lower is better); the text "
              "metrics compare greedy answers with the reference answers (higher is better). Sample answers side by "
              "side: `eval/report.md`."]
    return "\n".join(lines)


LOAD_MERGED = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", use_safetensors=True)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
messages = [{{"role": "user", "content": "Hello!"}}]
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


def _card_usage(source: str, config: SFTConfig, trained, manifest) -> str:
    lines = ["## Intended use", "",
             "A research and demonstration model: a small model adapted to the conversations in its training data. It "
             "has not been evaluated for safety or factuality beyond the metrics above and can give wrong or biased "
             "answers. Prompt it with the bundled chat template (`tokenizer.apply_chat_template`), the format it was "
             "trained on."]
    mode = config.template.system_prompt_mode
    if not manifest["release"]["chat_template_matches_training"]:
        lines += ["", f"**Prompt format:** training used system_prompt_mode `{mode}`, which the bundled chat template "
                  "does not reproduce by itself: " + (f"pass `{config.template.system_prompt}` as the system message."
                  if mode == "custom" else "training removed the template's default system prompt.")]
    lines += ["", "## How to load", ""]
    if manifest["release"]["merged"]:
        lines += [LOAD_MERGED.format(), ""]
    if trained.method == "lora":
        lines += [LOAD_ADAPTER.format(source=source)]
    return "\n".join(lines).rstrip()


def _card_files(manifest, evaluation) -> str:
    model_files = "`model.safetensors` (or shards and `model.safetensors.index.json`), `config.json`, `generation_config.json`"
    lines = ["## Files", "",
             f"- {model_files}: the model" if manifest["release"]["merged"] else "- no merged model (export.merge_lora was off)",
             "- tokenizer files and `chat_template.jinja`: the tokenizer with the chat template used in training",
             "- `config.yaml`, `run_config.json`: the resolved run configuration (storage credentials redacted)",
             "- `run_manifest.json`: stages, cache keys, content hashes of data, tokenizer, base model and code, library versions",
             "- `training/loss_curve.json`, `training/loss_curve.png`: the training loss"]
    if manifest["release"]["method"] == "lora":
        lines.append("- `adapter/`: the LoRA adapter (peft, safetensors)")
    if evaluation is not None:
        lines.append("- `eval/`: metrics.json (base, tuned, delta), gate.json, generations.json, loss_curve.png, report.md")
    lines += ["", "## Reproducibility", "", "| content | hash |", "|---|---|"]
    lines += [f"| {name} | `{value}` |" for name, value in manifest["hashes"].items() if value]
    return "\n".join(lines)


def _summary(stats: dict[str, Any]) -> str:
    flat = [f"{k}: {_num(v)}" for k, v in stats.items() if not isinstance(v, (dict, list))]
    return ", ".join(flat) or "-"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


CODE_VERSION = hashing.code_version(sys.modules[__name__], evaluate, modeling, formatting)


@task(name="export", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def export_task(
    config: SFTConfig,
    model: ModelArtifact,
    trained: TrainArtifact,
    evaluation: EvalArtifact | None,
    data: DataArtifact,
    tokenized: TokenizedArtifact,
    run_manifest: dict,
) -> ExportArtifact:
    result = export_release(config, model, trained, evaluation, data, tokenized, run_manifest)
    publish_release_link(result)
    return result


@publisher("release link")
def publish_release_link(result: ExportArtifact) -> None:
    """A Prefect link artifact to the release."""
    from prefect.artifacts import create_link_artifact

    link = Path(result.uri).resolve().as_uri() if storage.is_local(result.uri) and "://" not in result.uri else result.uri
    create_link_artifact(link=link, link_text=f"SFT release {result.key}", key="sft-release",
                         description=f"{result.stats.get('files')} files, {result.stats.get('bytes')} bytes")
