"""export: the release loads and generates, merged LoRA equals base + adapter, the release is
published atomically (an interrupted export keeps the previous one), memory:// works, the output
and the cache are reached with their own storage options, and the release key ignores placement.
The model card's text is tested in test_model_card.py."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.config import EvalOptions, SFTConfig, TemplateOptions
from schemas.manifests import ReleaseInputs
from tasks import export
from tasks.core import formatting, hashing, storage
from tasks.evaluate import evaluate_models
from tasks.export import export_key, export_release, export_task, release_tokenizer
from tests.test_evaluate import TEMPLATE, build_world
from tests.tiny import build_tokenizer

PROBE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("export-world")
    world = build_world(tmp, tiny_model_dir, kinds=("good", "lora"))
    options = EvalOptions(batch_size=4, num_generate=2, max_new_tokens=4)
    world.evaluation = evaluate_models(world.data, world.tokenized, world.model, world.lora, options, TEMPLATE, str(tmp / "cache"))
    # What the flow hands export when eval.enabled is off: a passing evaluation that measured nothing.
    disabled = options.model_copy(update={"enabled": False})
    world.disabled = evaluate_models(world.data, world.tokenized, world.model, world.lora, disabled, TEMPLATE, str(tmp / "cache"))
    return world


def make_config(world, output: str, method: str = "lora", **export_options) -> SFTConfig:
    return SFTConfig.model_validate({
        "data": [world.data.uri],
        "model": world.model.uri,
        "output": output,
        "cache_dir": str(world.tmp / "cache"),
        "template": TEMPLATE.model_dump(),
        "train": {"method": method, "max_steps": 3, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}},
        "export": export_options,
    })


def release_inputs(world, config: SFTConfig, trained=None, evaluation=None) -> ReleaseInputs:
    trained = trained or (world.lora if config.train.method == "lora" else world.good)
    return ReleaseInputs(model=world.model, data=world.data, tokenized=world.tokenized, trained=trained,
                         evaluation=evaluation or world.evaluation)


def run_export(world, config: SFTConfig, trained=None, evaluation=None, task=export_release):
    """Export as the flow calls it: the config's slices, and its redacted dump in the run manifest."""
    inputs = release_inputs(world, config, trained, evaluation)
    manifest = {"status": "completed", "config": config.redacted_dump(), "stages": {"train": {"key": inputs.trained.key}}}
    return task(inputs, config.output_target, config.export, config.train, config.template, manifest,
                config.trust_remote_code, config.cache_storage_options)


