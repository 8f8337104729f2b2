"""model_card: the release's README.md, written from records alone (no model, no files)."""

from __future__ import annotations

import pytest
import yaml

from schemas.config import EMBEDDED_MODEL, SFTConfig, TemplateOptions, TrainOptions
from schemas.manifests import DataArtifact, EvalArtifact, ModelArtifact, ReleaseInputs, TokenizedArtifact, TrainArtifact
from tasks.model_card import EMBEDDED_HUB_ID, held_out, model_card

SCORES = {"base": {"eval_loss": 2.0, "perplexity": 7.389056}, "tuned": {"eval_loss": 1.5, "perplexity": 4.481689}}
DISABLED = "evaluation disabled (eval.enabled = false): the gate was not applied"
VALIDATION = {"files": [{"file": "/data/train.jsonl", "split": "train"}], "options": {"eval_fraction": 0.1}}


def inputs(method: str = "lora", source: str = EMBEDDED_MODEL, scores: dict | None = None, message: str = "passed gate on eval_loss") -> ReleaseInputs:
    return ReleaseInputs(
        model=ModelArtifact(stage="import-model", uri="/cache/models/m", key="model-key", source=source, tokenizer_hash="tok"),
        data=DataArtifact(stage="validate-data", uri="/cache/v/data.jsonl", key="data-key", report_uri="/cache/v/report.json",
                          stats={"rows_kept": 32, "eval_rows": 8, "dropped_by_reason": {}}),
        tokenized=TokenizedArtifact(stage="tokenize-and-cache", uri="/cache/t", key="tok-key", stats={"seconds": 0.25}),
        trained=TrainArtifact(stage="train", uri="/cache/train/k", key="train-key", method=method, loss_curve_uri="/cache/train/k/c.json"),
        evaluation=EvalArtifact(stage="evaluate", uri="/cache/eval/k", key="eval-key", passed=True, gate_message=message,
                                stats=SCORES if scores is None else scores),
    )


def manifest(config: SFTConfig, method: str = "lora", merged: bool = True, matches: bool = True) -> dict:
    release = {"key": "release-key", "exported_at": "2026-01-01T00:00:00+00:00", "method": method, "merged": merged,
               "chat_template_matches_training": matches}
    return {"config": config.redacted_dump(), "hashes": {"data": "abc123", "release": "release-key"}, "release": release}


def card(config: SFTConfig = SFTConfig(), method: str = "lora", merged: bool = True, matches: bool = True, **kwargs) -> str:
    return model_card(inputs(method, **kwargs), config.train, config.template, manifest(config, method, merged, matches), VALIDATION)


def test_a_lora_card_names_the_hub_model_its_settings_scores_and_how_to_load_it():
    config = SFTConfig(train=TrainOptions(max_steps=30, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]}))
    text = card(config)
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["sft", "prefect-sft", "lora"],
                     "base_model": EMBEDDED_HUB_ID}
    assert f"# Fine-tuned {EMBEDDED_HUB_ID}\n\nSupervised fine-tune (LoRA) of `{EMBEDDED_HUB_ID}`" in text
    for line in ("- Sources: `embedded:identity-demo`; 0.1 of the rows held out, chosen by content hash",
                 "- Validation: rows_kept: 32, eval_rows: 8", "- Tokenization: seconds: 0.2500",
                 "| peak learning rate | 0.001 |", "| steps | 30 |", "| LoRA | r=4, alpha=8.0, dropout=0.0, targets=q_proj |",
                 "Quality gate **passed**: passed gate on eval_loss", "| eval_loss | 2.0000 | 1.5000 | -0.5000 |",
                 "- `adapter/`: the LoRA adapter (peft, safetensors)", "| data | `abc123` |", "| release | `release-key` |"):
        assert line in text.splitlines(), line
    assert "AutoTokenizer.from_pretrained" in text and f'AutoModelForCausalLM.from_pretrained("{EMBEDDED_HUB_ID}"' in text


def test_a_full_card_has_no_adapter_and_a_local_base_is_not_a_hub_id(tmp_path):
    text = card(SFTConfig(train=TrainOptions(method="full")), method="full", source=str(tmp_path))
    assert "base_model" not in yaml.safe_load(text.split("---\n")[1])
    assert "(full fine-tuning)" in text and "adapter" not in text and "| LoRA |" not in text
    assert "| peak learning rate | 2e-05 |" in text.splitlines()


def test_an_unmerged_lora_card_says_there_is_no_merged_model():
    text = card(merged=False)
    assert "- no merged model (export.merge_lora was off)" in text.splitlines()
    assert "AutoTokenizer.from_pretrained" not in text and "PeftModel.from_pretrained" in text


def test_a_disabled_evaluation_says_so_without_an_empty_table():
    """With eval.enabled off the flow still hands export an evaluation: it passed, measured nothing."""
    text = card(scores={"base": {}, "tuned": {}}, message=DISABLED)
    evaluation = text.split("## Evaluation\n\n")[1].split("\n\n## ")[0]
    assert evaluation == f"Quality gate **passed**: {DISABLED}"


@pytest.mark.parametrize("mode, says", [
    ("custom", "pass ``Be `brief`.`` as the system message."),
    ("none", "training removed the template's default system prompt."),
])
def test_a_template_that_does_not_reproduce_training_tells_how_to_prompt(mode, says):
    config = SFTConfig(template=TemplateOptions(system_prompt_mode=mode, system_prompt="Be `brief`."))
    text = card(config, matches=False)
    assert f"**Prompt format:** training used system_prompt_mode `{mode}`, which the bundled chat template does not reproduce by itself: {says}" in text
    assert "**Prompt format:**" not in card(config, matches=True)


@pytest.mark.parametrize("config, validation, text", [
    ({"eval_data": ["s3://b/eval.jsonl"]}, {"files": [{"file": "s3://b/eval.jsonl", "split": "eval"}]}, "held-out data `s3://b/eval.jsonl`"),
    ({"eval_data": []}, {"files": [{"file": "/repo/flows/demo/identity_eval.jsonl", "split": "eval"}]},
     "the held-out file shipped with the data (`identity_eval.jsonl`)"),
    ({"eval_data": []}, {"files": [], "options": {"eval_fraction": 0.25}}, "0.25 of the rows held out, chosen by content hash"),
])
def test_held_out_rows_are_described_as_validation_chose_them(config, validation, text):
    assert held_out(config, validation) == text
