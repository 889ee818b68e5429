"""transformers' chat-template options beyond plain rendering, against transformers on the same folders:
``{% generation %}`` blocks and ``return_assistant_tokens_mask``, ``continue_final_message``, a message's
reasoning under every name templates read, and named templates in ``additional_chat_templates/`` (with the
hostile cases of that folder: links out, directories, oversized files)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qvl.errors import CheckpointError, InputError
from qvl.processing import ChatTemplateError, Processor, QwenTokenizer
from qvl.processing.chat_template import tokens_in_spans
from tests.processing.helpers import BOUNDS, QWEN25VL_CHAT_TEMPLATE, textured
from tests.processing.test_template import CHATML_TOOLS_TEMPLATE, TINY, TOOLS, checkpoint, hf_tokenizer_from

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

# ChatML with the assistant's turns (its text, images and <|im_end|>) in generation blocks, written two ways.
GENERATION_TEMPLATE = """{% for message in messages %}<|im_start|>{{ message.role }}
{% if message.role == 'assistant' %}{% generation %}
{%- if message.content is string %}{{ message.content }}{% else %}{% for part in message.content %}
{%- if part.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part.text }}{% endif %}
{%- endfor %}{% endif %}<|im_end|>{% endgeneration %}
{% else %}{% if message.content is string %}{{ message.content }}{% else %}{% for part in message.content %}
{%- if part.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part.text }}{% endif %}
{%- endfor %}{% endif %}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
TRIMMED_GENERATION_TEMPLATE = """{%- for m in messages -%}
<|im_start|>{{ m.role }} {%- if m.role == 'assistant' %} {%- generation -%} {{ m.content | trim }} {% endgeneration -%}
{%- else %} {{ m.content | trim }}{% endif %}<|im_end|>
{% endfor -%}"""
GENERATION_TEMPLATES = {"chatml": GENERATION_TEMPLATE, "trimmed": TRIMMED_GENERATION_TEMPLATE}

CHATS = {
    "one_turn": [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": "The quick fox."}],
    "several_turns": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is this? café 你好"}, {"role": "assistant", "content": " A cat. "},
        {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "12345 + 678 = 13023"},
        {"role": "user", "content": "Thanks"},
    ],
    "no_assistant": [{"role": "user", "content": "Describe the image in detail."}],
}


@pytest.fixture(scope="module", params=list(GENERATION_TEMPLATES))
def generation_folder(request, tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp(request.param), GENERATION_TEMPLATES[request.param])


# --- {% generation %} and return_assistant_tokens_mask --------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_generation_blocks_render_and_mask_as_transformers(generation_folder, add_generation_prompt):
    ours, ref = QwenTokenizer.from_file(generation_folder), hf_tokenizer_from(generation_folder)
    for messages in [*CHATS.values(), list(CHATS.values())]:  # each chat, then all of them as a batch
        text = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ours.apply_chat_template(messages, add_generation_prompt) == text
        want = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=True,
                                       return_assistant_tokens_mask=True)
        got = ours.apply_chat_template(messages, add_generation_prompt, tokenize=True,
                                       return_assistant_tokens_mask=True)
        assert got == dict(want)
    assert any(got["assistant_masks"][1]) and not any(got["assistant_masks"][2])  # the batch's last two chats


