"""The checkpoint's own chat template, rendered as transformers renders it from the same folder.

Each folder holds the tokenizer.json built by the helpers, a tokenizer_config.json with named special tokens,
and a template; transformers' tokenizer and processor load or get the same and are the reference for the
rendered text and the ids. The templates: the published Qwen2.5-VL one and a ChatML variant that uses what
transformers gives templates (tools through ``tojson``, loop controls, ``raise_exception``, ``namespace``,
``eos_token``, documents, an extra variable).
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import pytest
import torch

from qvl.config import PRESETS
from qvl.processing import ChatTemplateError, Processor, QwenTokenizer
from qvl.processing.chat_template import compile_template, find_chat_templates
from tests.processing.helpers import QWEN25VL_CHAT_TEMPLATE, textured, write_tokenizer

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")
TINY = PRESETS["tiny"]
BOUNDS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 24}
SPECIAL = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}

# A non-Qwen template: its own system prompt, tools as JSON, loop controls, a role check, a namespace counter.
CHATML_TOOLS_TEMPLATE = """{%- set ns = namespace(turns=0) -%}
{%- if messages[0].role == 'system' -%}
<|im_start|>system
{{ messages[0].content }}
{%- else -%}
<|im_start|>system
You are Tiny, a terse assistant.
{%- endif %}
{%- if tools %}

# Tools
{% for tool in tools %}
{{ tool | tojson(indent=2, sort_keys=True) }}
{% endfor %}
{%- endif %}
{%- if documents %}
{% for doc in documents %}[{{ loop.index }}] {{ doc.title }}: {{ doc.text }}
{% endfor %}
{%- endif %}
{%- if style is defined %} Style: {{ style }}.{% endif %}
<|im_end|>
{% for message in messages %}
{%- if loop.first and message.role == 'system' %}{% continue %}{% endif %}
{%- if message.role not in ['user', 'assistant', 'tool'] %}
{{- raise_exception('unknown role ' ~ message.role) }}
{%- endif %}
{%- if message.role == 'tool' and loop.index > 6 %}{% break %}{% endif %}
{%- set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message.role }} #{{ ns.turns }}
{% if message.content is string %}{{ message.content }}{% else %}
{%- for part in message.content %}{% if part.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>
{%- elif part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}{% endif %}
{%- if message.tool_calls %}{% for call in message.tool_calls %}
<tool_call>{{ call | tojson }}</tool_call>{% endfor %}{% endif %}
{{ eos_token }}
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TEMPLATES = {"qwen25vl": QWEN25VL_CHAT_TEMPLATE, "chatml_tools": CHATML_TOOLS_TEMPLATE}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, é→ü",
                                           "parameters": {"type": "object", "required": ["city"],
                                                          "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = {
    "text": [{"role": "user", "content": "Hello world! 12345 + 678"}],
    "system_and_images": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this? café 你好"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And here: "}, {"type": "image"}]},
    ],
    "tool_calls": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C, <sunny> & dry"},
    ],
    "long_ends_at_a_late_tool_turn": [  # the template's {% break %}: turns after a 7th-message tool result drop
        *[{"role": r, "content": f"turn {i}"} for i, r in enumerate(["user", "assistant"] * 3)],
        {"role": "tool", "content": "late result"}, {"role": "user", "content": "never rendered by chatml_tools"},
    ],
}


