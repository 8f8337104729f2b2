"""tokenize-and-cache against TRL's SFTTrainer dataset preparation, in one process, same data and tokenizer.

    python benchmarks/bench_tokenize.py [DATA] [--model-cache /tmp/sftcache] [--repeats 3]

DATA is an alpaca JSON file (instruction, input, output; input joined with "\\n\\n"), by default
../shared/data/alpaca_en_demo.json next to the repository. The tokenizer is SmolLM2's, from
`import_model("embedded:smollm2-135m-instruct", model_cache)`. Both sides use completion-only loss
and max_length 1024. TRL gets prompt-completion rows and `SFTTrainer._prepare_dataset` (what its
constructor runs); ours gets the same conversations as canonical rows and `build_splits`. Each side
is timed best of `--repeats`. Then the whole stage runs cold (read JSONL, load tokenizer, tokenize,
write Arrow) and once more as a cache hit. Finally both outputs are compared token by token.

A second part times tool-call rows built from the same records: the user's question, an assistant
call of a `lookup` tool, its result, and the answer, with the tool's definition in a `tools`
column. Both sides learn the final answer only (ours: train_on last_assistant; TRL: the
completion). SmolLM2's template has no tool support: ours renders tools and calls with the
documented fallback, TRL's `apply_chat_template(..., tools=...)` leaves them out, so ours
tokenizes more text per row (tokens/s is the fair figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas.config import EMBEDDED_MODEL, TemplateOptions  # noqa: E402
from schemas.manifests import DataArtifact  # noqa: E402
from tasks.core.collate import IGNORE_INDEX  # noqa: E402
from tasks.core.hashing import hash_url  # noqa: E402


def alpaca_conversations(path: Path) -> list[tuple[str, str]]:
    records = json.loads(path.read_text())
    return [(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""), r["output"]) for r in records]


def best_of(repeats: int, run) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def trl_preparation(tokenizer, rows: list[dict], max_length: int, workdir: str):
    """An SFTTrainer on a 1-layer model with SmolLM2's tokenizer, and its own dataset preparation of
    prompt-completion `rows` (completion-only loss)."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    dataset = datasets.Dataset.from_list(rows)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id)
    args = SFTConfig(output_dir=workdir, max_length=max_length, completion_only_loss=True, packing=False,
                     report_to=[], use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=LlamaForCausalLM(config), args=args, train_dataset=dataset.select(range(2)),
                         processing_class=tokenizer)
    return lambda: trainer._prepare_dataset(dataset, tokenizer, args, False, None, "train")


def trl_alpaca_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]} for q, a in pairs]


def trl_tool_rows(conversations: list[list[dict]]) -> list[dict]:
    """The agent rows as TRL takes them for tool calling: prompt-completion with a `tools` column
    (JSON text, which TRL parses)."""
    return [{"prompt": turns[:-1], "completion": turns[-1:], "tools": json.dumps([LOOKUP])} for turns in conversations]


