"""export: an atomic, self-describing release folder at the output target (any fsspec URL).

Like every stage it takes records and its own options: what upstream produced (`ReleaseInputs`),
where the release goes (`OutputTarget`: the URL and its own storage options), `ExportOptions`,
and the train and template options the release describes. The release is built in a local
scratch folder and published with `storage.atomic_directory`: a crash midway leaves the previous
release untouched. It holds the model (merged LoRA or full weights, safetensors, sharded above
export.max_shard_size), the adapter for LoRA runs, the tokenizer with the chat template the model
was trained with, the resolved run config (redacted by the flow), the run manifest with content
hashes, the eval results and plots, and a model card (`tasks/model_card.py`). The optional
`LATEST` pointer next to the release is written last. Weights are read from safetensors only and
model code runs only when trust_remote_code is set."""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from prefect import task

from schemas.config import ExportOptions, TemplateOptions, TrainOptions
from schemas.manifests import EvalArtifact, ExportArtifact, OutputTarget, ReleaseInputs
from tasks import model_card, releases, reporting
from tasks.artifacts import publisher
from tasks.core import formatting, hashing, modeling, storage
from tasks.retrying import retry_transient

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CODE_PACKAGES = ("flows", "schemas", "tasks")
LIBRARIES = ("torch", "transformers", "peft", "datasets", "safetensors", "prefect")


RELEASE_MANIFEST = releases.MANIFEST
ATTEMPTS = releases.ATTEMPTS  # run records kept inside the output folder (tasks that did not build the release)
ATTEMPT_NAME = re.compile(r"^\d{8}T\d{6}Z-[a-z-]+$")


def check_output_target(
    output: str, storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
    cache_storage_options: dict[str, Any] | None = None,
) -> None:
    """Refuse, before any work starts, an output that is not a release root of ours.

    `output` holds versioned releases and their pointers (tasks/releases.py), so it may only be:
    missing, an empty folder, or a folder holding nothing but what a release root holds
    (releases/, production, LATEST, history.jsonl, attempts/). Anything else (a regular file, `.`,
    the folder with the user's data, a release in the old single-folder layout) raises
    RefusedTargetError naming the path. The cache may not live inside the output nor the output
    inside the cache; `cache_storage_options` are the cache's fsspec options."""
    fs, path = storage.filesystem(output, storage_options)
    shown = fs.unstrip_protocol(path) if "://" in output else output
    if cache_dir is not None and _overlaps(output, storage_options, cache_dir, cache_storage_options):
        raise storage.RefusedTargetError(
            f"--output {shown} and --cache_dir {cache_dir} overlap: the output holds releases that are deleted by "
            "retention, so the two must be separate folders"
        )
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise storage.RefusedTargetError(
            f"--output {shown} is an existing file, not a release folder: refusing to replace it. Choose a new folder."
        )
    names = sorted(_names(fs, path))
    if RELEASE_MANIFEST in names:
        raise storage.RefusedTargetError(
            f"--output {shown} holds a release in the previous single-folder layout: releases are now versioned "
            "under <output>/releases/. Choose a new folder (and copy the old release there if you still need it)."
        )
    foreign = _foreign_entries(fs, path, names)
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise storage.RefusedTargetError(
            f"--output {shown} is an existing folder that is not a release root of this pipeline (it holds {listed}): "
            "refusing to replace it, nothing was changed. Choose a new or empty folder, or a previous output."
        )


def _foreign_entries(fs, path: str, names: list[str]) -> list[str]:
    """The entries of an existing output folder that are not a release root's."""
    foreign = [name for name in names if name not in releases.ROOT_ENTRIES]
    if releases.RELEASES in names:
        # Our releases, and the hidden scratch of one being written.
        foreign += [f"{releases.RELEASES}/{name}" for name in _names(fs, f"{path}/{releases.RELEASES}")
                    if not (releases.RELEASE_NAME.match(name) or name.startswith("."))]
    if ATTEMPTS in names:
        foreign += [f"{ATTEMPTS}/{name}" for name in _names(fs, f"{path}/{ATTEMPTS}") if not ATTEMPT_NAME.match(name)]
    return foreign


def _names(fs, path: str) -> list[str]:
    return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]