def checkpoint(directory, template=None, where="chat_template.jinja", special=SPECIAL):
    write_tokenizer(directory, TINY)
    config = {k: v for k, v in special.items()}
    if where == "tokenizer_config.json" and template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if where == "chat_template.jinja" and template is not None:
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    if where == "chat_template.json" and template is not None:
        (directory / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return directory


def hf_tokenizer_from(directory):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


@pytest.fixture(scope="module", params=list(TEMPLATES))
def folder(request, tmp_path_factory):
    return request.param, checkpoint(tmp_path_factory.mktemp(request.param), TEMPLATES[request.param])


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_tokenizer_renders_and_tokenizes_as_transformers(folder, name, add_generation_prompt):
    _, directory = folder
    ours, ref = QwenTokenizer.from_file(directory), hf_tokenizer_from(directory)
    extra = {"tools": TOOLS, "documents": [{"title": "Doc", "text": "x < y"}], "style": "brief"}
    for kwargs in ({}, extra):
        messages = CONVERSATIONS[name]
        want = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
        assert ours.apply_chat_template(messages, add_generation_prompt, **kwargs) == want
        want_ids = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                           return_dict=False, **kwargs)
        assert ours.apply_chat_template(messages, add_generation_prompt, tokenize=True, **kwargs) == want_ids


def test_defaults_and_batches_follow_transformers(folder):
    _, directory = folder
    ours, ref = QwenTokenizer.from_file(directory), hf_tokenizer_from(directory)
    batch = [CONVERSATIONS["text"], CONVERSATIONS["tool_calls"]]
    assert ours.apply_chat_template(batch) == ref.apply_chat_template(batch, tokenize=False)  # no generation prompt
    assert ours.apply_chat_template(batch, tokenize=True) == ref.apply_chat_template(batch, return_dict=False)


def test_processor_apply_chat_template_matches_transformers(folder):
    """tokenize=True gives the model inputs, as transformers' processor does with return_dict=True."""
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    name, directory = folder

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    ref = ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(**BOUNDS), tokenizer=hf_tokenizer_from(directory),
                             chat_template=TEMPLATES[name])
    ours = Processor.from_pretrained(directory, TINY, **BOUNDS)
    assert ours.chat_template == TEMPLATES[name]
    images = [PIL.fromarray(textured(61, 97, seed=1)), PIL.fromarray(textured(120, 45, seed=2))]
    messages = json.loads(json.dumps(CONVERSATIONS["system_and_images"]))
    messages[1]["content"][0]["image"] = images[0]
    messages[3]["content"][1]["image"] = images[1]
    for msgs in (CONVERSATIONS["text"], messages):
        text = ref.apply_chat_template(msgs, add_generation_prompt=True)
        assert ours.apply_chat_template(msgs, add_generation_prompt=True) == text
        want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
        got = ours.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key].to(got[key].dtype)), key
    # the prompt call renders with the same template
    got = ours("What is this?", images=images[:1])
    want = ref(text=[ref.apply_chat_template(ours.messages("What is this?", 1), add_generation_prompt=True)],
               images=images[:1], return_tensors="pt")
    assert got["input_ids"].tolist() == want["input_ids"].tolist() and "mm_token_type_ids" not in got


def test_raise_exception_in_the_template_is_a_clear_error(tmp_path):
    directory = checkpoint(tmp_path, CHATML_TOOLS_TEMPLATE)
    bad = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    with pytest.raises(jinja2.TemplateError, match="unknown role robot"):
        hf_tokenizer_from(directory).apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="the chat template refused the input: unknown role robot"):
        QwenTokenizer.from_file(directory).apply_chat_template(bad)
    assert issubclass(ChatTemplateError, ValueError)


def test_helpers_given_to_templates():
    source = ("{{ strftime_now('%Y') }}|{{ x | tojson }}|{{ x | tojson(indent=1, separators=(',', ':')) }}"
              "|{{ dict(a=1) | tojson }}{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}|{{ ns.n }}")
    out = compile_template(source).render(x={"b": "é<>&", "a": [1]})
    assert out == f'{datetime.now().year}|{{"b": "é<>&", "a": [1]}}|{{\n "b":"é<>&",\n "a":[\n  1\n ]\n}}|{{"a": 1}}|2'
    assert compile_template(source) is compile_template(source)  # compiled once


# --- where the template comes from --------------------------------------------------------------------------------


