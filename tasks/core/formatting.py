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

Tools, tool calls, tool results and reasoning (canonical rows: tasks/core/rows.py). Each is given
to the chat template when a probe shows the template renders it (`tools=` to
`apply_chat_template`, an assistant turn's `tool_calls`, `role: tool`, and `reasoning_content` /
`thinking` / `reasoning`). What the template cannot render, the fallback writes as text:

* tool definitions: appended to the system turn (after a blank line), or a system turn of their
  own: TOOLS_HEADER, one JSON object per definition a line, TOOLS_FOOTER;
* a call: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` after the assistant's text
  (one line break between them), one block per call;
* a tool result: a `tool` turn when the template renders that role (SmolLM2's does), else a user
  turn `<tool_response>\\n...\\n</tool_response>` (the plain template);
* reasoning: dropped and counted (`template.reasoning: drop`), or `<think>\\n...\\n</think>\\n\\n`
  before the answer (`inline`).

Releases ship the same rewrite as a Jinja prelude in front of the template (`released_chat_template`),
so `apply_chat_template(messages, tools=...)` on a released tokenizer renders what training did.
Loss: assistant text and calls (weight 1, or train_on); never tool results, definitions, system or
user text, nor weight-0 turns. Turns after the last turn with loss are cut.

Control tokens in the data are text. A row whose strings contain the tokenizer's special tokens
(`<|im_end|>` typed by a user, a BOS string in a tool result) is rendered a second time with each
such string replaced by a private-use marker: where the markers land is the data's. The text is
then split at the template's own special tokens only and the pieces are encoded with special
tokens read as text, so the row's special ids are exactly those the template wrote. Rows without
such strings take the ordinary one-call path, unchanged.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

from schemas.config import TemplateOptions
from tasks.core.collate import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PLAIN_SYSTEM = "{content}\n\n"
PLAIN_USER = "### Instruction:\n{content}\n\n"
PLAIN_RESPONSE = "### Response:\n"
PLAIN_SEPARATOR = "\n\n"

# The tool fallback, for templates that do not render tools themselves (see the module docstring).
TOOLS_HEADER = (
    "You can call the functions below. To call one, write <tool_call> and a JSON object with its "
    "\"name\" and \"arguments\", then </tool_call>.\n<tools>\n"
)
TOOLS_FOOTER = "\n</tools>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
# Where chat templates look for an assistant turn's reasoning (Qwen3, DeepSeek: reasoning_content;
# gpt-oss: thinking), in the order they are probed.
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
MARKER_BASE = 0xF0000  # private-use characters standing in for control-token text while probing


class TemplateError(ValueError):
    """The template cannot be used for masking (unstable prefixes, unknown role, rendering failed)."""


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX on every token without loss
    truncated: bool = False
    reasoning_dropped: int = 0  # assistant reasoning the template cannot show (template.reasoning 'drop')
    control_text: int = 0  # control-token strings in the data, encoded as plain text


@dataclass(frozen=True)
class Dropped:
    reason: Literal["too_long", "no_loss_tokens"]
    length: int  # tokens of the full rendering
    reasoning_dropped: int = 0
    control_text: int = 0


@dataclass
class Prepared:
    """One conversation as the template will see it: turns, the tools to pass to the template
    (None when the fallback wrote them into the system turn), which turns carry loss."""

    turns: list[dict]
    tools: list[dict] | None = None
    loss: list[bool] = field(default_factory=list)
    reasoning_dropped: int = 0


def load_tokenizer(folder: str | Path) -> "PreTrainedTokenizerBase":
    """The fast tokenizer saved in `folder` (offsets need a fast tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{folder}: a fast (tokenizers-backed) tokenizer is required for offset-based masks")
    return tokenizer


def encode_example(
    messages: list[dict], tokenizer, options: TemplateOptions, source: str = "<row>", tools: list[dict] | None = None
) -> EncodedExample | Dropped:
    """One conversation -> input_ids and labels (or why it was dropped)."""
    return encode_batch([messages], tokenizer, options, [source], [tools])[0]


def encode_batch(
    conversations: Sequence[list[dict]],
    tokenizer,
    options: TemplateOptions,
    sources: Sequence[str] | None = None,
    tools: Sequence[list[dict] | None] | None = None,
) -> list[EncodedExample | Dropped]:
    """Many conversations at once: batched rendering and one batched tokenizer call. `tools` holds
    each conversation's tool definitions (None or [] for none)."""
    formatter = _formatter(tokenizer, options)
    sources = list(sources) if sources is not None else [f"<row {i}>" for i in range(len(conversations))]
    tools = list(tools) if tools is not None else [None] * len(conversations)
    prepared = [formatter.prepare(messages, row_tools) for messages, row_tools in zip(conversations, tools)]
    texts, spans = formatter.plan(prepared, sources)
    encodings = formatter.encode_rendered(prepared, texts, sources, add_generation_prompt=False)
    return [
        formatter.finish(text, encoding, row_spans, row)
        for text, encoding, row_spans, row in zip(texts, encodings, spans, prepared)
    ]


def render_prompt_ids(messages: list[dict], tokenizer, options: TemplateOptions, tools: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation up to (excluding) its last assistant turn, ending with the
    generation prompt; used by the evaluate stage for generation. Same template choices, system
    prompt handling, tool rendering, control-token rule and BOS rule as training."""
    formatter = _formatter(tokenizer, options)
    row = formatter.prepare(messages, tools, cut=False)
    last = max((i for i, turn in enumerate(row.turns) if turn["role"] == "assistant"), default=len(row.turns))
    row.turns = row.turns[:last]
    text = formatter.render([row.turns], add_generation_prompt=True, sources=["<prompt>"], tools=[row.tools])[0]
    encoding = formatter.encode_rendered([row], [text], ["<prompt>"], add_generation_prompt=True)[0]
    return ([formatter.bos_id] if formatter.needs_bos(text, encoding) else []) + list(encoding.ids)


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


# --- the tool and reasoning fallback -----------------------------------------------------------


def tools_text(tools: Sequence[dict]) -> str:
    """Tool definitions as the fallback writes them into the system turn: one JSON object a line."""
    return TOOLS_HEADER + "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools) + TOOLS_FOOTER


def tool_call_text(call: dict) -> str:
    """One call as the fallback writes it in the assistant turn (Hermes/Qwen markup)."""
    function = call.get("function", call)
    payload = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return TOOL_CALL_OPEN + payload + TOOL_CALL_CLOSE


def assistant_text(content: str, tool_calls: Sequence[dict] = (), reasoning: str | None = None) -> str:
    """An assistant turn's text under the fallback: reasoning inline first (when kept), then the
    content, then each call on its own lines."""
    text = f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{content}" if reasoning else content
    for call in tool_calls:
        text += ("\n" if text else "") + tool_call_text(call)
    return text


def _jinja(text: str) -> str:
    return json.dumps(text)  # a Jinja string literal (Jinja reads Python-style escapes)


def fallback_prelude(tools_native: bool, tool_role_native: bool, inline_reasoning: bool) -> str:
    """Jinja that rewrites `messages` the way `_Formatter.prepare` does before the template proper
    runs, so a released tokenizer renders tools, calls, tool results and inline reasoning exactly
    as training did. Empty when the template renders all of them itself."""
    if tools_native and not inline_reasoning:
        return ""
    parts = ["{%- set sft = namespace(messages=[], rest=messages) -%}"]
    if not tools_native:
        parts.append(
            "{%- if tools -%}"
            f"{{%- set sft_tools = {_jinja(TOOLS_HEADER)} + (tools | map('tojson') | join('\\n')) + {_jinja(TOOLS_FOOTER)} -%}}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set sft.messages = [{'role': 'system', 'content': ((messages[0]['content'] + '\\n\\n') if messages[0]['content'] else '') + sft_tools}] -%}"
            "{%- set sft.rest = messages[1:] -%}"
            "{%- else -%}{%- set sft.messages = [{'role': 'system', 'content': sft_tools}] -%}{%- endif -%}"
            "{%- endif -%}"
        )
    parts.append("{%- for message in sft.rest -%}{%- set turn = namespace(content=(message['content'] if message['content'] is string else '')) -%}")
    parts.append("{%- if message['role'] == 'assistant' -%}")
    if inline_reasoning:
        parts.append(
            "{%- set reasoning = message['reasoning_content'] or message['thinking'] or message['reasoning'] -%}"
            f"{{%- if reasoning is string and reasoning -%}}{{%- set turn.content = {_jinja(THINK_OPEN)} + reasoning + {_jinja(THINK_CLOSE)} + turn.content -%}}{{%- endif -%}}"
        )
    if not tools_native:
        parts.append(
            "{%- for call in (message['tool_calls'] or []) -%}"
            "{%- set function = call['function'] if call['function'] is defined else call -%}"
            f"{{%- set turn.content = turn.content + ('\\n' if turn.content else '') + {_jinja(TOOL_CALL_OPEN)} "
            f"+ ({{'name': function['name'], 'arguments': function['arguments']}} | tojson) + {_jinja(TOOL_CALL_CLOSE)} -%}}"
            "{%- endfor -%}"
        )
    parts.append("{%- set sft.messages = sft.messages + [{'role': 'assistant', 'content': turn.content}] -%}")
    if not tool_role_native:
        parts.append(
            "{%- elif message['role'] == 'tool' -%}"
            f"{{%- set sft.messages = sft.messages + [{{'role': 'user', 'content': {_jinja(TOOL_RESPONSE_OPEN)} + turn.content + {_jinja(TOOL_RESPONSE_CLOSE)}}}] -%}}"
        )
    parts.append("{%- else -%}{%- set sft.messages = sft.messages + [message] -%}{%- endif -%}{%- endfor -%}")
    parts.append("{%- set messages = sft.messages -%}")
    return "".join(parts)


def released_chat_template(tokenizer, options: TemplateOptions, with_bos: bool = False) -> str:
    """The chat template a release ships: the model's (or the plain one, with the BOS training put
    in front), behind the fallback prelude when training rewrote tools or reasoning."""
    formatter = _formatter(tokenizer, options)
    body = tokenizer.chat_template if formatter.kind == "model" else ("{{ bos_token }}" if with_bos else "") + PLAIN_CHAT_TEMPLATE
    return fallback_prelude(formatter.tools_native, formatter.tool_role_native, formatter.inline_reasoning) + body


def rendering_summary(tokenizer, options: TemplateOptions) -> dict[str, str]:
    """How tools, tool results and reasoning are rendered with this template (for the reports)."""
    formatter = _formatter(tokenizer, options)
    reasoning = f"template ({formatter.reasoning_key})" if formatter.reasoning_key else options.reasoning
    return {
        "tools": "template" if formatter.tools_native else "fallback",
        "tool_results": "tool turns" if formatter.tool_role_native else "user turns (fallback)",
        "reasoning": reasoning,
    }


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


def _map_strings(value: Any, change) -> Any:
    """`value` (JSON-like) with every string, keys included, passed through `change`."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [_map_strings(item, change) for item in value]
    if isinstance(value, dict):
        return {change(key): _map_strings(item, change) for key, item in value.items()}
    return value


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)


class _Assembled:
    """An encoding put together from pieces (the control-token-safe path), with the two lookups
    `finish` needs from a tokenizers Encoding."""

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]], data_starts: set[int]):
        self.ids, self.offsets = ids, offsets
        self.starts = [start for start, _ in offsets]
        self.data_specials = len(data_starts)  # control-token strings of the data, kept as text
        self.leading_data_special = 0 in data_starts

    def char_to_token(self, position: int) -> int | None:
        token = bisect.bisect_right(self.starts, position) - 1
        while token > 0 and self.starts[token - 1] == self.starts[token]:
            token -= 1  # byte-level pieces of one character share its offsets: the first one
        if token < 0 or not self.offsets[token][0] <= position < self.offsets[token][1]:
            return None
        return token

    def token_to_chars(self, token: int) -> tuple[int, int]:
        return self.offsets[token]


PROBE_USER = {"role": "user", "content": "ping"}
PROBE_TOOL = {"type": "function", "function": {"name": "sft_probe_tool", "description": "probe", "parameters": {"type": "object", "properties": {}}}}
PROBE_CALL = {"type": "function", "function": {"name": "sft_probe_call", "arguments": {}}}


class _Formatter:
    """Template choice, system prompt handling, tool and reasoning rendering, BOS rule, control
    tokens and mask construction for one tokenizer."""

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
        self._probe_features()
        self._find_control_tokens()
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

    def _renders(self, sentinel: str, turns: list[dict], tools: list[dict] | None = None) -> bool:
        """Whether the model template renders `turns` without error and shows `sentinel`."""
        try:
            return sentinel in self._render_raw([turns], False, [tools])[0]
        except Exception:  # noqa: BLE001 - a template that cannot render the probe lacks the feature
            return False

    def _probe_features(self) -> None:
        """Which of tools, tool calls, tool turns and reasoning the template renders itself; the
        fallback (module docstring) covers the rest."""
        self.tools_native = self.tool_role_native = False
        self.reasoning_key: str | None = None
        if self.kind == "model":
            called = {"role": "assistant", "content": "", "tool_calls": [PROBE_CALL]}
            answered = [PROBE_USER, called, {"role": "tool", "content": "sft_probe_result"}, {"role": "assistant", "content": "pong"}]
            self.tools_native = self._renders("sft_probe_tool", [PROBE_USER, called], [PROBE_TOOL]) and self._renders(
                "sft_probe_call", [PROBE_USER, called], [PROBE_TOOL])
            self.tool_role_native = self._renders("sft_probe_result", answered, [PROBE_TOOL] if self.tools_native else None)
            self.reasoning_key = next(
                (key for key in REASONING_KEYS
                 if self._renders("sft_probe_thought", [PROBE_USER, {"role": "assistant", "content": "pong", key: "sft_probe_thought"}])),
                None,
            )
        self.inline_reasoning = self.reasoning_key is None and self.options.reasoning == "inline"

    def _find_control_tokens(self) -> None:
        """The tokenizer's special tokens: the strings that must stay text when the data has them.
        A second backend encodes them as text (`encode_special_tokens`)."""
        strings = sorted({token.content for token in self.backend.get_added_tokens_decoder().values() if token.special},
                         key=len, reverse=True)
        strings = [text for text in strings if text]
        self.control_re = re.compile("|".join(map(re.escape, strings))) if strings else None
        self.markers = {text: chr(MARKER_BASE + i) for i, text in enumerate(strings)}
        self.marked = {marker: text for text, marker in self.markers.items()}
        self.marker_re = re.compile("[" + "".join(self.marked) + "]") if strings else None
        self.literal_backend = None
        if strings:
            from tokenizers import Tokenizer

            self.literal_backend = Tokenizer.from_str(self.backend.to_str())
            self.literal_backend.no_truncation()
            self.literal_backend.no_padding()
            self.literal_backend.encode_special_tokens = True

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

    # -- preparing turns -----------------------------------------------------------------------

    def prepare(self, messages: Sequence[dict], tools: list[dict] | None = None, cut: bool = True) -> Prepared:
        """Apply the system prompt mode, render what the template cannot (tools, calls, tool turns,
        reasoning) with the fallback, decide which turns carry loss and (with `cut`) drop the
        turns after the last one that does."""
        flags = self._loss_flags(messages)
        pairs = [(self._turn(message), flag) for message, flag in zip(messages, flags)]
        dropped = sum(1 for m in messages if m.get("reasoning") and m["role"] == "assistant") if self._drops_reasoning() else 0
        mode = self.options.system_prompt_mode
        if mode != "default":
            pairs = [(turn, flag) for turn, flag in pairs if turn["role"] != "system"]
            if mode == "custom":
                pairs.insert(0, ({"role": "system", "content": self.options.system_prompt}, False))
            elif self.empty_system:
                pairs.insert(0, ({"role": "system", "content": ""}, False))
        tools = tools or None
        if tools and not self.tools_native:
            pairs = self._tools_in_system(pairs, tools)
            tools = None
        last = max((i for i, (_, flag) in enumerate(pairs) if flag), default=None)
        if cut and last is not None:
            pairs = pairs[: last + 1]
        return Prepared([turn for turn, _ in pairs], tools, [flag for _, flag in pairs], dropped)

    def _drops_reasoning(self) -> bool:
        return self.reasoning_key is None and not self.inline_reasoning

    def _loss_flags(self, messages: Sequence[dict]) -> list[bool]:
        """Per turn: does it carry loss. A turn's own weight (0/1) wins; otherwise train_on."""
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        every = self.options.train_on == "all_assistant"
        return [
            m["role"] == "assistant" and (bool(m["weight"]) if m.get("weight") is not None else (every or i == last))
            for i, m in enumerate(messages)
        ]

    def _turn(self, message: dict) -> dict:
        """One canonical message as the template gets it."""
        role, content = message["role"], message["content"]
        if role == "assistant":
            reasoning, calls = message.get("reasoning"), message.get("tool_calls") or []
            turn = {"role": role, "content": content}
            if reasoning and self.reasoning_key:
                turn[self.reasoning_key] = reasoning
            if calls and self.tools_native:
                turn["tool_calls"] = calls
            inline = reasoning if self.inline_reasoning else None
            turn["content"] = assistant_text(content, [] if self.tools_native else calls, inline)
            return turn
        if role == "tool" and not self.tool_role_native:
            return {"role": "user", "content": TOOL_RESPONSE_OPEN + content + TOOL_RESPONSE_CLOSE}
        if role == "tool":
            return {key: message[key] for key in ("role", "content", "tool_call_id", "name") if key in message}
        return {"role": role, "content": content}

    @staticmethod
    def _tools_in_system(pairs: list[tuple[dict, bool]], tools: list[dict]) -> list[tuple[dict, bool]]:
        text = tools_text(tools)
        if pairs and pairs[0][0]["role"] == "system":
            first = pairs[0][0]["content"]
            return [({"role": "system", "content": (first + "\n\n" if first else "") + text}, False), *pairs[1:]]
        return [({"role": "system", "content": text}, False), *pairs]

    # -- rendering -----------------------------------------------------------------------------

    def _render_raw(self, conversations: list[list[dict]], add_generation_prompt: bool, tools: Sequence | None = None) -> list[str]:
        if self.kind == "plain":
            return [render_plain(turns, add_generation_prompt, self.eos) for turns in conversations]
        if not conversations:
            return []
        tools = list(tools) if tools is not None else [None] * len(conversations)
        bare = [i for i, row_tools in enumerate(tools) if not row_tools]
        texts: list[str] = [""] * len(conversations)
        if bare:  # one batched call for the rows without tools
            rendered = self.tokenizer.apply_chat_template(
                [conversations[i] for i in bare], tokenize=False, add_generation_prompt=add_generation_prompt
            )
            for i, text in zip(bare, rendered):
                texts[i] = text
        for i, row_tools in enumerate(tools):
            if row_tools:
                texts[i] = self.tokenizer.apply_chat_template(
                    conversations[i], tools=row_tools, tokenize=False, add_generation_prompt=add_generation_prompt
                )
        return texts

    def render(
        self, conversations: list[list[dict]], add_generation_prompt: bool, sources: Sequence[str], tools: Sequence | None = None
    ) -> list[str]:
        """Render many conversations; a failure names the row that caused it."""
        tools = list(tools) if tools is not None else [None] * len(conversations)
        for turns, source in zip(conversations, sources):
            if not turns and self.kind == "model":
                raise TemplateError(f"{source}: nothing to render before the first assistant turn")
        try:
            texts = self._render_raw(conversations, add_generation_prompt, tools)
        except Exception as batch_error:  # noqa: BLE001 - find and name the row, then re-raise
            for turns, row_tools, source in zip(conversations, tools, sources):
                try:
                    self._render_raw([turns], add_generation_prompt, [row_tools])
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

    def plan(self, rows: list[Prepared], sources: Sequence[str]) -> tuple[list[str], list[list[tuple]]]:
        """Full texts and, per row, the character spans (start, end, content_end) that carry loss."""
        texts = self.render([row.turns for row in rows], False, sources, [row.tools for row in rows])
        requests = [(r, i) for r, row in enumerate(rows) for i, flag in enumerate(row.loss) if flag]
        prompts = self.render(
            [rows[r].turns[:i] for r, i in requests], True, [sources[r] for r, _ in requests], [rows[r].tools for r, _ in requests]
        )
        closing = [(r, i) for r, i in requests if i != len(rows[r].turns) - 1]
        closed = self.render(
            [rows[r].turns[: i + 1] for r, i in closing], False, [sources[r] for r, _ in closing], [rows[r].tools for r, _ in closing]
        )
        ends = dict(zip(closing, closed))
        spans: list[list[tuple]] = [[] for _ in rows]
        for (r, i), prompt in zip(requests, prompts):
            end = ends.get((r, i), texts[r])
            spans[r].append(self._span(texts[r], prompt, end, rows[r].turns[i]["content"], sources[r], i))
            if spans[r][-1][1] == spans[r][-1][2] and not self.warned_no_marker:
                self.warned_no_marker = True
                logger.warning("%s: the template writes nothing after the answer; the model will not learn to stop",
                               sources[r])
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

    def encode_rendered(self, rows: list[Prepared], texts: list[str], sources: Sequence[str], add_generation_prompt: bool) -> list:
        """Encodings of rendered conversations. Special tokens count only where the template wrote
        them: a row whose data contains control-token text (`<|im_end|>` typed by a user, a BOS
        string in a tool result) takes `_literal_encoding`, where that text stays text."""
        encodings = self.encode(texts)
        if self.control_re is None:
            return encodings
        for i, row in enumerate(rows):
            if any(self.control_re.search(text) for text in _strings([row.turns, row.tools])):
                encodings[i] = self._literal_encoding(row, texts[i], sources[i], add_generation_prompt)
        return encodings

    def _literal_encoding(self, row: Prepared, text: str, source: str, add_generation_prompt: bool) -> _Assembled:
        """Render the row again with each control-token string of its data replaced by a private-use
        marker: the markers show where the data's control text lies in `text`. Split `text` at the
        template's own special tokens only and encode the pieces with special tokens read as text."""
        defuse = lambda value: self.control_re.sub(lambda m: self.markers[m.group()], value)  # noqa: E731
        turns = [{key: (value if key == "role" else _map_strings(value, defuse)) for key, value in turn.items()} for turn in row.turns]
        marked = self.render([turns], add_generation_prompt, [source], [_map_strings(row.tools, defuse) if row.tools else None])[0]
        data_starts, pieces, cursor, previous = set(), [], 0, 0
        for match in self.marker_re.finditer(marked):
            pieces.append(marked[previous : match.start()])
            cursor += match.start() - previous
            data_starts.add(cursor)
            pieces.append(self.marked[match.group()])
            cursor += len(pieces[-1])
            previous = match.end()
        pieces.append(marked[previous:])
        if "".join(pieces) != text:
            raise TemplateError(
                f"{source}: the data contains control-token text and the chat template changes it, so it cannot be kept "
                "apart from the template's own control tokens; remove it from the data"
            )
        return self._encode_around(text, data_starts)

    def _encode_around(self, text: str, data_starts: set[int]) -> _Assembled:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pieces, specials, position = [], [], 0
        for match in self.control_re.finditer(text):
            if match.start() in data_starts:
                continue
            pieces.append((position, text[position : match.start()]))
            specials.append(match)
            position = match.end()
        pieces.append((position, text[position:]))
        encoded = self.literal_backend.encode_batch([piece for _, piece in pieces], add_special_tokens=False)
        for index, ((start, _), encoding) in enumerate(zip(pieces, encoded)):
            ids += encoding.ids
            offsets += [(start + a, start + b) for a, b in encoding.offsets]
            if index < len(specials):
                special = specials[index]
                ids.append(self.backend.token_to_id(special.group()))
                offsets.append(special.span())
        return _Assembled(ids, offsets, data_starts)

    def needs_bos(self, text: str, encoding=None) -> bool:
        template_bos = text.startswith(self.bos_text) and not getattr(encoding, "leading_data_special", False)
        return self.auto_bos and not template_bos

    def finish(self, text: str, encoding, spans: list[tuple], row: Prepared | None = None) -> EncodedExample | Dropped:
        result = self._finish(text, encoding, spans)
        notes = {"reasoning_dropped": row.reasoning_dropped if row else 0, "control_text": getattr(encoding, "data_specials", 0)}
        return dataclasses.replace(result, **notes) if any(notes.values()) else result

    def _finish(self, text: str, encoding, spans: list[tuple]) -> EncodedExample | Dropped:
        ids = list(encoding.ids)
        labels = [IGNORE_INDEX] * len(ids)
        ranges = []
        for start, end, content_end in spans:
            first, stop = _first_token_from(encoding, start, text, ids), _first_token_from(encoding, end, text, ids)
            if stop <= first:
                continue
            marker = _first_token_from(encoding, content_end, text, ids) if content_end is not None else stop - 1
            labels[first:stop] = ids[first:stop]
            ranges.append((first, stop, min(max(marker, first), stop)))
        if self.needs_bos(text, encoding):
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
