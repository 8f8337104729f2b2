"""Content hashes: keys follow bytes and values, never where a file happens to be."""

from __future__ import annotations

import types

from schemas.config import DataOptions
from tasks.core.hashing import code_version, hash_bytes, hash_files, hash_json, hash_parts, hash_url


def write_tree(root, files: dict[str, bytes]) -> list:
    paths = []
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_hash_files_follows_content_and_relative_names_not_the_folder(tmp_path):
    files = {"tokenizer.json": b"{}", "sub/template.jinja": b"{{ x }}"}
    here, there = tmp_path / "here", tmp_path / "elsewhere" / "there"
    key = hash_files(write_tree(here, files), root=here)
    assert hash_files(reversed(write_tree(there, files)), root=there) == key  # another place, another order
    assert hash_files(write_tree(tmp_path / "a", {**files, "tokenizer.json": b"{ }"}), root=tmp_path / "a") != key
    renamed = {"tokenizer2.json": b"{}", "sub/template.jinja": b"{{ x }}"}
    assert hash_files(write_tree(tmp_path / "b", renamed), root=tmp_path / "b") != key
    moved = {"tokenizer.json": b"{}", "other/template.jinja": b"{{ x }}"}
    assert hash_files(write_tree(tmp_path / "c", moved), root=tmp_path / "c") != key  # names count from the root


def test_hash_url_is_the_hash_of_the_bytes(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 3_000_000)  # more than one read chunk
    assert hash_url(str(path)) == hash_url(f"file://{path}") == hash_bytes(b"x" * 3_000_000)


def test_hash_json_ignores_dict_order_and_dumps_models():
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"b": [1, 2]}) != hash_json({"b": [2, 1]})
    assert hash_json(DataOptions(dedupe=True)) == hash_json(DataOptions(dedupe=True).model_dump(mode="json"))
    assert hash_json(DataOptions(dedupe=True)) != hash_json(DataOptions())


def test_hash_parts_is_order_sensitive():
    assert hash_parts("data", "model") != hash_parts("model", "data")
    assert hash_parts("data", "model") == hash_parts("data", "model")
    assert hash_parts("a", "b") != hash_parts("ab")


def _module(tmp_path, name: str, source: str) -> types.ModuleType:
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    return module


def test_code_version_changes_with_a_module_source(tmp_path):
    stage = _module(tmp_path, "stage", "def run():\n    return 1\n")
    helper = _module(tmp_path, "helper", "X = 1\n")
    version = code_version(stage, helper)
    assert code_version(stage, helper) == version and len(version) == 16
    assert code_version(stage) != version  # a helper's code is part of it when listed
    _module(tmp_path, "helper", "X = 2\n")
    assert code_version(stage, helper) != version