def test_template_source_order(tmp_path):
    """chat_template.jinja beats chat_template.json beats tokenizer_config.json, as transformers loads them."""
    write_tokenizer(tmp_path, TINY)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**SPECIAL, "chat_template": "config"}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    (tmp_path / "chat_template.jinja").write_text("jinja")
    messages = [{"role": "user", "content": "hi"}]

    def ours():
        return QwenTokenizer.from_file(tmp_path).apply_chat_template(messages)

    assert ours() == "jinja" == hf_tokenizer_from(tmp_path).apply_chat_template(messages, tokenize=False)
    (tmp_path / "chat_template.jinja").unlink()
    assert ours() == "json"
    (tmp_path / "chat_template.json").unlink()
    assert ours() == "config" == hf_tokenizer_from(tmp_path).apply_chat_template(messages, tokenize=False)
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**SPECIAL, "chat_template": named}))
    ref = hf_tokenizer_from(tmp_path)
    tok = QwenTokenizer.from_file(tmp_path)
    for kwargs in ({}, {"tools": TOOLS}, {"chat_template": "tool_use"}, {"chat_template": "{{ 'inline' }}"}):
        assert tok.apply_chat_template(messages, **kwargs) == ref.apply_chat_template(messages, tokenize=False,
                                                                                     **kwargs)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named[:1]}))
    with pytest.raises(ValueError, match="none is named 'default'"):
        QwenTokenizer.from_file(tmp_path).apply_chat_template(messages)
    (tmp_path / "tokenizer_config.json").unlink()
    tok = QwenTokenizer.from_file(tmp_path)  # no template: the built-in Qwen2.5-VL layout
    assert tok.chat_template is None
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.mark.parametrize("name, content, message", [
    ("chat_template.jinja", b"\xff\xfe{{ x }}", r"chat_template.jinja: not UTF-8 \(byte 0xff at offset 0\)"),
    ("chat_template.json", b"{not json", "chat_template.json: not JSON"),
    ("chat_template.json", b"[1, 2]", "chat_template.json: must hold a JSON object, got list"),
    ("chat_template.json", b'{"template": "x"}', 'chat_template.json has no "chat_template" field'),
    ("chat_template.json", b'{"chat_template": 5}',
     'chat_template.json: "chat_template" must be a string or a list of named templates, got int'),
    ("tokenizer_config.json", b'{"chat_template": [{"name": "default"}]}',
     r'tokenizer_config.json: "chat_template"\[0\] must be \{"name": str, "template": str\}'),
    ("tokenizer_config.json", b'{"eos_token": 7}', 'tokenizer_config.json: "eos_token" must be a string'),
    ("chat_template.jinja", b" " * ((1 << 20) + 1), "over the 1048576 qvl reads"),
])
def test_broken_template_files_are_clear_errors(tmp_path, name, content, message):
    write_tokenizer(tmp_path, TINY)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        QwenTokenizer.from_file(tmp_path)


def test_a_template_that_does_not_compile(tmp_path):
    directory = checkpoint(tmp_path, "{% for m in messages %}{{ m.role }")
    tok = QwenTokenizer.from_file(directory)
    with pytest.raises(ChatTemplateError, match=r"does not compile: .* \(template line 1\)"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert find_chat_templates(tmp_path / "missing") == ({}, None)


# --- the sandbox --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ messages.append({'role': 'x'}) }}",  # immutable: no mutating calls on the caller's data
    "{% set ns = namespace(_hidden=1) %}{{ ns._hidden }}",
    "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
])
def test_the_sandbox_refuses_escapes(tmp_path, source):
    tok = QwenTokenizer.from_file(checkpoint(tmp_path, source))
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_objects_in_messages_reach_the_template_as_inert_text(tmp_path):
    source = "{% for m in messages %}{% for p in m.content %}{{ p.image }}|{{ p.image.save }}|{% endfor %}{% endfor %}"
    tok = QwenTokenizer.from_file(checkpoint(tmp_path, source))
    image = PIL.fromarray(textured(8, 8))
    assert tok.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": image}]}]) == "<Image>||"
