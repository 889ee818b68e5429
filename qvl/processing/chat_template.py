"""A checkpoint's own Jinja chat template, found and rendered as transformers renders it.

Where the template comes from, first found wins (transformers' order): ``chat_template.jinja``,
``chat_template.json`` (``{"chat_template": "..."}``), then ``tokenizer_config.json``'s ``"chat_template"``
(a string, or a list of ``{"name": ..., "template": ...}``, ``"default"`` being the one used). Named templates
may also lie in ``additional_chat_templates/<name>.jinja``; as in transformers they join
``chat_template.jinja``'s default, and replace ``tokenizer_config.json``'s templates. Only those fixed names
are read, inside the checkpoint folder, each with a size limit.

Rendering matches transformers 5.24's ``render_jinja_template``: a sandboxed
``jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML, the globals ``raise_exception``,
``strftime_now``, ``dict`` and a ``namespace`` that refuses underscore names. The template sees
``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the tokenizer's named special tokens
(``bos_token``, ``eos_token``, ...) and any extra keyword arguments. Everything it sees is rebuilt from
plain JSON types first: keys whose value is None are dropped from messages, and objects such as images
become the inert text ``"<Image>"`` (their type name), so a template can test for media but never call them.
A message's reasoning is also given under the names templates read (``reasoning_content``, ``thinking``).

Two options of transformers' ``apply_chat_template`` are here: ``{% generation %}...{% endgeneration %}`` blocks
(transformers' AssistantTracker) render their body unchanged, and `render_with_generation_spans` also says
where each landed in the text, which `tokens_in_spans` turns into ``return_assistant_tokens_mask``'s mask;
``continue_final_message`` (`render_continuing`) ends the text right after the final message's text.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import re
from collections.abc import Callable, Container, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import numpy as np

from ..errors import CheckpointError, InputError
from ..safetensors_check import checkpoint_file
from .files import MAX_CONFIG_BYTES, read_json_object, read_text

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON_FILE = "chat_template.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_DIR = "additional_chat_templates"  # <name>.jinja files: named templates (transformers' layout)
TEMPLATE_SUFFIX = ".jinja"
MAX_TEMPLATE_BYTES = 1 << 20  # the largest published templates are tens of KiB
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a template may read (eos_token, ...)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The names a message's reasoning comes under; templates read the first (and gpt-oss ones "thinking").
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# What transformers appends to the text to continue, to find where it ends in the rendered chat.
CONTINUE_MARK = "CONTINUE_FINAL_MESSAGE_TAG "
# transformers' test for a template with generation blocks.
GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")


class ChatTemplateError(InputError):
    """A chat template refused its input (``raise_exception``) or could not be compiled or rendered."""


def _jinja():
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    return jinja2


def _raise_exception(message):
    raise ChatTemplateError(f"the chat template refused the input: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` for templates without exposing the type itself (no attribute tricks through it)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _namespace_class():
    jinja2 = _jinja()

    class TemplateNamespace(jinja2.utils.Namespace):
        """jinja2's namespace refusing underscore-prefixed names, which lead to CPython internals."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    return TemplateNamespace


@dataclasses.dataclass
class _Tracking:
    """One render's record of its generation blocks: `rendered` characters yielded so far, then each block's
    (start, end) in the text."""

    rendered: int = 0
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)


# The render being tracked, if any: per context, so the cached compiled templates stay shareable across threads.
_TRACKING: ContextVar[_Tracking | None] = ContextVar("qvl_chat_template_tracking", default=None)


@lru_cache(maxsize=1)
def _generation_tag() -> type:
    """The ``{% generation %}...{% endgeneration %}`` extension (transformers' AssistantTracker, same behaviour):
    the body renders unchanged; during a tracked render its (start, end) is recorded, start being the length of
    the text the template has yielded so far."""
    jinja2 = _jinja()

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

        def _record(self, caller):
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                tracking.spans.append((tracking.rendered, tracking.rendered + len(text)))
            return text

    return GenerationTag


@lru_cache(maxsize=32)
def compile_template(source: str):
    """The compiled template for `source` (cached: one compile per distinct template text)."""
    jinja2 = _jinja()
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_generation_tag(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _namespace_class()
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e.message} (template line {e.lineno})") from None