def test_processor_assistant_mask_covers_expanded_images_as_transformers(tmp_path):
    """An image inside a generation block: every pad token it expands to is in the mask."""
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    directory = checkpoint(tmp_path, GENERATION_TEMPLATE)
    ref = ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(**BOUNDS), tokenizer=hf_tokenizer_from(directory),
                             chat_template=GENERATION_TEMPLATE)
    ours = Processor.from_pretrained(directory, TINY, **BOUNDS)
    images = [PIL.fromarray(textured(61, 97, seed=1)), PIL.fromarray(textured(120, 45, seed=2))]
    messages = [
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Again."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Here: "}, {"type": "image", "image": images[1]}]},
        {"role": "user", "content": "Thanks"},
    ]
    want = ref.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                   return_assistant_tokens_mask=True)
    got = ours.apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key].to(got[key].dtype)), key
    image_pad = ours.tokenizer.special.image_pad
    masked_pads = got["input_ids"][got["assistant_masks"].bool()] == image_pad
    assert int(masked_pads.sum()) == int(got["image_grid_thw"][1].prod()) // 4 > 1
    # a batch: the mask sits where each row's tokens are, 0 on the left padding
    batch = ours.apply_chat_template([CHATS["no_assistant"], CHATS["one_turn"]], tokenize=True,
                                     return_assistant_tokens_mask=True)
    one = ours.apply_chat_template(CHATS["one_turn"], tokenize=True, return_assistant_tokens_mask=True)
    assert batch["assistant_masks"].shape == batch["input_ids"].shape
    assert torch.equal(batch["assistant_masks"][1], one["assistant_masks"][0])
    assert not batch["assistant_masks"][0].any() and not batch["assistant_masks"][batch["attention_mask"] == 0].any()


def test_assistant_mask_refusals(tmp_path):
    messages = CHATS["one_turn"]
    plain = QwenTokenizer.from_file(checkpoint(tmp_path / "plain", QWEN25VL_CHAT_TEMPLATE))
    # transformers warns and returns an all-zero mask for a template without generation blocks; qvl refuses it
    ref = hf_tokenizer_from(tmp_path / "plain").apply_chat_template(messages, return_dict=True,
                                                                    return_assistant_tokens_mask=True)
    assert not any(ref["assistant_masks"])
    with pytest.raises(ChatTemplateError, match=r"needs a chat template with \{% generation %\} blocks"):
        plain.apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True)
    tok = QwenTokenizer.from_file(checkpoint(tmp_path / "gen", GENERATION_TEMPLATE))
    with pytest.raises(ValueError, match="requires `return_dict=True` and `tokenize=True`"):
        hf_tokenizer_from(tmp_path / "gen").apply_chat_template(messages, tokenize=False,
                                                                return_assistant_tokens_mask=True)
    with pytest.raises(InputError, match="return_assistant_tokens_mask=True needs tokenize=True"):
        tok.apply_chat_template(messages, return_assistant_tokens_mask=True)
    with pytest.raises(ValueError, match="continue_final_message is not compatible with return_assistant_tokens_mask"):
        hf_tokenizer_from(tmp_path / "gen").apply_chat_template(messages, return_dict=True, continue_final_message=True,
                                                                return_assistant_tokens_mask=True)
    with pytest.raises(InputError, match="continue_final_message and return_assistant_tokens_mask cannot be combined"):
        tok.apply_chat_template(messages, tokenize=True, continue_final_message=True, return_assistant_tokens_mask=True)
    builtin = QwenTokenizer.from_file(checkpoint(tmp_path / "none"))
    with pytest.raises(InputError, match="has no chat template"):
        builtin.apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True)


def test_tokens_in_spans_edges():
    offsets = [(0, 2), (2, 2), (2, 5), (5, 5), (5, 9), (9, 12)]
    assert tokens_in_spans(offsets, []) == [0] * 6
    assert tokens_in_spans(offsets, [(2, 5)]) == [0, 0, 1, 0, 0, 0]  # zero-width tokens at the edges stay out
    assert tokens_in_spans(offsets, [(3, 6)]) == [0, 0, 1, 1, 1, 0]  # any overlap counts; inside, zero-width too
    assert tokens_in_spans(offsets, [(5, 9), (2, 5)]) == [0, 0, 1, 0, 1, 0]  # touching spans stay two
    assert tokens_in_spans(offsets, [(3, 4), (0, 12)]) == [1] * 6  # nested: their union


# --- continue_final_message -----------------------------------------------------------------------------------------

