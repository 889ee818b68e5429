"""A checkpoint's own Jinja chat template, found and rendered as transformers renders it.

Where the template comes from, first found wins (transformers' order): ``chat_template.jinja``,
``chat_template.json`` (``{"chat_template": "..."}``), then ``tokenizer_config.json``'s ``"chat_template"``
(a string, or a list of ``{"name": ..., "template": ...}``, ``"default"`` being the one used). Only those fixed
names are read, directly in the checkpoint folder, each with a size limit.

Rendering matches transformers 5.24's ``render_jinja_template``: a sandboxed
``jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML, the globals ``raise_exception``,
``strftime_now``, ``dict`` and a ``namespace`` that refuses underscore names. The template sees
``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the tokenizer's named special tokens
(``bos_token``, ``eos_token``, ...) and any extra keyword arguments. Everything it sees is rebuilt from
plain JSON types first: keys whose value is None are dropped from messages, and objects such as images
become the inert text ``"<Image>"`` (their type name), so a template can test for media but never call them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import numpy as np

from ..errors import CheckpointError, InputError
from .files import MAX_CONFIG_BYTES, read_json_object, read_text

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON_FILE = "chat_template.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MAX_TEMPLATE_BYTES = 1 << 20  # the largest published templates are tens of KiB
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a template may read (eos_token, ...)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


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


@lru_cache(maxsize=32)
def compile_template(source: str):
    """The compiled template for `source` (cached: one compile per distinct template text)."""
    jinja2 = _jinja()
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
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
    """Messages as plain dicts with the None-valued keys dropped (as transformers does before rendering)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError(f"{what} must be a list of message dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"{what}[{i}] must be a dict like {{'role': ..., 'content': ...}}, got {message!r}")
        out.append(plain_data({k: v for k, v in message.items() if v is not None}))
    return out


def render(source: str, messages: Sequence[Mapping], *, add_generation_prompt: bool = False,
           tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
           special_tokens: Mapping[str, str] | None = None, **template_kwargs: Any) -> str:
    """One conversation through the template `source`. `template_kwargs` override `special_tokens`.

    `tools` are JSON schemas (dicts; transformers also turns Python functions into schemas, qvl does not).
    """
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
    variables = {**(special_tokens or {}), **template_kwargs}
    try:
        return compile_template(source).render(
            messages=normalize_messages(messages), tools=plain_data(list(tools) if tools is not None else None),
            documents=plain_data(list(documents) if documents is not None else None),
            add_generation_prompt=add_generation_prompt, **plain_data(variables))
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:  # reaching for unsafe attributes or mutating its input
        raise _security_error()(f"the chat template did what the sandbox forbids: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed to render: {e}") from None


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


def find_chat_templates(directory: str | os.PathLike) -> tuple[dict[str, str], str | None]:
    """({name: template}, the file it came from) for a checkpoint folder; ({}, None) when it has none."""
    directory = os.fspath(directory)
    path = os.path.join(directory, TEMPLATE_FILE)
    text = read_text(path, MAX_TEMPLATE_BYTES)
    if text is not None:
        return {"default": text}, path
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


__all__ = ["ChatTemplateError", "compile_template", "render", "find_chat_templates", "special_tokens_from_config",
           "select_template", "plain_data", "normalize_messages", "SPECIAL_TOKEN_NAMES"]
