"""The checkpoint's ``tokenizer.json`` (through the ``tokenizers`` library) and its chat template.

`QwenTokenizer.apply_chat_template` renders the checkpoint's own Jinja template (see `chat_template`).
`render_chat` is the fallback for a checkpoint without one (and for synthetic tokenizers): it writes the
text the published Qwen2.5-VL ``chat_template.json`` renders (ChatML turns, a default system turn,
``<|vision_start|><|image_pad|><|vision_end|>`` per image and ``...<|video_pad|>...`` per video);
`expand_vision_placeholders` then repeats each pad token once per merged patch
(``grid_t * grid_h * grid_w / merge_size**2``), as Qwen2.5-VL's processor does before tokenizing.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Qwen25VLConfig
from ..errors import CheckpointError, ConfigError, InputError
from ..files import read_text
from . import chat_template as jinja_chat

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
ENDOFTEXT = "<|endoftext|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
SPECIAL_TOKENS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, ENDOFTEXT)
# the model config field each special token must agree with
CONFIG_FIELDS = {IMAGE_PAD: "image_token_id", VIDEO_PAD: "video_token_id", VISION_START: "vision_start_token_id",
                 VISION_END: "vision_end_token_id"}


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        from .image import OptionalDependencyError

        raise OptionalDependencyError("text input needs the `tokenizers` package: pip install tokenizers") from e
    return tokenizers


def check_text(text: Any, name: str) -> str:
    """`text` as given, when it is a str that encodes as UTF-8; otherwise `InputError` naming `name`: bytes
    (decode them first), another type, or lone surrogates (what Python makes of bytes that are not UTF-8 when
    it decodes a command line or a file with errors="surrogateescape")."""
    if isinstance(text, (bytes, bytearray)):
        raise InputError(f"{name} is {type(text).__name__}, not str: decode it first (e.g. .decode('utf-8'))")
    if not isinstance(text, str):
        raise InputError(f"{name} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = (f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8" if 0xDC80 <= code <= 0xDCFF
                else f"a lone surrogate U+{code:04X}")
        raise InputError(f"{name} is not valid UTF-8 text: {what}, at character {e.start}") from None
    return text


# --- chat template ------------------------------------------------------------------------------------------------


def _kind(item: Any) -> str | None:
    """How the template classifies one content item (the same tests, in the same order)."""
    if not isinstance(item, dict):
        raise InputError(f"message content items must be dicts like {{'type': 'text', 'text': ...}}, got {item!r}")
    if item.get("type") == "image" or "image" in item or "image_url" in item:
        return "image"
    if item.get("type") == "video" or "video" in item:
        return "video"
    if "text" in item:
        return "text"
    return None


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True, add_vision_id: bool = False) -> str:
    """The Qwen2.5-VL chat template, in Python.

    `messages` are ``{"role": ..., "content": str | [items] | None}``; an item is ``{"type": "image"}``,
    ``{"type": "video"}`` or ``{"type": "text", "text": ...}`` (also recognised: an ``image``,
    ``image_url`` or ``video`` key, as the template does). A system turn "You are a helpful assistant."
    is added when the first message is not a system message.
    """
    if not messages:
        raise InputError("no messages to render")
    out, images, videos = [], 0, 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        role, content = message["role"], message["content"]
        if i == 0 and role != "system":
            out.append(f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n")
        out.append(f"{IM_START}{role}\n")
        if isinstance(content, str):
            out.append(f"{content}{IM_END}\n")
            continue
        if content is None:  # e.g. an assistant turn that only called tools: an empty turn, as transformers renders it
            content = []
        if not isinstance(content, (list, tuple)):
            raise InputError(f"message {i} content must be a string or a list of items, got {type(content).__name__}")
        for item in content:
            kind = _kind(item)
            if kind == "image":
                images += 1
                out.append((f"Picture {images}: " if add_vision_id else "") + f"{VISION_START}{IMAGE_PAD}{VISION_END}")
            elif kind == "video":
                videos += 1
                out.append((f"Video {videos}: " if add_vision_id else "") + f"{VISION_START}{VIDEO_PAD}{VISION_END}")
            elif kind == "text":
                out.append(str(item["text"]))
        out.append(f"{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def expand_vision_placeholders(text: str, image_tokens: Sequence[int] = (), video_tokens: Sequence[int] = ()) -> str:
    """Repeat the n-th ``<|image_pad|>`` ``image_tokens[n]`` times (likewise videos); counts must match."""
    pieces = []
    counts = {IMAGE_PAD: list(image_tokens), VIDEO_PAD: list(video_tokens)}
    found = {IMAGE_PAD: text.count(IMAGE_PAD), VIDEO_PAD: text.count(VIDEO_PAD)}
    for token, what in ((IMAGE_PAD, "image"), (VIDEO_PAD, "video")):
        if found[token] != len(counts[token]):
            raise InputError(f"the prompt has {found[token]} {what} placeholder(s) ({token}) but "
                             f"{len(counts[token])} {what}(s) were given")
    used = {IMAGE_PAD: 0, VIDEO_PAD: 0}
    rest = text
    while True:
        positions = [(rest.find(t), t) for t in (IMAGE_PAD, VIDEO_PAD) if rest.find(t) >= 0]
        if not positions:
            pieces.append(rest)
            break
        at, token = min(positions)
        pieces.append(rest[:at])
        pieces.append(token * counts[token][used[token]])
        used[token] += 1
        rest = rest[at + len(token):]
    return "".join(pieces)


# --- tokenizer ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialIds:
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    endoftext: int | None


class QwenTokenizer:
    """A ``tokenizers.Tokenizer`` with the Qwen2.5-VL special tokens looked up and checked, and the
    checkpoint's chat templates (``{name: jinja source}``, empty: `render_chat` is used) and named special
    tokens (``{"eos_token": "<|im_end|>", ...}``, which templates read)."""

    def __init__(self, tokenizer, source: str = "tokenizer", chat_templates: dict[str, str] | None = None,
                 special_tokens: dict[str, str] | None = None):
        self.tok = tokenizer
        self.source = source
        self.chat_templates = dict(chat_templates or {})
        self.special_tokens = dict(special_tokens or {})
        ids = {}
        for token in SPECIAL_TOKENS:
            ids[token] = tokenizer.token_to_id(token)
        missing = [t for t in SPECIAL_TOKENS if ids[t] is None and t != ENDOFTEXT]
        if missing:
            raise CheckpointError(f"{source} lacks the Qwen2.5-VL special token(s) {', '.join(missing)}; "
                             "it is not a Qwen2.5-VL tokenizer")
        self.special = SpecialIds(ids[IM_START], ids[IM_END], ids[VISION_START], ids[VISION_END], ids[IMAGE_PAD],
                                  ids[VIDEO_PAD], ids[ENDOFTEXT])

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> QwenTokenizer:
        """A checkpoint folder (or its tokenizer.json): the tokenizer, the chat template and the named special
        tokens of ``tokenizer_config.json``, all read from that folder."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        folder = os.path.dirname(path) or "."
        if not os.path.lexists(path):
            raise CheckpointError(f"no tokenizer.json at {path}: qvl reads the checkpoint's tokenizer.json "
                                  "(the fast-tokenizer file); copy it into the checkpoint directory")
        # read as the checkpoint's other files are: a directory, a FIFO, a Git LFS pointer, not UTF-8 named as such
        text = read_text(path, error=CheckpointError)
        try:
            tok = _tokenizers().Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own Exception type for malformed files
            raise CheckpointError(f"cannot load {path}: {e}") from None
        templates, _ = jinja_chat.find_chat_templates(folder)
        return cls(tok, source=path, chat_templates=templates,
                   special_tokens=jinja_chat.special_tokens_from_config(folder))

    @classmethod
    def synthetic(cls, cfg: Qwen25VLConfig) -> QwenTokenizer:
        """A byte-level tokenizer (256 byte tokens, no merges) with the special tokens at `cfg`'s ids.

        For random-weight presets, which come without a tokenizer.json: text round-trips, ids match the
        config. ``<|endoftext|>`` is the config's bos id, ``<|im_end|>`` its first eos id.
        """
        tk = _tokenizers()
        fixed = {IMAGE_PAD: cfg.image_token_id, VIDEO_PAD: cfg.video_token_id, VISION_START: cfg.vision_start_token_id,
                 VISION_END: cfg.vision_end_token_id, ENDOFTEXT: cfg.bos_token_id, IM_END: cfg.eos_token_id[0]}
        used = set(fixed.values()) | set(range(256))
        im_start = fixed[IM_END] - 1
        if im_start in used or im_start < 0:
            im_start = next(i for i in range(256, cfg.text.vocab_size) if i not in used)
        fixed[IM_START] = im_start
        if len(set(fixed.values())) != len(fixed) or max(fixed.values()) >= cfg.text.vocab_size:
            raise ConfigError(f"cannot place the special tokens at the config's ids {fixed} in a vocabulary of "
                             f"{cfg.text.vocab_size}")
        vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
        vocab.update(fixed)
        tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk.decoders.ByteLevel()
        tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        return cls(tok, source="synthetic byte-level tokenizer",
                   special_tokens={"eos_token": IM_END, "pad_token": ENDOFTEXT})

    def check_config(self, cfg: Qwen25VLConfig) -> None:
        """Refuse a tokenizer whose vision tokens sit at other ids than the model config says."""
        problems = []
        for token, field in CONFIG_FIELDS.items():
            tid, want = self.tok.token_to_id(token), getattr(cfg, field)
            if tid != want:
                problems.append(f"{token} is {tid} in the tokenizer but {field} is {want} in the config")
        top = max(v for v in vars(self.special).values() if v is not None)
        if top >= cfg.text.vocab_size:
            problems.append(f"special token id {top} is outside the model vocabulary ({cfg.text.vocab_size})")
        if problems:
            raise CheckpointError(f"{self.source} does not match the model config: " + "; ".join(problems))

    def stop_ids(self, cfg: Qwen25VLConfig, extra: Iterable[int] = ()) -> tuple[int, ...]:
        """The config's EOS ids, ``<|im_end|>`` (end of the assistant turn) and any `extra`, in order."""
        out: list[int] = []
        for i in (*cfg.eos_token_id, self.special.im_end, *extra):
            if i is not None and int(i) not in out:
                out.append(int(i))
        return tuple(out)

    @property
    def chat_template(self) -> str | None:
        """The template rendered by default (None: the built-in `render_chat`)."""
        return jinja_chat.select_template(self.chat_templates)

    @property
    def pad_id(self) -> int | None:
        """The id batches are padded with: tokenizer_config.json's pad_token, else ``<|endoftext|>``."""
        token = self.special_tokens.get("pad_token")
        tid = self.tok.token_to_id(token) if token is not None else None
        if token is not None and tid is None:
            raise CheckpointError(f"{self.source}: the pad_token {token!r} is not in the vocabulary")
        return tid if tid is not None else self.special.endoftext

    def render_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False, *,
                             tools: Sequence[dict] | None = None, documents: Sequence[dict] | None = None,
                             chat_template: str | None = None, continue_final_message: bool | str = False,
                             return_generation_spans: bool = False, **template_kwargs: Any):
        """One conversation as text: the checkpoint's template (or `chat_template`, a template name or text),
        else `render_chat`, which reads only ``add_vision_id`` of the extra arguments.

        `continue_final_message` ends the text right after the final message's text (``True``: its content; a
        field name: that field), as transformers does (`chat_template.render_continuing`). With
        `return_generation_spans`: (text, the (start, end) characters of each ``{% generation %}`` block's
        output), which `encode_with_assistant_mask` turns into transformers' assistant mask; that needs a
        template with such blocks and excludes `continue_final_message`."""
        source = jinja_chat.select_template(self.chat_templates, chat_template, tools)
        if return_generation_spans:
            if continue_final_message:
                raise InputError("continue_final_message and return_assistant_tokens_mask cannot be combined")
            if source is None:
                raise InputError(f"return_assistant_tokens_mask needs a chat template with {{% generation %}} blocks; "
                                 f"{self.source} has no chat template (the built-in Qwen2.5-VL layout has none)")
            return jinja_chat.render_with_generation_spans(
                source, messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
                special_tokens=self.special_tokens, **template_kwargs)
        if source is None:
            add_vision_id = bool(template_kwargs.get("add_vision_id", False))
            return jinja_chat.render_continuing(
                lambda m: render_chat(m, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id),
                messages, continue_final_message, add_generation_prompt, reads=("content",))
        return jinja_chat.render(source, messages, add_generation_prompt=add_generation_prompt,
                                 continue_final_message=continue_final_message, tools=tools, documents=documents,
                                 special_tokens=self.special_tokens, **template_kwargs)

    def apply_chat_template(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
                            add_generation_prompt: bool = False, tokenize: bool = False, *,
                            continue_final_message: bool | str = False, return_assistant_tokens_mask: bool = False,
                            **template_kwargs: Any):
        """transformers' ``tokenizer.apply_chat_template(..., return_dict=False)``: the rendered text, or with
        `tokenize` its ids (no special tokens added beyond the template's). A list of conversations gives a
        list of results. `template_kwargs`: ``tools``, ``documents``, ``chat_template`` and any variable the
        template reads (e.g. ``add_vision_id``).

        `continue_final_message`: see `render_chat_template`. `return_assistant_tokens_mask` (with `tokenize`)
        returns what transformers returns with ``return_dict=True``: a dict of ``input_ids``, ``attention_mask``
        (all ones) and ``assistant_masks`` (1 for the tokens of the template's ``{% generation %}`` blocks), lists
        of ints, or lists of such lists for a list of conversations."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InputError(f"messages must be a non-empty list of message dicts (or of conversations), got "
                             f"{messages!r:.80}")
        if return_assistant_tokens_mask and not tokenize:
            raise InputError("return_assistant_tokens_mask=True needs tokenize=True: the mask is one entry per token")
        batched = isinstance(messages[0], (list, tuple))
        conversations = messages if batched else [messages]
        rendered = [self.render_chat_template(m, add_generation_prompt, continue_final_message=continue_final_message,
                                              return_generation_spans=return_assistant_tokens_mask, **template_kwargs)
                    for m in conversations]
        if return_assistant_tokens_mask:
            encoded = [self.encode_with_assistant_mask(t, spans) for t, spans in rendered]
            out = {"input_ids": [ids for ids, _ in encoded], "attention_mask": [[1] * len(ids) for ids, _ in encoded],
                   "assistant_masks": [mask for _, mask in encoded]}
            return out if batched else {k: v[0] for k, v in out.items()}
        out = [self.encode(t, add_special_tokens=False) for t in rendered] if tokenize else rendered
        return out if batched else out[0]

    def encode_with_assistant_mask(self, text: str, spans: Sequence[tuple[int, int]], add_special_tokens: bool = False,
                                   ) -> tuple[list[int], list[int]]:
        """(ids of `text`, 1 for each id whose characters overlap one of `spans`, else 0): the assistant mask of
        text rendered with `render_chat_template(..., return_generation_spans=True)`."""
        encoding = self.tok.encode(check_text(text, "the rendered chat"), add_special_tokens=add_special_tokens)
        return list(encoding.ids), jinja_chat.tokens_in_spans(encoding.offsets, spans)

    def encode(self, text: str, add_special_tokens: bool = True, *, name: str = "text") -> list[int]:
        """Token ids of `text` (a str that is valid UTF-8: `check_text`, with `name` in its message)."""
        return list(self.tok.encode(check_text(text, name), add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids: integers (not bools) in [0, 2**32); ids the vocabulary lacks decode to nothing,
        as in the tokenizers library."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # a tensor or an array too
        bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral)
                    or not 0 <= i < 2**32), None)
        if bad is not None:
            raise InputError(f"token ids to decode must be integers in [0, 2**32), got {bad!r:.40}")
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the ByteLevel pre-tokenizer's alphabet), byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


__all__ = ["QwenTokenizer", "SpecialIds", "render_chat", "expand_vision_placeholders", "check_text", "SPECIAL_TOKENS",
           "IM_START", "IM_END", "VISION_START", "VISION_END", "IMAGE_PAD", "VIDEO_PAD", "ENDOFTEXT", "DEFAULT_SYSTEM"]
