"""Chat and plain formatting with token-exact loss masks. No Prefect here: runs on bare GPU boxes.

How a conversation becomes `input_ids` and `labels`:

1. System prompt (`TemplateOptions.system_prompt_mode`): 'default' keeps the data's system turns and
   lets the template add its own default; 'none' drops them and stops a template from injecting
   its default; 'custom' replaces them with `system_prompt`. Turns after the last assistant turn
   carry no loss and are cut.
2. The conversation is rendered to text with the model's chat template or the plain template.
3. Assistant spans come from rendering prefixes, so no `{% generation %}` markers are needed: for
   assistant turn i, turns[:i] rendered with the generation prompt and turns[:i+1] rendered without
   it must both be prefixes of the full text (else `TemplateError`, naming the row's source). The
   text between them, trailing whitespace removed, is the answer and its end marker (`<|im_end|>`
   in ChatML; the newline after it carries no loss).
4. All rows are tokenized in one batched fast-tokenizer call, and spans are mapped to tokens by
   character offsets: a token carries loss when it starts inside a span. `input_ids` are exactly
   the tokenization of the rendered text, as the model sees it at inference.
5. BOS: never added when the text already starts with it (ChatML's BOS is `<|im_start|>`);
   otherwise added once when the tokenizer adds it by itself (probed), as Llama-like bases do.

The plain template, for base models without a chat template (or `chat_template: plain`)::

    {system}\\n\\n                    only when there is a system prompt
    ### Instruction:\\n{user}\\n\\n
    ### Response:\\n{assistant}{eos}
    \\n\\n                            between an answer and the next turn

Its generation prompt is `### Response:\\n`. The EOS after every answer carries loss, so the model
learns to stop even when pad == eos (padding is masked by labels, never by token id).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

from schemas.config import TemplateOptions
from tasks.core.collate import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PLAIN_SYSTEM = "{content}\n\n"
PLAIN_USER = "### Instruction:\n{content}\n\n"
PLAIN_RESPONSE = "### Response:\n"
PLAIN_SEPARATOR = "\n\n"


class TemplateError(ValueError):
    """The template cannot be used for masking (unstable prefixes, unknown role, rendering failed)."""


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX on every token without loss
    truncated: bool = False


@dataclass(frozen=True)
class Dropped:
    reason: Literal["too_long", "no_loss_tokens"]
    length: int  # tokens of the full rendering


def load_tokenizer(folder: str | Path) -> "PreTrainedTokenizerBase":
    """The fast tokenizer saved in `folder` (offsets need a fast tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{folder}: a fast (tokenizers-backed) tokenizer is required for offset-based masks")
    return tokenizer


def encode_example(
    messages: list[dict], tokenizer, options: TemplateOptions, source: str = "<row>"
) -> EncodedExample | Dropped:
    """One conversation -> input_ids and labels (or why it was dropped)."""
    return encode_batch([messages], tokenizer, options, [source])[0]


def encode_batch(
    conversations: Sequence[list[dict]], tokenizer, options: TemplateOptions, sources: Sequence[str] | None = None
) -> list[EncodedExample | Dropped]:
    """Many conversations at once: batched rendering and one batched tokenizer call."""
    formatter = _formatter(tokenizer, options)
    sources = list(sources) if sources is not None else [f"<row {i}>" for i in range(len(conversations))]
    turns = [formatter.prepare(messages) for messages in conversations]
    texts, spans = formatter.plan(turns, sources)
    encodings = formatter.encode(texts)
    return [formatter.finish(text, enc, row_spans) for text, enc, row_spans in zip(texts, encodings, spans)]


def render_prompt_ids(messages: list[dict], tokenizer, options: TemplateOptions) -> list[int]:
    """Token ids of the conversation up to (excluding) its last assistant turn, ending with the
    generation prompt; used by the evaluate stage for generation. Same template choices, same
    system prompt handling and same BOS rule as training."""
    formatter = _formatter(tokenizer, options)
    turns = formatter.prepare(messages)
    if turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    text = formatter.render([turns], add_generation_prompt=True, sources=["<prompt>"])[0]
    ids = formatter.encode([text])[0].ids
    return ([formatter.bos_id] if formatter.needs_bos(text) else []) + ids


def template_kind(tokenizer, options: TemplateOptions) -> Literal["model", "plain"]:
    """Which template `options.chat_template` resolves to for this tokenizer."""
    if options.chat_template == "plain":
        return "plain"
    if tokenizer.chat_template:
        return "model"
    if options.chat_template == "model":
        raise TemplateError("chat_template is 'model' but the tokenizer has no chat template")
    return "plain"


def render_plain(turns: Sequence[dict], add_generation_prompt: bool, eos: str) -> str:
    """The plain template (see the module docstring)."""
    parts: list[str] = []
    previous = None
    for turn in turns:
        if previous == "assistant":
            parts.append(PLAIN_SEPARATOR)
        role, content = turn["role"], turn["content"]
        if role == "system":
            parts.append(PLAIN_SYSTEM.format(content=content))
        elif role == "user":
            parts.append(PLAIN_USER.format(content=content))
        elif role == "assistant":
            parts.append(PLAIN_RESPONSE + content + eos)
        else:
            raise TemplateError(f"the plain template has no role {role!r}")
        previous = role
    if add_generation_prompt:
        parts.append((PLAIN_SEPARATOR if previous == "assistant" else "") + PLAIN_RESPONSE)
    return "".join(parts)


# `render_plain` as a Jinja chat template, shipped with releases of base models that have none,
# so `apply_chat_template` on the released tokenizer renders what training rendered. Change the
# two together (tests/test_export.py checks they agree).
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


_FORMATTERS: "weakref.WeakKeyDictionary[object, dict[str, _Formatter]]" = weakref.WeakKeyDictionary()


def _formatter(tokenizer, options: TemplateOptions) -> "_Formatter":
    per_tokenizer = _FORMATTERS.setdefault(tokenizer, {})
    key = options.model_dump_json() + repr(tokenizer.chat_template)  # a changed template gets a new formatter
    if key not in per_tokenizer:
        per_tokenizer[key] = _Formatter(tokenizer, options)
    return per_tokenizer[key]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _Formatter:
    """Template choice, system prompt handling, BOS rule and mask construction for one tokenizer."""

    def __init__(self, tokenizer, options: TemplateOptions):
        self.tokenizer = tokenizer
        self.options = options
        self.kind = template_kind(tokenizer, options)
        self.eos = tokenizer.eos_token or ""
        self.bos_text = tokenizer.bos_token
        self.bos_id = tokenizer.bos_token_id
        self.backend = self._plain_backend(tokenizer)
        self.auto_bos = self._adds_bos()
        self.empty_system, self.strip_prefix = False, ""
        self.warned_no_marker = False
        if self.kind == "plain" and not self.eos:
            logger.warning("the tokenizer has no EOS token: plain-template answers end without an end marker")
        if options.system_prompt_mode == "none" and self.kind == "model" and self._template_has_default_system():
            self._prepare_empty_system()

    # -- setup probes --------------------------------------------------------------------------

    @staticmethod
    def _plain_backend(tokenizer):
        backend = tokenizer.backend_tokenizer
        if backend.truncation is not None or backend.padding is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())  # a copy, so the caller's settings stay
            backend.no_truncation()
            backend.no_padding()
        return backend

    def _adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        with_special = self.backend.encode("a", add_special_tokens=True).ids
        without = self.backend.encode("a", add_special_tokens=False).ids
        return with_special[:1] == [self.bos_id] and without[:1] != [self.bos_id]

    def _template_has_default_system(self) -> bool:
        """True when the template writes a system prompt of its own into a conversation without one:
        compare a render without a system turn against one with a sentinel system text."""
        user = [{"role": "user", "content": "ping"}]
        try:
            bare, given = self._render_raw([user, [{"role": "system", "content": "\x1e\x1f"}, *user]], False)
        except Exception:  # noqa: BLE001 - a template that cannot render the probe has no default to remove
            return False
        head = _common_prefix(bare, given)
        tail = _common_prefix(bare[head:][::-1], given[head:][::-1])
        return bool(bare[head : len(bare) - tail].strip())

    def _prepare_empty_system(self) -> None:
        """Mode 'none' with a template that injects a default: give it an empty system turn (so it
        injects nothing) and cut the empty system block from every rendering."""
        self.empty_system = True
        self.strip_prefix = self._render_raw([[{"role": "system", "content": ""}]], False)[0]

    # -- rendering -----------------------------------------------------------------------------

    def prepare(self, messages: Sequence[dict]) -> list[dict]:
        """Apply the system prompt mode and cut the turns after the last assistant turn."""
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        mode = self.options.system_prompt_mode
        if mode != "default":
            turns = [t for t in turns if t["role"] != "system"]
            if mode == "custom":
                turns.insert(0, {"role": "system", "content": self.options.system_prompt})
            elif self.empty_system:
                turns.insert(0, {"role": "system", "content": ""})
        last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        return turns if last is None else turns[: last + 1]

    def _render_raw(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        if self.kind == "plain":
            return [render_plain(turns, add_generation_prompt, self.eos) for turns in conversations]
        if not conversations:
            return []
        return self.tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def render(self, conversations: list[list[dict]], add_generation_prompt: bool, sources: Sequence[str]) -> list[str]:
        """Render many conversations; a failure names the row that caused it."""
        for turns, source in zip(conversations, sources):
            if not turns and self.kind == "model":
                raise TemplateError(f"{source}: nothing to render before the first assistant turn")
        try:
            texts = self._render_raw(conversations, add_generation_prompt)
        except Exception as batch_error:  # noqa: BLE001 - find and name the row, then re-raise
            for turns, source in zip(conversations, sources):
                try:
                    self._render_raw([turns], add_generation_prompt)
                except Exception as error:  # noqa: BLE001
                    raise TemplateError(f"{source}: the chat template failed: {error}") from error
            raise batch_error
        if self.strip_prefix:
            texts = [self._strip_empty_system(text) for text in texts]
        return texts

    def _strip_empty_system(self, text: str) -> str:
        if not text.startswith(self.strip_prefix):
            return text
        rest = text[len(self.strip_prefix) :]
        # A BOS the template writes once before the system block stays (ChatML's BOS opens every
        # turn, so its next turn already starts with it).
        if self.bos_text and self.strip_prefix.startswith(self.bos_text) and not rest.startswith(self.bos_text):
            rest = self.bos_text + rest
        return rest

    def _loss_turns(self, turns: list[dict]) -> list[int]:
        assistant = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
        return assistant[-1:] if self.options.train_on == "last_assistant" else assistant

    def plan(self, conversations: list[list[dict]], sources: Sequence[str]) -> tuple[list[str], list[list[tuple]]]:
        """Full texts and, per row, the character spans (start, end, content_end) that carry loss."""
        texts = self.render(conversations, False, sources)
        requests = [(row, i) for row, turns in enumerate(conversations) for i in self._loss_turns(turns)]
        prompts = self.render(
            [conversations[row][:i] for row, i in requests], True, [sources[row] for row, _ in requests]
        )
        closing = [(row, i) for row, i in requests if i != len(conversations[row]) - 1]
        closed = self.render([conversations[r][: i + 1] for r, i in closing], False, [sources[r] for r, _ in closing])
        ends = dict(zip(closing, closed))
        spans: list[list[tuple]] = [[] for _ in conversations]
        for (row, i), prompt in zip(requests, prompts):
            end = ends.get((row, i), texts[row])
            spans[row].append(self._span(texts[row], prompt, end, conversations[row][i]["content"], sources[row], i))
            if spans[row][-1][1] == spans[row][-1][2] and not self.warned_no_marker:
                self.warned_no_marker = True
                logger.warning("%s: the template writes nothing after the answer; the model will not learn to stop",
                               sources[row])
        return texts, spans

    @staticmethod
    def _span(text: str, prompt: str, end: str, content: str, source: str, turn: int) -> tuple[int, int, int | None]:
        if not (text.startswith(prompt) and text.startswith(end) and len(end) >= len(prompt)):
            bad = prompt if not text.startswith(prompt) else end
            at = _common_prefix(text, bad)
            raise TemplateError(
                f"{source}: the chat template does not render prefixes stably (assistant turn {turn}): the "
                f"rendering of the turns before it differs from the full conversation at character {at}: "
                f"{bad[max(0, at - 40) : at + 40]!r} vs {text[max(0, at - 40) : at + 40]!r}"
            )
        start = len(prompt)
        body = text[start : len(end)].rstrip()
        found = content if content and content in body else content.strip()
        position = body.find(found) if found else 0
        content_end = start + position + len(found) if position >= 0 else None
        return start, start + len(body), content_end

    # -- tokens --------------------------------------------------------------------------------

    def encode(self, texts: list[str]):
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def needs_bos(self, text: str) -> bool:
        return self.auto_bos and not text.startswith(self.bos_text)

    def finish(self, text: str, encoding, spans: list[tuple]) -> EncodedExample | Dropped:
        ids = encoding.ids
        labels = [IGNORE_INDEX] * len(ids)
        ranges = []
        for start, end, content_end in spans:
            first, stop = _first_token_from(encoding, start, text, ids), _first_token_from(encoding, end, text, ids)
            if stop <= first:
                continue
            marker = _first_token_from(encoding, content_end, text, ids) if content_end is not None else stop - 1
            labels[first:stop] = ids[first:stop]
            ranges.append((first, stop, min(max(marker, first), stop)))
        if self.needs_bos(text):
            ids, labels = [self.bos_id, *ids], [IGNORE_INDEX, *labels]
            ranges = [(a + 1, b + 1, m + 1) for a, b, m in ranges]
        if not ranges:
            return Dropped("no_loss_tokens", len(ids))
        if len(ids) <= self.options.max_length:
            return EncodedExample(ids, labels)
        if self.options.truncation == "drop":
            return Dropped("too_long", len(ids))
        return self._truncate(ids, labels, ranges[-1])

    def _truncate(self, ids: list[int], labels: list[int], last: tuple[int, int, int]) -> EncodedExample | Dropped:
        """Keep the prompt and the answer's end marker; cut the last answer's content to fit."""
        first, stop, marker = last
        limit = self.options.max_length
        if stop <= limit:  # only non-loss tokens after the last answer overflow
            return EncodedExample(ids[:stop], labels[:stop], truncated=True)
        keep = limit - (stop - marker)
        if keep <= first:  # not one token of the answer would remain
            return Dropped("no_loss_tokens", len(ids))
        return EncodedExample(ids[:keep] + ids[marker:stop], labels[:keep] + labels[marker:stop], truncated=True)


def _first_token_from(encoding, position: int, text: str, ids: list[int]) -> int:
    """Index of the first token that starts at or after character `position`."""
    count = len(ids)
    if position >= len(text):
        return count
    token = encoding.char_to_token(position)
    if token is None:  # a character no token covers (normalised away): scan the offsets
        return next((t for t, (s, _) in enumerate(encoding.offsets) if s >= position), count)
    if encoding.token_to_chars(token)[0] < position:  # straddles the boundary: it belongs to the prompt
        token += 1
    return token
