"""The command line is generated from `SFTConfig`, so it can never drift from the flow's parameters.

Every field becomes a flag: top-level fields as `--data`, `--model`, `--output`, nested ones with
their dotted path (`--train.learning_rate 1e-4`, `--train.lora.r 8`). Booleans get `--x/--no-x`.
Values of non-string fields are read as YAML scalars or flow collections
(`--train.lora.target_modules '[q_proj, v_proj]'`) and validated by pydantic afterwards.
`--config run.yaml` supplies a base; flags override it."""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any, Iterator

import fsspec
import yaml
from pydantic import BaseModel, ValidationError

from schemas.config import SFTConfig

_UNSET = object()


def _walk_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Yield (dotted name, annotation, FieldInfo) for every leaf field, depth first."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _walk_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", annotation, info


def _is_plain_string(annotation: Any) -> bool:
    return annotation is str


def _help_text(annotation: Any, info: Any) -> str:
    default = info.get_default(call_default_factory=True)
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
    text = info.description or ""
    if choices:
        text += f" Choices: {', '.join(map(str, choices))}."
    return f"{text} Default: {default!r}.".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.sft",
        allow_abbrev=False,  # a misspelt flag must fail, never silently set the option it prefixes
        description="Fine-tune a causal language model: validate-data -> tokenize-and-cache -> train -> evaluate -> export. "
        "With no arguments: the embedded SmolLM2-135M-Instruct learns a new identity from the built-in demo data.",
    )
    parser.add_argument("--config", metavar="YAML_URL", help="YAML file (any fsspec URL) with SFTConfig fields; flags override it.")
    for dotted, annotation, info in _walk_fields(SFTConfig):
        flags = [f"--{dotted}"] + ([f"--{dotted.replace('_', '-')}"] if "_" in dotted else [])
        common = {"dest": dotted, "default": _UNSET, "help": _help_text(annotation, info)}
        if annotation is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(*flags, metavar="VALUE" if not _is_plain_string(annotation) else "TEXT", **common)
    return parser


def _set_dotted(target: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(url: str) -> dict:
    with fsspec.open(url, "r", encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{url}: expected a mapping of config fields at the top level")
    return loaded


def config_from_args(argv: list[str] | None = None) -> SFTConfig:
    """Parse argv into a validated SFTConfig; exits with status 2 and a readable message on errors."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    config_url = args.pop("config")
    annotations = {dotted: annotation for dotted, annotation, _ in _walk_fields(SFTConfig)}
    overrides: dict = {}
    for dotted, raw in args.items():
        if raw is _UNSET:
            continue
        value = raw if isinstance(raw, bool) or _is_plain_string(annotations[dotted]) else yaml.safe_load(raw)
        _set_dotted(overrides, dotted, value)
    try:
        base = load_yaml(config_url) if config_url else {}
        return SFTConfig.model_validate(_deep_merge(base, overrides))
    except (ValidationError, ValueError, OSError, yaml.YAMLError) as error:
        parser.exit(2, f"error: invalid configuration{f' in {config_url}' if config_url else ''}:\n{error}\n")


if __name__ == "__main__":  # pragma: no cover - handy for checking a YAML file
    print(config_from_args(sys.argv[1:]).model_dump_json(indent=2))