def _overlaps(output: str, output_options: dict[str, Any] | None, cache_dir: str, cache_options: dict[str, Any] | None) -> bool:
    if not (storage.is_local(output, output_options) and storage.is_local(cache_dir, cache_options)):
        return False
    places = ((output, output_options), (cache_dir, cache_options))
    first, second = (Path(storage.filesystem(url, options)[1]).resolve() for url, options in places)
    return first == second or first in second.parents or second in first.parents


def export_release(
    inputs: ReleaseInputs,
    target: OutputTarget,
    options: ExportOptions,
    train: TrainOptions,
    template: TemplateOptions,
    run_manifest: dict,
    trust_remote_code: bool = False,
    cache_storage_options: dict[str, Any] | None = None,
) -> ExportArtifact:
    """Write the release under `<target.url>/releases/` (or find the one built from exactly the same
    inputs: store_hit), then move the pointers (tasks/releases.py). A model that passed its gate
    becomes LATEST, and production unless `options.promote` is 'manual'. One that failed is written
    as a rejected candidate (or not at all without `keep_rejected`); production does not move.
    `run_manifest` is the flow's record so far; its `config` (already redacted) goes in as it is."""
    store = releases.ReleaseStore(target.url, target.storage_options)
    passed = inputs.evaluation.passed
    key = export_key(inputs, options, train, template, trust_remote_code)
    name = store.find(key)
    store_hit = name is not None
    if name is None and (passed or options.keep_rejected):
        check_output_target(target.url, target.storage_options)  # again: the folder may have changed since the run began
        name = store.new_name(key)
        release = Release(inputs, options, train, template, trust_remote_code, cache_storage_options or {})
        with storage.atomic_directory(store.release_url(name), target.storage_options) as scratch:
            build_release(scratch, key, release, run_manifest)
    decision = move_pointers(store, name, inputs.evaluation, options)  # after the release is complete
    pruned = store.prune(options.keep_releases)
    url = store.release_url(name) if name else target.url
    files = _listing(url, target.storage_options) if name else {}
    return ExportArtifact(
        stage="export",
        uri=url,
        key=key,
        store_hit=store_hit,
        stats={
            "release": name,
            "decision": decision,
            "production": store.production(),
            "latest": store.latest(),
            "pruned": pruned,
            "method": inputs.trained.method,
            "merged": _merged(inputs, options),
            "weight_shards": sum(name.endswith(".safetensors") and "/" not in name for name in files),
            "files": len(files),
            "bytes": sum(files.values()),
        },
    )


def move_pointers(store: releases.ReleaseStore, name: str | None, evaluation: EvalArtifact, options: ExportOptions) -> str:
    """LATEST and production after a release: the decision ('promoted', 'pending' for manual
    promotion, 'unchanged' when it already is production, 'rejected')."""
    if not evaluation.passed:
        return "rejected"
    store.set_latest(name)
    if store.production() == name:
        return "unchanged"
    if options.promote == "manual":
        return "pending"
    store.promote(name, reason=evaluation.gate_message)
    return "promoted"


# Options that say where things are or how a run is spread over machines, not what the release
# holds: left out of its key like the output and cache URLs and every storage option.
TRAIN_PLACEMENT = {"node_rank", "rdzv_endpoint"}
# Promotion and retention decide what the pointers name and how many releases stay, not what a
# release holds.
EXPORT_PLACEMENT = {"promote", "keep_releases", "keep_rejected"}


def export_key(inputs: ReleaseInputs, options: ExportOptions, train: TrainOptions, template: TemplateOptions,
               trust_remote_code: bool) -> str:
    """What determines the release: upstream keys, the export options, the train and template
    options its card and config describe, trust_remote_code (which code merges) and this code."""
    return hashing.hash_parts(
        "export", inputs.content_keys(), options.model_dump(mode="json", exclude=EXPORT_PLACEMENT),
        train.model_dump(mode="json", exclude=TRAIN_PLACEMENT), template.model_dump(mode="json"), trust_remote_code, CODE_VERSION,
    )[:24]


@dataclass(frozen=True)
class Release:
    """What building one release needs, passed as one value through its steps."""

    inputs: ReleaseInputs
    options: ExportOptions
    train: TrainOptions
    template: TemplateOptions
    trust_remote_code: bool
    cache_options: dict[str, Any]