def test_lora_release_loads_generates_and_its_merged_model_equals_base_plus_adapter(world, tmp_path):
    from peft import PeftModel

    config = make_config(world, str(tmp_path / "release"))
    result = run_export(world, config)
    release = Path(result.uri)
    assert result.stage == "export" and not result.store_hit and result.stats["merged"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "config.yaml", "run_config.json",
                 "run_manifest.json", "README.md", "eval/metrics.json", "eval/generations.json", "eval/loss_curve.png",
                 "eval/report.md", "training/loss_curve.json", "training/loss_curve.png", storage.COMPLETE_MARKER):
        assert (release / name).is_file(), name
    assert not [p for p in release.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert json.loads((release / "config.json").read_text())["use_cache"] is True

    merged = AutoModelForCausalLM.from_pretrained(str(release), use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(release))
    # The model's template, behind the prelude that renders tools as training did (it has no tool support).
    base_template = formatting.load_tokenizer(world.model.uri).chat_template
    assert tokenizer.chat_template.endswith(base_template) and tokenizer.chat_template.startswith("{%- set sft = namespace")
    base = AutoModelForCausalLM.from_pretrained(world.model.uri, use_safetensors=True)
    adapted = PeftModel.from_pretrained(base, str(release / "adapter")).eval()
    inputs = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected, actual = adapted(**inputs).logits, merged(**inputs).logits
        plain_base = AutoModelForCausalLM.from_pretrained(world.model.uri, use_safetensors=True)(**inputs).logits
    assert not torch.allclose(expected, plain_base, atol=1e-3)  # the adapter does change the model
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    generated = merged.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]

    manifest = json.loads((release / "run_manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["stages"] == {"train": {"key": "lora-key"}}
    assert manifest["config"] == config.redacted_dump()
    hashes = manifest["hashes"]
    assert hashes["data"] == hashing.hash_url(world.data.uri)
    assert {"tokenizer", "base_model", "trained", "evaluation", "code_version", "release"} <= set(hashes)
    assert hashes["tokenizer"] == "tok-hash" and hashes["evaluation"] == world.evaluation.key
    assert manifest["release"]["chat_template_matches_training"] is True
    card = (release / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    for text in ("AutoModelForCausalLM.from_pretrained", "AutoTokenizer.from_pretrained", "| eval_loss |", "## Intended use",
                 "## Hyperparameters", "## Training data", "r=4, alpha=8.0", "PeftModel.from_pretrained"):
        assert text in card, text


def test_full_release_is_sharded_redacts_credentials_points_latest_and_is_reused(world, tmp_path):
    config = make_config(world, str(tmp_path / "out"), method="full", max_shard_size="100KB")
    config.data_options.storage_options = {"token": "data-s3cr3t"}
    config.output_storage_options = {"token": "output-s3cr3t"}
    config.cache_storage_options = {"token": "cache-s3cr3t"}
    result = run_export(world, config)
    release = Path(result.uri)
    index = json.loads((release / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == result.stats["weight_shards"] > 1
    assert not (release / "adapter").exists() and result.stats["decision"] == "promoted"
    assert release.parent == tmp_path / "out" / "releases" and release.name == result.stats["release"]
    assert (tmp_path / "out" / "LATEST").read_text() == (tmp_path / "out" / "production").read_text() == release.name + "\n"
    tuned = AutoModelForCausalLM.from_pretrained(str(world.good.uri) + "/model", use_safetensors=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(release), use_safetensors=True)
    for (name, expected), actual in zip(tuned.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    for path in release.rglob("*"):
        assert not path.is_file() or b"s3cr3t" not in path.read_bytes(), path
    written = yaml.safe_load((release / "config.yaml").read_text())
    assert written["data_options"]["storage_options"] == written["output_storage_options"] == {"token": "<redacted>"}
    assert written["cache_storage_options"] == {"token": "<redacted>"}

    # Where the cache is, which node this is and how the output is reached are not the release.
    moved = config.model_copy(update={"cache_dir": str(tmp_path / "elsewhere"), "output_storage_options": {},
                                      "train": config.train.model_copy(update={"node_rank": 1, "rdzv_endpoint": "10.0.0.1:29400"})})
    again = run_export(world, moved)
    assert again.store_hit and again.key == result.key and again.stats["decision"] == "unchanged"
    assert sorted(p.name for p in (tmp_path / "out" / "releases").iterdir()) == [release.name]


def test_an_export_interrupted_midway_leaves_the_previous_release_intact(world, tmp_path, monkeypatch):
    config = make_config(world, str(tmp_path / "release"), method="full")
    run_export(world, config)
    release = tmp_path / "release"
    before = {p.relative_to(release): p.read_bytes() for p in release.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_model_card", crash)  # after the weights and tokenizer are written
    newer = world.good.model_copy(update={"key": "good-key-2"})
    with pytest.raises(OSError, match="disk full"):
        run_export(world, config, trained=newer)
    after = {p.relative_to(release): p.read_bytes() for p in release.rglob("*") if p.is_file()}
    assert after == before  # the pointers still name the first release, which is untouched
    assert len(list((release / "releases").iterdir())) == 1  # no half-written release left behind


def test_export_to_memory_url_of_a_run_without_evaluation(world):
    root = f"memory://releases/{uuid.uuid4().hex}/run"
    config = make_config(world, root)
    result = run_export(world, config, evaluation=world.disabled, task=export_task.fn)
    output = result.uri
    fs, path = storage.filesystem(output)
    assert storage.is_complete(output) and output.startswith(root + "/releases/")
    for name in ("model.safetensors", "adapter/adapter_model.safetensors", "tokenizer.json", "README.md", "run_manifest.json",
                 "eval/gate.json", "eval/report.md"):
        assert fs.exists(f"{path}/{name}"), name
    assert "Quality gate **passed**: evaluation disabled" in storage.read_text(storage.join(output, "README.md"))
    gate = storage.read_json(storage.join(output, "run_manifest.json"))["release"]["gate"]
    assert gate == {"passed": True, "message": world.disabled.gate_message}
    with fsspec.open(root + "/production", "r") as handle:
        assert handle.read() == result.stats["release"] + "\n"
    local = storage.local_copy(output)
    model = AutoModelForCausalLM.from_pretrained(str(local), use_safetensors=True)
    assert model.config.use_cache and result.stats["files"] > 10


def test_a_model_that_failed_the_gate_is_a_rejected_candidate_and_production_does_not_move(world, tmp_path):
    root = tmp_path / "out"
    promoted = run_export(world, make_config(world, str(root)))
    failed = world.evaluation.model_copy(update={"key": "eval-2", "passed": False, "gate_message": "FAILED gate on eval_loss: champion 1, tuned 2"})
    rejected = run_export(world, make_config(world, str(root)), evaluation=failed)
    assert rejected.stats["decision"] == "rejected" and rejected.stats["production"] == promoted.stats["release"]
    assert (root / "production").read_text() == (root / "LATEST").read_text() == promoted.stats["release"] + "\n"
    manifest = json.loads((Path(rejected.uri) / "run_manifest.json").read_text())
    assert manifest["release"]["gate"] == {"passed": False, "message": failed.gate_message}
    assert "FAILED" in (Path(rejected.uri) / "README.md").read_text()
    # Without keep_rejected nothing is written at all.
    other = failed.model_copy(update={"key": "eval-3"})
    skipped = run_export(world, make_config(world, str(root), keep_rejected=False), evaluation=other)
    assert skipped.stats["release"] is None and len(list((root / "releases").iterdir())) == 2


def test_the_output_and_the_cache_are_reached_with_their_own_storage_options(world, monkeypatch):
    output = f"memory://releases/{uuid.uuid4().hex}/run"
    config = make_config(world, output)
    config.output_storage_options, config.cache_storage_options = {"token": "for-output"}, {"token": "for-cache"}
    config.data_options.storage_options = {"token": "for-data"}
    calls, real = [], storage.filesystem
    monkeypatch.setattr(storage, "filesystem", lambda url, options=None: calls.append((url, options)) or real(url, options))
    run_export(world, config)
    assert {str(options) for url, options in calls if url.startswith(output)} == {str(config.output_storage_options)}
    cache_urls = (str(world.tmp), world.model.uri)  # the stages' entries this test built by hand
    assert {str(options) for url, options in calls if url.startswith(cache_urls)} == {str(config.cache_storage_options)}


def test_the_release_key_covers_what_the_release_holds_and_nothing_about_placement(world):
    config = make_config(world, "out")
    inputs = release_inputs(world, config)

    def key(config: SFTConfig, inputs: ReleaseInputs = inputs) -> str:
        return export_key(inputs, config.export, config.train, config.template, config.trust_remote_code)

    def changed(**update) -> SFTConfig:
        sections = {name: getattr(config, name).model_copy(update=values) for name, values in update.items()}
        return config.model_copy(update=sections)

    same = [changed(train={"node_rank": 3}), changed(train={"rdzv_endpoint": "10.0.0.1:1"}), changed(export={"promote": "manual"}), changed(export={"keep_releases": 2})]
    assert {key(c) for c in same} == {key(config)}
    different = [changed(train={"seed": 7}), changed(template={"max_length": 64}), changed(export={"max_shard_size": "1GB"}),
                 changed(export={"merge_lora": False}), config.model_copy(update={"trust_remote_code": True})]
    keys = [key(c) for c in different] + [key(config, inputs.model_copy(update={"evaluation": world.disabled}))]
    assert len(set(keys)) == len(keys) and key(config) not in keys


@pytest.mark.parametrize("add_bos", [False, True])
def test_a_plain_template_release_renders_prompts_exactly_as_training(tmp_path, add_bos):
    folder = tmp_path / "plain"
    build_tokenizer(folder, chat_template=None, add_bos=add_bos)
    config = SFTConfig(template=TemplateOptions(chat_template="auto", max_length=128))
    tokenizer, matches = release_tokenizer(folder, config.template)
    assert matches
    original = formatting.load_tokenizer(folder)
    conversation = [*PROBE, {"role": "assistant", "content": "Blue."}]
    expected = formatting.render_prompt_ids(conversation, original, config.template)
    text = tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    assert tokenizer.encode(text, add_special_tokens=False) == expected
    assert (expected[0] == original.bos_token_id) is add_bos
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert full == ("<|im_start|>" if add_bos else "") + formatting.render_plain(conversation, False, original.eos_token)


# --- what --output may replace ------------------------------------------------------------------


def test_releases_are_versioned_but_a_root_that_holds_a_file_of_its_own_is_refused(world, tmp_path):
    output = tmp_path / "out"
    first = run_export(world, make_config(world, str(output), method="lora"))
    second = run_export(world, make_config(world, str(output), method="full"))
    assert first.stats["release"] != second.stats["release"] and (Path(first.uri) / "adapter").is_dir()
    assert "adapter" not in json.loads((Path(second.uri) / "run_manifest.json").read_text())["release"]["files"]

    for foreign in (output / "notes.txt", output / "releases" / "mine"):
        foreign.write_text("my notes")
        with pytest.raises(storage.RefusedTargetError, match=foreign.name):
            run_export(world, make_config(world, str(output), method="lora", merge_lora=False))
        assert foreign.read_text() == "my notes"
        foreign.unlink()
    assert len(list((output / "releases").iterdir())) == 2


@pytest.mark.parametrize("kind", ["regular file", "folder with the data", "memory folder"])
def test_an_output_that_is_not_a_release_is_refused_by_export_itself(world, tmp_path, kind):
    if kind == "memory folder":
        output = f"memory://not-a-release/{uuid.uuid4().hex}"
        storage.write_text_atomic(storage.join(output, "data.jsonl"), "{}\n")
    elif kind == "regular file":
        output = str(tmp_path / "notes.txt")
        Path(output).write_text("mine")
    else:
        output = str(tmp_path / "data")
        Path(output).mkdir()
        (Path(output) / "data.jsonl").write_text("{}\n")
    before = snapshot(output)
    with pytest.raises(storage.RefusedTargetError, match="refusing to replace it"):
        run_export(world, make_config(world, output))
    assert snapshot(output) == before


def snapshot(url: str) -> dict[str, bytes]:
    fs, path = storage.filesystem(url)
    if fs.isfile(path):
        return {"": fs.cat_file(path)}
    return {name: fs.cat_file(name) for name in fs.find(path)}


def test_only_missing_empty_release_or_record_only_outputs_are_accepted(tmp_path):
    export.check_output_target(str(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    export.check_output_target(str(tmp_path / "empty"))
    attempt = tmp_path / "records" / "attempts" / "20261203T101500Z-dry-run"
    attempt.mkdir(parents=True)
    (attempt / "run_manifest.json").write_text("{}")
    export.check_output_target(str(tmp_path / "records"))
    (tmp_path / "records" / "attempts" / "my-notes").mkdir()
    with pytest.raises(storage.RefusedTargetError, match="attempts/my-notes"):
        export.check_output_target(str(tmp_path / "records"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run_manifest.json").write_text('{"release": {"key": "k"}}')  # the single-folder layout
    with pytest.raises(storage.RefusedTargetError, match="single-folder layout"):
        export.check_output_target(str(tmp_path / "old"))


@pytest.mark.parametrize("cache", ["out/cache", "out", "."])
def test_a_cache_inside_the_output_or_around_it_is_refused(tmp_path, cache):
    with pytest.raises(storage.RefusedTargetError, match="overlap"):
        export.check_output_target(str(tmp_path / "out"), cache_dir=str(tmp_path / cache))
    export.check_output_target(str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))


# --- what a release looks like on disk, and a crash while it is promoted -------------------------


def test_release_files_get_the_umask_permissions_a_model_server_can_read(world, tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        result = run_export(world, make_config(world, str(tmp_path / "out")))
    finally:
        os.umask(previous)
    release = Path(result.uri)
    modes = {path.relative_to(release): stat.S_IMODE(path.stat().st_mode) for path in [release, *release.rglob("*")]}
    assert modes[Path(".")] == 0o755 and modes[Path("eval")] == 0o755 and modes[Path("model.safetensors")] == 0o644
    assert set(modes.values()) == {0o755, 0o644}


def test_release_weights_in_the_chosen_dtype_round_trip(world, tmp_path):
    config = make_config(world, str(tmp_path / "out"), method="full", dtype="bfloat16")
    result = run_export(world, config)
    released = AutoModelForCausalLM.from_pretrained(result.uri, use_safetensors=True, dtype="auto").eval()
    assert released.dtype == torch.bfloat16 and json.loads((Path(result.uri) / "config.json").read_text())["dtype"] == "bfloat16"
    trained = AutoModelForCausalLM.from_pretrained(str(world.good.uri) + "/model", use_safetensors=True, dtype=torch.bfloat16).eval()
    inputs = {"input_ids": torch.tensor([[1, 5, 9, 14, 20]])}
    with torch.no_grad():
        torch.testing.assert_close(released(**inputs).logits, trained(**inputs).logits, atol=0, rtol=0)
    # 'auto' keeps the base model's dtype (this tiny base is float32).
    auto = run_export(world, make_config(world, str(tmp_path / "auto"), method="full"))
    assert json.loads((Path(auto.uri) / "config.json").read_text())["dtype"] == "float32"


CRASH_SCRIPT = """
import json, os, signal, sys
from schemas.config import SFTConfig
from schemas.manifests import ReleaseInputs
from tasks import export
from tasks.releases import ReleaseStore

spec = json.loads(open(sys.argv[1]).read())
config, inputs = SFTConfig.model_validate(spec["config"]), ReleaseInputs.model_validate(spec["inputs"])
def die(self, name, reason=""):
    os.kill(os.getpid(), signal.SIGKILL)  # the release is complete; production was about to move
ReleaseStore.promote = die
export.export_release(inputs, config.output_target, config.export, config.train, config.template,
                      {"status": "completed", "config": config.redacted_dump(), "stages": {}}, False, {})
"""


def test_a_crash_between_the_release_and_the_pointer_leaves_production_on_a_complete_release(world, tmp_path):
    import subprocess
    import sys

    from tasks.releases import ReleaseStore
    from tests.test_flow import REPO_ROOT

    root = tmp_path / "out"
    first = run_export(world, make_config(world, str(root)))
    config = make_config(world, str(root), method="full")
    spec = {"config": config.model_dump(mode="json"), "inputs": release_inputs(world, config).model_dump(mode="json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    killed = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path / "spec.json")], cwd=REPO_ROOT, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    store = ReleaseStore(str(root))
    assert store.production() == first.stats["release"] and len(store.names()) == 2
    assert storage.is_complete(store.release_url(store.production()))
    again = run_export(world, config)  # the same inputs: the written release is found and promoted
    assert again.store_hit and again.stats["decision"] == "promoted" and store.production() == again.stats["release"]
