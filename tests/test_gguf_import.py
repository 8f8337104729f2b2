"""The embedded model arrives as a GGUF file, and `_convert_gguf` is the only way it becomes a model.

Tests may never download SmolLM2, so nothing exercised that conversion. Here a tiny Llama and its
ChatML tokenizer (tests/tiny.py) are written out as a GGUF the way llama.cpp's convert script writes
SmolLM2's (llama architecture, a "gpt2" byte-level BPE vocabulary, Q/K rows permuted, F32 weights so
nothing is lost), converted, and the result is checked against the model it came from: same logits,
the special-token ids SmolLM2 uses, and a config that says bfloat16."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tasks.model import SMOLLM2_SPECIAL_TOKENS, _convert_gguf  # noqa: E402
from tests.tiny import SMOLLM2_TEMPLATE, SPECIAL_TOKENS, build_model, build_tokenizer  # noqa: E402

TEXT = "What is the capital of France? The capital of France is Paris. 0123456789!"
# Special-token ids as in the real SmolLM2 GGUF: tests/tiny.py puts the ChatML tokens at the same ids.
GGUF_SPECIAL_IDS = {"unk_token": 0, "bos_token": 1, "eos_token": 2, "pad_token": 2}


@dataclass
class Conversion:
    original_dir: Path
    target: Path


@pytest.fixture(scope="module")
def conversion(tmp_path_factory) -> Conversion:
    """Build, write and convert once: every test below reads the same converted folder."""
    root = tmp_path_factory.mktemp("gguf-import")
    original_dir = root / "original"
    tokenizer = build_tokenizer(original_dir, chat_template=SMOLLM2_TEMPLATE)
    model = build_model(original_dir, tokenizer)
    # Alone in its folder, as the embedded file is: _convert_gguf loads from the file's parent folder.
    gguf_path = root / "gguf" / "tiny-smollm2.F32.gguf"
    gguf_path.parent.mkdir()
    write_gguf(gguf_path, model, tokenizer)
    target = root / "converted"
    target.mkdir()
    _convert_gguf(gguf_path, target)
    return Conversion(original_dir, target)


# --- writing the GGUF, as llama.cpp's convert_hf_to_gguf.py does for a Llama ---


def write_gguf(path: Path, model, tokenizer) -> None:
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name("tiny-smollm2")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    write_hyperparameters(writer, model.config)
    write_tokenizer(writer, tokenizer)
    for name, weights in gguf_tensors(model):
        writer.add_tensor(name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_hyperparameters(writer, config) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def write_tokenizer(writer, tokenizer) -> None:
    """A "gpt2" vocabulary is stored in its byte-level spelling (Ġ for a space), with its merges."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[token] for token in tokens] == list(range(len(tokens))), "GGUF ids are list positions"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    # CONTROL is what makes the loader keep <|im_start|> etc. whole instead of splitting them.
    writer.add_token_types(
        [gguf.TokenType.CONTROL if token in SPECIAL_TOKENS else gguf.TokenType.NORMAL for token in tokens]
    )
    writer.add_token_merges(bpe_merges(tokenizer))
    writer.add_unk_token_id(GGUF_SPECIAL_IDS["unk_token"])
    writer.add_bos_token_id(GGUF_SPECIAL_IDS["bos_token"])
    writer.add_eos_token_id(GGUF_SPECIAL_IDS["eos_token"])
    writer.add_pad_token_id(GGUF_SPECIAL_IDS["pad_token"])
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(SMOLLM2_TEMPLATE)


def bpe_merges(tokenizer) -> list[str]:
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    # tokenizers writes merges as ["a", "b"] pairs (older versions as "a b"); GGUF wants "a b".
    return [" ".join(merge) if isinstance(merge, list) else merge for merge in merges]


def gguf_tensors(model):
    """(GGUF name, float32 array) per weight, with gguf's own HF-to-GGUF name map."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name == "output.weight" and config.tie_word_embeddings:
            continue  # a tied head is not stored; its absence is what tells the loader to tie it
        weights = tensor.detach().to(torch.float32).numpy()
        if name.endswith("attn_q.weight"):
            weights = llama_cpp_permute(weights, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            weights = llama_cpp_permute(weights, config.num_key_value_heads)
        yield name, np.ascontiguousarray(weights)


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout: each head's rows interleaved (pairs), not split in halves.

    transformers' LlamaTensorProcessor undoes exactly this; without it the logits would differ."""
    rows, *rest = weights.shape
    return weights.reshape(heads, 2, rows // heads // 2, *rest).swapaxes(1, 2).reshape(weights.shape)


# --- the converted folder ---


def load_converted(target: Path):
    from transformers import AutoModelForCausalLM

    # float32: the folder holds the exact fp32 weights, while its config asks for bfloat16.
    return AutoModelForCausalLM.from_pretrained(str(target), use_safetensors=True, dtype=torch.float32).eval()


def load_original(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_converted_folder_is_plain_safetensors(conversion):
    assert (conversion.target / "config.json").exists()
    assert list(conversion.target.glob("*.safetensors"))
    assert not list(conversion.target.glob("*.gguf"))


def test_converted_model_reproduces_the_original_logits(conversion):
    input_ids = load_tokenizer(conversion.original_dir)(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = load_original(conversion.original_dir)(input_ids).logits
        actual = load_converted(conversion.target)(input_ids).logits
    # F32 in, F32 out: only float summation order may differ, so the tolerance is tight.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_weights_are_the_original_values_in_float32(conversion):
    original = load_original(conversion.original_dir).state_dict()
    converted = load_converted(conversion.target).state_dict()
    assert converted.keys() == original.keys()
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=name)


def test_special_tokens_keep_the_gguf_ids(conversion):
    tokenizer = load_tokenizer(conversion.target)
    for name, token in SMOLLM2_SPECIAL_TOKENS.items():
        assert getattr(tokenizer, name) == token
        assert getattr(tokenizer, f"{name}_id") == GGUF_SPECIAL_IDS[name] == tokenizer.convert_tokens_to_ids(token)


def test_config_and_generation_config_name_the_tokenizer_ids(conversion):
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(conversion.target))
    generation = GenerationConfig.from_pretrained(str(conversion.target))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        expected = GGUF_SPECIAL_IDS[name.removesuffix("_id")]
        assert getattr(config, name) == expected, name
        assert getattr(generation, name) == expected, name


def test_config_says_bfloat16_and_drops_the_gguf_quantization(conversion):
    config = json.loads((conversion.target / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    # null, not GgufConfig: a reload must not go looking for a GGUF file.
    assert config.get("quantization_config") is None
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True


def test_tokenizer_encodes_like_the_original_and_round_trips(conversion):
    converted = load_tokenizer(conversion.target)
    original = load_tokenizer(conversion.original_dir)
    ids = converted(TEXT).input_ids
    assert ids == original(TEXT).input_ids
    assert converted.decode(ids) == TEXT


def test_chat_markup_stays_whole_and_the_template_is_kept(conversion):
    tokenizer = load_tokenizer(conversion.target)
    assert tokenizer.chat_template == SMOLLM2_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    im_start, im_end = GGUF_SPECIAL_IDS["bos_token"], GGUF_SPECIAL_IDS["eos_token"]
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2  # system, user, open assistant turn
    assert tokenizer.decode(ids) == prompt