LOOKUP = {"type": "function", "function": {"name": "lookup", "description": "Look a question up.",
                                            "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                           "required": ["query"]}}}


def tool_conversations(pairs: list[tuple[str, str]]) -> list[list[dict]]:
    """question -> lookup call -> result -> answer, one agent conversation per record."""
    return [[
        {"role": "user", "content": q},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": {"query": q[:80]}}}]},
        {"role": "tool", "content": json.dumps({"result": a[:200]})},
        {"role": "assistant", "content": a},
    ] for q, a in pairs]


def report_tools(tokenizer, pairs, args, workdir: str) -> None:
    from tasks.tokenize import build_splits

    conversations = tool_conversations(pairs)
    rows = [{"messages": turns, "tools": [LOOKUP], "split": "train", "source": f"tools:{i}"} for i, turns in enumerate(conversations)]
    options = TemplateOptions(max_length=args.max_length, train_on="last_assistant")
    ours_seconds, (_, stats) = best_of(args.repeats, lambda: build_splits(rows, tokenizer, options))
    trl_seconds, theirs = best_of(args.repeats, trl_preparation(tokenizer, trl_tool_rows(conversations), args.max_length, workdir))
    n, tokens = len(rows), stats["train"]["tokens"]
    trl_tokens = sum(len(row["input_ids"]) for row in theirs)
    print(f"tool-call rows ({n}: question, call, result, answer; tools column): rendering {stats['rendering']}")
    print(f"{'ours  build_splits':36}: {ours_seconds:6.2f} s  {n / ours_seconds:7.0f} rows/s  {tokens / ours_seconds:9.0f} tokens/s")
    print(f"{'TRL   SFTTrainer._prepare_dataset':36}: {trl_seconds:6.2f} s  {n / trl_seconds:7.0f} rows/s  "
          f"{trl_tokens / trl_seconds:9.0f} tokens/s")
    print(f"{'ratio ours / TRL (rows/s)':36}: {trl_seconds / ours_seconds:6.2f}x;  tokens/s: "
          f"{(tokens / ours_seconds) / (trl_tokens / trl_seconds):.2f}x  (ours {tokens / n:.0f} tokens/row, TRL {trl_tokens / n:.0f}: "
          "TRL's render leaves out the tools and the call)")


def compare(ours, theirs, newline_id: int) -> tuple[int, int]:
    """Rows with identical input_ids, and rows whose labels agree except TRL's loss on the final newline."""
    same_ids = same_labels = 0
    for mine, other in zip(ours, theirs):
        same_ids += mine["input_ids"] == other["input_ids"]
        expected = list(mine["labels"])
        if expected and mine["input_ids"][-1] == newline_id:
            expected[-1] = newline_id  # TRL's completion mask includes the newline after <|im_end|>
        same_labels += expected == other["labels"]
    return same_ids, same_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(REPO.parent / "shared" / "data" / "alpaca_en_demo.json"))
    parser.add_argument("--model-cache", default=str(REPO / ".sft-cache"), help="cache_dir for import_model")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import datasets

    datasets.disable_progress_bars()
    from tasks.core import formatting
    from tasks.model import import_model
    from tasks.tokenize import build_splits, tokenize_dataset

    model = import_model(EMBEDDED_MODEL, args.model_cache)
    tokenizer = formatting.load_tokenizer(model.uri)
    pairs = alpaca_conversations(Path(args.data))
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "split": "train",
             "source": f"{Path(args.data).name}:{i}"} for i, (q, a) in enumerate(pairs)]
    options = TemplateOptions(max_length=args.max_length)
    workdir = tempfile.mkdtemp(prefix="bench-tokenize-")

    ours_seconds, (splits, stats) = best_of(args.repeats, lambda: build_splits(rows, tokenizer, options))
    trl_seconds, theirs = best_of(args.repeats, trl_preparation(tokenizer, trl_alpaca_rows(pairs), args.max_length, workdir))

    data_path = Path(workdir, "valid.jsonl")
    data_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = DataArtifact(stage="validate-data", uri=str(data_path), key=hash_url(str(data_path)), report_uri="",
                        stats={})
    cold_seconds, _ = best_of(1, lambda: tokenize_dataset(data, model, options, str(Path(workdir, "cache"))))
    hit_seconds, hit = best_of(1, lambda: tokenize_dataset(data, model, options, str(Path(workdir, "cache"))))

    ours, train = splits["train"], stats["train"]
    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    same_ids, same_labels = compare(ours, theirs, newline)
    n, tokens = len(rows), train["tokens"]
    print(f"data: {n} records from {args.data}; SmolLM2 tokenizer ({len(tokenizer)} tokens); "
          f"max_length {args.max_length}; best of {args.repeats}; {os.cpu_count()} CPU cores")
    print(f"{'ours  build_splits':36}: {ours_seconds:6.2f} s  {n / ours_seconds:7.0f} rows/s  "
          f"{tokens / ours_seconds:9.0f} tokens/s")
    print(f"{'TRL   SFTTrainer._prepare_dataset':36}: {trl_seconds:6.2f} s  {n / trl_seconds:7.0f} rows/s  "
          f"{tokens / trl_seconds:9.0f} tokens/s")
    print(f"{'ratio ours / TRL (throughput)':36}: {trl_seconds / ours_seconds:6.2f}x")
    print(f"whole stage, cold (read JSONL, load tokenizer, tokenize, write Arrow): {cold_seconds:.2f} s "
          f"({trl_seconds / cold_seconds:.2f}x TRL's preparation alone)")
    print(f"whole stage, cache hit: {hit_seconds:.3f} s (store_hit={hit.store_hit})")
    print(f"ours: kept {train['kept']}/{n}, dropped {train['dropped']}, {tokens} tokens, "
          f"{train['loss_tokens']} with loss ({train['loss_fraction']:.1%}); TRL: {len(theirs)} rows")
    print(f"agreement: input_ids identical on {same_ids}/{len(theirs)} rows; labels identical on {same_labels} "
          f"once TRL's loss on the newline after <|im_end|> is discounted (ours gives it {IGNORE_INDEX})")
    report_tools(tokenizer, pairs, args, workdir)


if __name__ == "__main__":
    main()