def build_release(scratch: Path, key: str, release: Release, run_manifest: dict) -> None:
    inputs, cache = release.inputs, release.cache_options
    base_dir, trained_dir = storage.local_copy(inputs.model.uri, cache), storage.local_copy(inputs.trained.uri, cache)
    tokenizer, template_matches = release_tokenizer(base_dir, release.template)
    tokenizer.save_pretrained(str(scratch))
    save_weights(scratch, base_dir, trained_dir, release, tokenizer)
    resolved = run_manifest["config"]  # redacted by the flow, written as it is
    (scratch / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    (scratch / "run_config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    _write_training_curve(scratch / "training", inputs, cache)
    _copy_tree(storage.local_copy(inputs.evaluation.uri, cache), scratch / "eval")
    manifest = release_manifest(key, release, run_manifest)
    manifest["release"]["chat_template_matches_training"] = template_matches
    write_model_card(scratch, release, manifest)
    # What the release wrote at its top level: a later run replaces the folder only while it
    # holds nothing else (check_output_target).
    manifest["release"]["files"] = sorted([path.name for path in scratch.iterdir()] + [RELEASE_MANIFEST])
    (scratch / RELEASE_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _write_training_curve(folder: Path, inputs: ReleaseInputs, cache_options: dict[str, Any]) -> None:
    curve = reporting.read_loss_curve(inputs.trained, cache_options)
    folder.mkdir()
    (folder / "loss_curve.json").write_text(json.dumps(curve, indent=2) + "\n")
    reporting.plot_loss_curve(curve, folder / "loss_curve.png")


def _merged(inputs: ReleaseInputs, options: ExportOptions) -> bool:
    return inputs.trained.method == "full" or options.merge_lora


PROBE = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]


def release_tokenizer(base_dir: Path, template: TemplateOptions):
    """The base tokenizer carrying the chat template training used, so `apply_chat_template` on the
    released tokenizer formats prompts as the model saw them. Returns (tokenizer, matches): whether
    the released template reproduces training's prompt tokens on a probe conversation (it cannot
    when training dropped a template's default system prompt or used a custom one)."""
    tokenizer = formatting.load_tokenizer(base_dir)
    expected = formatting.render_prompt_ids(PROBE, tokenizer, template)
    with_bos = False
    if formatting.template_kind(tokenizer, template) == "plain":
        text_ids = tokenizer.encode(formatting.render_plain(PROBE[:1], True, tokenizer.eos_token or ""), add_special_tokens=False)
        with_bos = expected != text_ids and expected[1:] == text_ids  # training put one BOS in front
    # The plain template, and the tool/reasoning fallback, travel with the release as Jinja.
    tokenizer.chat_template = formatting.released_chat_template(tokenizer, template, with_bos)
    rendered = tokenizer.apply_chat_template(PROBE[:1], tokenize=False, add_generation_prompt=True)
    matches = tokenizer.encode(rendered, add_special_tokens=False) == expected
    if not matches:
        logger.warning("The released chat template does not reproduce training's prompts (system_prompt_mode %r): the model card says so",
                       template.system_prompt_mode)
    return tokenizer, matches


def save_weights(scratch: Path, base_dir: Path, trained_dir: Path, release: Release, tokenizer) -> None:
    method, trust = release.inputs.trained.method, release.trust_remote_code
    if method == "lora":
        adapter = trained_dir / "adapter"
        if not (adapter / modeling.ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"{adapter} has no {modeling.ADAPTER_WEIGHTS}")
        (scratch / "adapter").mkdir()
        for path in adapter.iterdir():  # weights as safetensors and JSON configs only, never pickles
            if path.is_file() and path.suffix in (".safetensors", ".json"):
                shutil.copy2(path, scratch / "adapter" / path.name)
        if not release.options.merge_lora:
            return
        # Cast once, from the fp32 merge: via the base's dtype, a float32 release of a bf16 base would lose precision.
        final = modeling.merge_lora(base_dir, adapter, trust, dtype=release_dtype(base_dir, release.options, trust))
    elif method == "full":
        final = modeling.load_causal_lm(trained_dir / "model", trust, dtype="auto")
        final = final.to(release_dtype(base_dir, release.options, trust))
    else:
        raise ValueError(f"unknown training method {method!r}")
    final.config.use_cache = True  # training turns the KV cache off; generation wants it on
    generation = final.generation_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            setattr(final.config, name, getattr(tokenizer, name))
            if getattr(generation, name, None) is None:
                setattr(generation, name, getattr(tokenizer, name))
    final.save_pretrained(str(scratch), max_shard_size=release.options.max_shard_size)
    if not (scratch / "generation_config.json").exists():
        generation.save_pretrained(str(scratch))


def release_dtype(base_dir: Path, options: ExportOptions, trust_remote_code: bool):
    """The released weights' dtype: export.dtype, or ('auto') the base model's own."""
    import torch

    if options.dtype != "auto":
        return getattr(torch, options.dtype)
    return modeling.saved_dtype(base_dir, trust_remote_code)


def release_manifest(key: str, release: Release, run_manifest: dict) -> dict[str, Any]:
    """The flow's manifest plus what identifies the release: content hashes and versions."""
    inputs = release.inputs
    manifest = json.loads(json.dumps(run_manifest, default=str))
    manifest["hashes"] = {
        **manifest.get("hashes", {}),
        "data": hashing.hash_url(inputs.data.uri, release.cache_options),
        "data_key": inputs.data.key,
        "tokenized_key": inputs.tokenized.key,
        "tokenizer": inputs.model.tokenizer_hash,
        "base_model": inputs.model.key,
        "trained": inputs.trained.key,
        "evaluation": inputs.evaluation.key,
        "code_version": pipeline_code_version(),
        "release": key,
    }
    manifest["release"] = {
        "key": key,
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "base_model": inputs.model.source,
        "method": inputs.trained.method,
        "merged": _merged(inputs, release.options),
        "gate": {"passed": inputs.evaluation.passed, "message": inputs.evaluation.gate_message},
        "comparison": inputs.evaluation.stats.get("comparison", {}),
        "evaluated_against": run_manifest.get("champion"),  # the production release it had to beat, if any
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


def _listing(output: str, storage_options: dict[str, Any]) -> dict[str, int]:
    fs, path = storage.filesystem(output, storage_options)
    root = path.rstrip("/") + "/"
    return {name[len(root):]: info.get("size") or 0 for name, info in fs.find(path, detail=True).items()}


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(storage.COMPLETE_MARKER, ".*"))


def write_model_card(scratch: Path, release: Release, manifest: dict) -> None:
    validation = storage.read_json(release.inputs.data.report_uri, release.cache_options)
    card = model_card.model_card(release.inputs, release.train, release.template, manifest, validation)
    (scratch / "README.md").write_text(card)


CODE_VERSION = hashing.code_version(sys.modules[__name__], model_card, reporting, modeling, formatting)


@task(name="export", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def export_task(
    inputs: ReleaseInputs,
    target: OutputTarget,
    options: ExportOptions,
    train: TrainOptions,
    template: TemplateOptions,
    run_manifest: dict,
    trust_remote_code: bool = False,
    cache_storage_options: dict[str, Any] | None = None,
) -> ExportArtifact:
    result = export_release(inputs, target, options, train, template, run_manifest, trust_remote_code, cache_storage_options)
    publish_release_link(result)
    return result


@publisher("release link")
def publish_release_link(result: ExportArtifact) -> None:
    """A Prefect link artifact to the release, saying what became of it."""
    from prefect.artifacts import create_link_artifact

    if not result.stats.get("release"):
        return
    link = result.uri if "://" in result.uri else Path(result.uri).resolve().as_uri()  # a bare path is local
    create_link_artifact(link=link, link_text=f"SFT release {result.stats['release']} ({result.stats['decision']})", key="sft-release",
                         description=f"{result.stats['decision']}; production: {result.stats['production']}; "
                                     f"{result.stats.get('files')} files, {result.stats.get('bytes')} bytes")


@publisher("rejection")
def publish_rejection(message: str) -> None:
    """A markdown artifact that says plainly that the new model was not promoted, and why."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=f"# Rejected: not promoted\n\n{message}\n", key="sft-decision",
                             description="The new model lost to the champion; production is unchanged")