# Trims what it renders, so the text to continue loses its trailing space; and reads the reasoning too.
TRIM_REASONING_TEMPLATE = """{% for m in messages %}<|im_start|>{{ m.role }}
{% if m.reasoning_content %}<think>{{ m.reasoning_content | trim }}</think>
{% endif %}{{ m.content | trim }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

PREFILLS = {
    "text": [{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": "The quick "}],
    "items": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "A cat"}, {"type": "image"}]}],
    "user_last": [{"role": "user", "content": "Describe the image in"}],
}


@pytest.mark.parametrize("template", ["qwen25vl", "chatml_tools", "trim_reasoning"])
def test_continue_final_message_as_transformers(tmp_path, template):
    source = {"qwen25vl": QWEN25VL_CHAT_TEMPLATE, "chatml_tools": CHATML_TOOLS_TEMPLATE,
              "trim_reasoning": TRIM_REASONING_TEMPLATE}[template]
    directory = checkpoint(tmp_path, source)
    ours, ref = QwenTokenizer.from_file(directory), hf_tokenizer_from(directory)
    for name, messages in PREFILLS.items():
        if name == "items" and template == "trim_reasoning":
            continue  # that template renders content as a string only
        want = ref.apply_chat_template(messages, continue_final_message=True, tokenize=False)
        assert ours.apply_chat_template(messages, continue_final_message=True) == want, name
        assert not want.endswith("<|im_end|>\n")
        want_ids = ref.apply_chat_template(messages, continue_final_message=True, return_dict=False)
        assert ours.apply_chat_template(messages, continue_final_message=True, tokenize=True) == want_ids
    batch = [PREFILLS["text"], PREFILLS["user_last"]]
    assert (ours.apply_chat_template(batch, continue_final_message=True)
            == ref.apply_chat_template(batch, continue_final_message=True, tokenize=False))
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt are not compatible"):
        ref.apply_chat_template(PREFILLS["text"], continue_final_message=True, add_generation_prompt=True,
                                tokenize=False)
    with pytest.raises(InputError, match="continue_final_message and add_generation_prompt cannot be combined"):
        ours.apply_chat_template(PREFILLS["text"], True, continue_final_message=True)


def test_continue_the_reasoning(tmp_path):
    """A field name continues that field; the reasoning, given under any of its names, reaches the template as
    transformers gives it."""
    directory = checkpoint(tmp_path, TRIM_REASONING_TEMPLATE)
    ours, ref = QwenTokenizer.from_file(directory), hf_tokenizer_from(directory)
    for key in ("reasoning_content", "thinking", "reasoning"):
        messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4", key: "Adding "}]
        want = ref.apply_chat_template(messages, tokenize=False)
        assert ours.apply_chat_template(messages) == want and "<think>Adding</think>" in want
        want = ref.apply_chat_template(messages, continue_final_message=key, tokenize=False)
        assert ours.apply_chat_template(messages, continue_final_message=key) == want
        assert want.endswith("<think>Adding")
    iterating = "{% for m in messages %}{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}{% endfor %}"
    messages = [{"role": "assistant", "content": "x", "reasoning": "r", "thinking": "t"}]
    assert (ours.apply_chat_template(messages, chat_template=iterating)
            == ref.apply_chat_template(messages, chat_template=iterating, tokenize=False))


@pytest.mark.parametrize("messages, kwargs, theirs, ours_error, ours_match", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], {},
     'the final message has no "content" to continue', InputError, "the final message has no 'content' to continue"),
    ([{"role": "assistant", "content": "4", "reasoning_content": "Adding"}],
     {"continue_final_message": "reasoning_content"},
     'set to "reasoning_content" but this is not an accepted field', ChatTemplateError,
     "does not read the final message's 'reasoning_content'"),
    ([{"role": "user", "content": [{"type": "image"}]}], {},
     "could not find any text to continue", InputError, "has no text item to continue"),
    (PREFILLS["text"], {"chat_template": "{% for m in messages %}{{ m.content | upper }}{% endfor %}"},
     "does not appear in the chat after applying the chat template", ChatTemplateError,
     "does not appear in the rendered chat"),
])
def test_continue_final_message_refusals(tmp_path, messages, kwargs, theirs, ours_error, ours_match):
    directory = checkpoint(tmp_path, QWEN25VL_CHAT_TEMPLATE)
    options = {"continue_final_message": True, **kwargs}
    with pytest.raises(ValueError, match=theirs):
        hf_tokenizer_from(directory).apply_chat_template(messages, tokenize=False, **options)
    with pytest.raises(ours_error, match=ours_match):
        QwenTokenizer.from_file(directory).apply_chat_template(messages, **options)


def test_continue_with_the_builtin_layout_and_the_processor(tmp_path):
    """Without a template the built-in layout continues as the published Qwen2.5-VL template does; the processor
    continues as transformers' processor does."""
    builtin = QwenTokenizer.from_file(checkpoint(tmp_path / "none"))
    ref = hf_tokenizer_from(checkpoint(tmp_path / "qwen", QWEN25VL_CHAT_TEMPLATE))
    for messages in PREFILLS.values():
        assert (builtin.apply_chat_template(messages, continue_final_message=True)
                == ref.apply_chat_template(messages, continue_final_message=True, tokenize=False))
    with pytest.raises(ChatTemplateError, match="does not read the final message's 'thinking'"):
        builtin.apply_chat_template([{"role": "assistant", "content": "x", "thinking": "y"}],
                                    continue_final_message="thinking")
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    processor = ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(**BOUNDS), tokenizer=ref,
                                   chat_template=QWEN25VL_CHAT_TEMPLATE)
    ours = Processor.from_pretrained(tmp_path / "qwen", TINY, **BOUNDS)
    image = PIL.fromarray(textured(61, 97, seed=1))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Again?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes: "}, {"type": "image", "image": image},
                                                  {"type": "text", "text": "and a cat "}]}]
    assert (ours.apply_chat_template(messages, continue_final_message=True)
            == processor.apply_chat_template(messages, continue_final_message=True))
    want = processor.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    got = ours.apply_chat_template(messages, continue_final_message=True, tokenize=True)
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["pixel_values"], want["pixel_values"])


