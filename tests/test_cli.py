"""The CLI is generated from SFTConfig: every field is a flag, YAML is a base, flags override."""

from __future__ import annotations

import pytest

from flows.cli import _walk_fields, build_parser, config_from_args
from schemas.config import EMBEDDED_DATA, EMBEDDED_MODEL, SFTConfig


def test_no_arguments_is_the_embedded_default():
    config = config_from_args([])
    assert config.model == EMBEDDED_MODEL
    assert config.data == [EMBEDDED_DATA]
    assert config == SFTConfig()


def test_help_lists_every_field_with_its_description(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for dotted, _, info in _walk_fields(SFTConfig):
        assert f"--{dotted}" in text
        assert " ".join(info.description.split())[:40] in text


def test_every_field_has_a_description():
    assert all(info.description for _, _, info in _walk_fields(SFTConfig))


def test_flags_override_the_yaml_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "data: [a.jsonl]\nmodel: some/model\ntrain:\n  learning_rate: 0.01\n  max_steps: 5\n  lora: {r: 4}\n"
    )
    config = config_from_args(
        ["--config", str(config_file), "--train.max_steps", "7", "--output", "out/", "--dry-run", "--train.lora.target_modules", "[q_proj, v_proj]"]
    )
    assert config.data == ["a.jsonl"]
    assert config.model == "some/model"
    assert config.train.learning_rate == 0.01  # from the file
    assert config.train.max_steps == 7  # the flag wins
    assert config.train.lora.r == 4
    assert config.train.lora.target_modules == ["q_proj", "v_proj"]
    assert config.output == "out/"
    assert config.dry_run is True


def test_string_fields_are_not_reinterpreted_as_yaml():
    config = config_from_args(["--model", "123", "--data", "x.json,y.json"])
    assert config.model == "123"
    assert config.data == ["x.json", "y.json"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--train.method", "qlora"],  # not one of the choices
        ["--train.learning_rate", "-1"],  # out of bounds
        ["--template.max_length", "lots"],  # not a number
    ],
)
def test_invalid_values_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        config_from_args(argv)
    assert raised.value.code == 2
    assert "invalid configuration" in capsys.readouterr().err


def test_unknown_yaml_field_is_rejected(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("trian: {max_steps: 3}\n")
    with pytest.raises(SystemExit):
        config_from_args(["--config", str(config_file)])
    assert "trian" in capsys.readouterr().err


def test_a_flag_abbreviation_is_refused_not_taken_for_the_option_it_prefixes(capsys):
    """Before: argparse's prefix matching read `--train.learning_rat 0.1` as the learning rate."""
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(["--train.learning_rat", "0.1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --train.learning_rat" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [
    ("--train.learning_rate", "inf"), ("--train.epochs", "inf"), ("--train.epochs", ".nan"),
    ("--train.lora.alpha", "inf"), ("--eval.gate.max_value", "-inf"),
])
def test_nan_and_infinite_numbers_are_refused(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        config_from_args([f"{flag}={value}"])
    assert exit_info.value.code == 2
    assert "finite number" in capsys.readouterr().err