def plain_data(value: Any) -> Any:
    """`value` rebuilt from JSON types; anything else becomes ``"<TypeName>"`` (what the template sees)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Mapping], what: str = "messages") -> list[dict]:
    """Messages as plain dicts with the None-valued keys dropped and a message's reasoning also under
    ``thinking`` and ``reasoning_content`` (as transformers prepares them for rendering)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError(f"{what} must be a list of message dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"{what}[{i}] must be a dict like {{'role': ..., 'content': ...}}, got {message!r}")
        message = plain_data({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
        if reasoning is not None:  # transformers' key order: a template iterating the message sees the same
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_continuing(render_messages: Callable[[list], str], messages: Sequence, continue_final_message: bool | str,
                      add_generation_prompt: bool, reads: Container[str]) -> str:
    """`render_messages(messages)`; with `continue_final_message` (True: the final message's ``content``; a string:
    that field, e.g. ``"reasoning_content"``) the text ends right after that field's text, so that a model continues
    it. transformers' rule: the text (for a list of content items, the last item with a ``"text"``) is rendered
    with `CONTINUE_MARK` appended, and the output cut where the mark's last occurrence begins (trailing whitespace
    before it dropped when the template trimmed the mark's own). `reads` tells whether the template reads a field:
    its source text (read when the name appears in it, transformers' test) or a collection of field names."""
    if not continue_final_message:
        return render_messages(list(messages))
    if add_generation_prompt:
        raise InputError("continue_final_message and add_generation_prompt cannot be combined: the first extends the "
                         "final message, the second starts a new assistant message")
    field = continue_final_message if isinstance(continue_final_message, str) else "content"
    if not messages:
        raise InputError("continue_final_message is set but the conversation is empty")
    last = messages[-1]
    if not isinstance(last, Mapping):
        raise InputError(f"messages[{len(messages) - 1}] must be a dict like {{'role': ..., 'content': ...}}, "
                         f"got {last!r:.80}")
    final = last.get(field)
    if final is None:
        raise InputError(f"continue_final_message: the final message has no {field!r} to continue")
    fields = [field]
    if field in REASONING_FIELDS:  # the reasoning is under several names: mark each, whichever the template reads
        fields = [f for f in REASONING_FIELDS if last.get(f) == final]
    if not any(f in reads for f in fields):
        raise ChatTemplateError(f"continue_final_message: the chat template does not read the final message's "
                                f"{field!r}, so it cannot end there")
    last = dict(last)
    if isinstance(final, (list, tuple)):
        items = list(final)
        at = next((i for i in reversed(range(len(items))) if isinstance(items[i], Mapping) and "text" in items[i]),
                  None)
        if at is None:
            raise InputError(f"continue_final_message: the final message's {field!r} has no text item to continue")
        final = items[at]["text"]
        items[at] = {**items[at], "text": _continuable(final, field) + CONTINUE_MARK}
        marked = {f: items for f in fields}
    else:
        marked = {f: _continuable(final, field) + CONTINUE_MARK for f in fields}
    rendered = render_messages([*messages[:-1], {**last, **marked}])
    mark = CONTINUE_MARK.strip()
    if final.strip() not in rendered or mark not in rendered:
        raise ChatTemplateError(f"continue_final_message: the final message's text {final.strip()!r:.80} does not "
                                "appear in the rendered chat; the chat template changes or drops it")
    at = rendered.rindex(mark)
    return rendered[:at] if rendered.startswith(CONTINUE_MARK, at) else rendered[:at].rstrip()


def _continuable(text: Any, field: str) -> str:
    if not isinstance(text, str):
        raise InputError(f"continue_final_message: the final message's {field!r} must be text or a list of content "
                         f"items, got {type(text).__name__}")
    return text


def render(source: str, messages: Sequence[Mapping], *, add_generation_prompt: bool = False,
           continue_final_message: bool | str = False, tools: Sequence[Mapping] | None = None,
           documents: Sequence[Mapping] | None = None, special_tokens: Mapping[str, str] | None = None,
           **template_kwargs: Any) -> str:
    """One conversation through the template `source`. `template_kwargs` override `special_tokens`.

    `tools` are JSON schemas (dicts; transformers also turns Python functions into schemas, qvl does not).
    `continue_final_message`: see `render_continuing`.
    """
    return _render(source, messages, add_generation_prompt, continue_final_message, False, tools, documents,
                   special_tokens, template_kwargs)[0]


def render_with_generation_spans(source: str, messages: Sequence[Mapping], *, add_generation_prompt: bool = False,
                                 tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
                                 special_tokens: Mapping[str, str] | None = None,
                                 **template_kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """`render`, and the (start, end) characters of the text each ``{% generation %}`` block rendered, in the order
    the blocks ended (transformers' generation indices, for ``return_assistant_tokens_mask``).

    A template without such blocks is refused (`ChatTemplateError`): its mask would be all zeros, which transformers
    returns after a warning."""
    if not GENERATION_TAG.search(source):
        raise ChatTemplateError("return_assistant_tokens_mask needs a chat template with {% generation %} blocks "
                                "around the assistant's text; this template has none")
    return _render(source, messages, add_generation_prompt, False, True, tools, documents, special_tokens,
                   template_kwargs)


def _render(source, messages, add_generation_prompt, continue_final_message, track, tools, documents,
            special_tokens, template_kwargs) -> tuple[str, list[tuple[int, int]]]:
    """`render`'s work; with `track`, also the spans of the generation blocks."""
    jinja2 = _jinja()
    if tools is not None:
        bad = [i for i, t in enumerate(tools) if not isinstance(t, Mapping)]
        if bad:
            raise InputError(f"tools[{bad[0]}] must be a JSON schema dict, got {type(tools[bad[0]]).__name__}")
    if documents is not None:
        bad = [i for i, d in enumerate(documents) if not isinstance(d, Mapping)]
        if bad:
            raise InputError(f"documents[{bad[0]}] must be a dict (e.g. title and text), got "
                             f"{type(documents[bad[0]]).__name__}")
    template = compile_template(source)
    context = dict(tools=plain_data(list(tools) if tools is not None else None),
                   documents=plain_data(list(documents) if documents is not None else None),
                   add_generation_prompt=add_generation_prompt,
                   **plain_data({**(special_tokens or {}), **template_kwargs}))
    tracking = _Tracking() if track else None

    def render_messages(chat: list[dict]) -> str:
        if tracking is None:
            return template.render(messages=chat, **context)
        parts = []
        token = _TRACKING.set(tracking)
        try:  # the chunks as the template yields them, counted: a generation block starts where they end
            for chunk in template.generate(messages=chat, **context):
                parts.append(chunk)
                tracking.rendered += len(chunk)
        finally:
            _TRACKING.reset(token)
        return "".join(parts)

    try:
        text = render_continuing(render_messages, normalize_messages(messages), continue_final_message,
                                 add_generation_prompt, reads=source)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:  # reaching for unsafe attributes or mutating its input
        raise _security_error()(f"the chat template did what the sandbox forbids: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed to render: {e}") from None
    return text, (tracking.spans if tracking is not None else [])


def tokens_in_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters (start, end) overlap one of `spans`, else 0: transformers' assistant mask
    from the tokens' offsets and the generation spans (a zero-width token counts only strictly inside a span;
    nested spans count as their union)."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    ends = [end for _, end in merged]
    mask = []
    for start, end in offsets:
        i = bisect.bisect_right(ends, start)  # the first span ending after the token starts
        mask.append(int(i < len(merged) and merged[i][0] < end))
    return mask


@lru_cache(maxsize=1)
def _security_error() -> type:
    """The sandbox's refusal as both a qvl error (one CLI line, exit 2) and jinja2's SecurityError."""
    jinja2 = _jinja()

    class ChatTemplateSecurityError(ChatTemplateError, jinja2.exceptions.SecurityError):
        """A chat template reached for something jinja2's sandbox forbids."""

    return ChatTemplateSecurityError


# --- finding the template -----------------------------------------------------------------------------------------


def _templates_from_field(value: Any, path: str) -> dict[str, str]:
    """A ``chat_template`` field: a string, or a list of ``{"name", "template"}`` -> {name: template}."""
    field = f'{path}: "chat_template"'
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        out = {}
        for i, entry in enumerate(value):
            if (not isinstance(entry, dict) or not isinstance(entry.get("name"), str)
                    or not isinstance(entry.get("template"), str)):
                raise CheckpointError(f'{field}[{i}] must be {{"name": str, "template": str}}, got {entry!r:.80}')
            out[entry["name"]] = entry["template"]
        if not out:
            raise CheckpointError(f"{field} is an empty list")
        return out
    raise CheckpointError(f"{field} must be a string or a list of named templates, got {type(value).__name__}")


def _additional_templates(directory: str) -> dict[str, str]:
    """{name: template} of ``additional_chat_templates/<name>.jinja``, the files directly in that folder whose
    name ends in ``.jinja`` (others are ignored, as transformers ignores them). Each must be a regular file that
    stays inside the checkpoint (a huggingface_hub snapshot's links into its blobs do), within
    MAX_TEMPLATE_BYTES; anything else is refused with `CheckpointError` naming it."""
    folder = os.path.join(directory, TEMPLATE_DIR)
    if not os.path.lexists(folder):
        return {}
    checkpoint_file(directory, TEMPLATE_DIR, source=directory)  # a link to a folder elsewhere is refused
    if not os.path.isdir(folder):
        return {}  # a file of that name: not transformers' folder, ignored as it does
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot list it: {e.strerror or e}") from None
    templates = {}
    for name in names:
        if not name.endswith(TEMPLATE_SUFFIX):
            continue
        path = checkpoint_file(directory, os.path.join(TEMPLATE_DIR, name), source=directory)
        if name == TEMPLATE_SUFFIX:
            raise CheckpointError(f"{path}: a template file needs a name before {TEMPLATE_SUFFIX}")
        text = read_text(path, MAX_TEMPLATE_BYTES)  # refuses a directory, a FIFO, an oversized or non-UTF-8 file
        if text is not None:
            templates[name.removesuffix(TEMPLATE_SUFFIX)] = text
    return templates


def find_chat_templates(directory: str | os.PathLike) -> tuple[dict[str, str], str | None]:
    """({name: template}, the file (or folder) they came from) for a checkpoint folder; ({}, None) when it has none.

    ``additional_chat_templates/`` joins ``chat_template.jinja`` (its ``default.jinja`` may not, the two would both be
    the default: transformers' tokenizer and processor pick differently) and, without that file, replaces
    ``tokenizer_config.json``'s templates, as transformers' tokenizer does; beside ``chat_template.json`` it is
    refused, as transformers' processor refuses it."""
    directory = os.fspath(directory)
    named = _additional_templates(directory)
    path = os.path.join(directory, TEMPLATE_FILE)
    text = read_text(path, MAX_TEMPLATE_BYTES)
    if text is not None:
        if "default" in named:
            raise CheckpointError(f"{path} and {os.path.join(directory, TEMPLATE_DIR, 'default.jinja')} are both the "
                                  "default chat template: keep one")
        return {"default": text, **named}, path
    if named:
        legacy = os.path.join(directory, TEMPLATE_JSON_FILE)
        if os.path.lexists(legacy):
            raise CheckpointError(f"{legacy} cannot be combined with {os.path.join(directory, TEMPLATE_DIR)}: move "
                                  f"its template to {TEMPLATE_FILE}")
        return named, os.path.join(directory, TEMPLATE_DIR)
    for name, limit in ((TEMPLATE_JSON_FILE, MAX_TEMPLATE_BYTES), (TOKENIZER_CONFIG_FILE, MAX_CONFIG_BYTES)):
        path = os.path.join(directory, name)
        data = read_json_object(path, limit)
        if data is None:
            continue
        if name == TEMPLATE_JSON_FILE and "chat_template" not in data:
            raise CheckpointError(f'{path} has no "chat_template" field')
        if data.get("chat_template") is not None:
            return _templates_from_field(data["chat_template"], path), path
    return {}, None


def special_tokens_from_config(directory: str | os.PathLike) -> dict[str, str]:
    """The named special tokens of ``tokenizer_config.json`` (strings, or AddedToken dicts' ``content``)."""
    path = os.path.join(os.fspath(directory), TOKENIZER_CONFIG_FILE)
    data = read_json_object(path) or {}
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = data.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str):
            raise CheckpointError(f'{path}: "{name}" must be a string or {{"content": str, ...}}, got {value!r:.80}')
        out[name] = value
    return out


def select_template(templates: Mapping[str, str], chat_template: str | None = None,
                    tools: Sequence | None = None) -> str | None:
    """transformers' choice: a named template, else `chat_template` itself (a template text), else
    ``tool_use`` when tools are given and present, else ``default``; None when there is no template."""
    if chat_template is not None:
        return templates.get(chat_template, chat_template)
    if not templates:
        return None
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise CheckpointError(f"the checkpoint has several chat templates and none is named 'default': pass "
                     f"chat_template= one of {sorted(templates)}")


__all__ = ["ChatTemplateError", "compile_template", "render", "render_with_generation_spans", "render_continuing",
           "tokens_in_spans", "find_chat_templates", "special_tokens_from_config", "select_template", "plain_data",
           "normalize_messages", "SPECIAL_TOKEN_NAMES", "REASONING_FIELDS", "CONTINUE_MARK", "TEMPLATE_DIR"]