# --- additional_chat_templates/ -------------------------------------------------------------------------------------

NAMED = {"tool_use": CHATML_TOOLS_TEMPLATE,
         "brief": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"}


def write_named(directory, templates=NAMED):
    folder = directory / "additional_chat_templates"
    folder.mkdir(exist_ok=True)
    for name, text in templates.items():
        (folder / f"{name}.jinja").write_text(text, encoding="utf-8")
    (folder / "README.md").write_text("not a template")  # ignored by both
    return folder


def test_additional_chat_templates_as_transformers(tmp_path):
    directory = checkpoint(tmp_path, QWEN25VL_CHAT_TEMPLATE)
    write_named(directory)
    ours, ref = QwenTokenizer.from_file(directory), hf_tokenizer_from(directory)
    assert ours.chat_templates == ref.chat_template == {"default": QWEN25VL_CHAT_TEMPLATE, **NAMED}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for kwargs in ({}, {"chat_template": "brief"}, {"tools": TOOLS}, {"chat_template": "tool_use", "tools": TOOLS}):
        want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours.apply_chat_template(messages, True, **kwargs) == want, kwargs
    processor = Processor.from_pretrained(directory, TINY)
    assert processor.apply_chat_template(messages, chat_template="brief") == "[user] Weather in Paris?\n"


def test_additional_chat_templates_replace_the_config_templates(tmp_path):
    """Without chat_template.jinja, the folder's templates are the checkpoint's (tokenizer_config.json's template
    is no longer used), as transformers' tokenizer loads them; default.jinja is then the default."""
    directory = checkpoint(tmp_path, "config template", where="tokenizer_config.json")
    write_named(directory)
    ours, ref = QwenTokenizer.from_file(directory), hf_tokenizer_from(directory)
    assert ours.chat_templates == ref.chat_template == NAMED
    messages = [{"role": "user", "content": "hi"}]
    assert (ours.apply_chat_template(messages, chat_template="brief")
            == ref.apply_chat_template(messages, chat_template="brief", tokenize=False))
    with pytest.raises(CheckpointError, match="none is named 'default'"):
        ours.apply_chat_template(messages)
    write_named(directory, {"default": "{{ 'from the folder' }}"})
    assert QwenTokenizer.from_file(directory).apply_chat_template(messages) == "from the folder" == (
        hf_tokenizer_from(directory).apply_chat_template(messages, tokenize=False))


def test_conflicting_template_files_are_refused(tmp_path):
    directory = checkpoint(tmp_path, "jinja default")
    write_named(directory, {"default": "folder default"})
    with pytest.raises(CheckpointError, match=r"chat_template.jinja and .*default.jinja are both the default"):
        QwenTokenizer.from_file(directory)
    (directory / "chat_template.jinja").unlink()
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": "legacy"}))
    with pytest.raises(CheckpointError, match=r"chat_template.json cannot be combined with .*additional_chat_temp"):
        QwenTokenizer.from_file(directory)


def test_hub_cache_links_into_blobs_are_followed(tmp_path):
    """A huggingface_hub snapshot's files are links to ../blobs: inside the checkpoint for qvl too."""
    snapshot = tmp_path / "models--x--y" / "snapshots" / "rev"
    checkpoint(snapshot, QWEN25VL_CHAT_TEMPLATE)
    blob = tmp_path / "models--x--y" / "blobs" / "0123abcd"
    blob.parent.mkdir()
    blob.write_text(NAMED["brief"])
    (snapshot / "additional_chat_templates").mkdir()
    os.symlink(os.path.relpath(blob, snapshot / "additional_chat_templates"),
               snapshot / "additional_chat_templates" / "brief.jinja")
    assert QwenTokenizer.from_file(snapshot).chat_templates["brief"] == NAMED["brief"]


@pytest.mark.parametrize("hostile, message", [
    ("link_out", r"'additional_chat_templates/x.jinja' leads outside the checkpoint folder"),
    ("folder_link_out", r"'additional_chat_templates' leads outside the checkpoint folder"),
    ("directory", r"additional_chat_templates/x.jinja: is a directory, not a file"),
    ("oversized", r"additional_chat_templates/x.jinja: 1048577 bytes, over the 1048576 qvl reads for it"),
    ("fifo", r"additional_chat_templates/x.jinja: is not a regular file"),
    ("no_name", r"additional_chat_templates/.jinja: a template file needs a name before .jinja"),
])
def test_hostile_additional_templates_are_refused(tmp_path, hostile, message):
    directory = checkpoint(tmp_path / "ckpt", QWEN25VL_CHAT_TEMPLATE)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jinja").write_text("{{ 'outside' }}")
    folder = directory / "additional_chat_templates"
    if hostile == "folder_link_out":
        os.symlink(outside, folder)
    else:
        folder.mkdir()
    target = folder / ("x.jinja" if hostile != "no_name" else ".jinja")
    if hostile == "link_out":
        os.symlink(outside / "secret.jinja", target)
    elif hostile == "directory":
        target.mkdir()
    elif hostile == "oversized":
        target.write_bytes(b" " * ((1 << 20) + 1))
    elif hostile == "fifo":
        os.mkfifo(target)
    elif hostile == "no_name":
        target.write_text("x")
    with pytest.raises(CheckpointError, match=message) as caught:
        QwenTokenizer.from_file(directory)
    assert str(directory) in str(caught.value) and "\n" not in str(caught.value)


def test_a_file_named_like_the_folder_is_ignored(tmp_path):
    directory = checkpoint(tmp_path, QWEN25VL_CHAT_TEMPLATE)
    (directory / "additional_chat_templates").write_text("not a folder")
    assert QwenTokenizer.from_file(directory).chat_templates == {"default": QWEN25VL_CHAT_TEMPLATE}
    assert hf_tokenizer_from(directory).chat_template == QWEN25VL_CHAT_TEMPLATE
