"""Next-token scores: transformers' logits processors, built and applied in the order its generate applies them.

Each processor takes the sequences so far (N, length) and float32 scores (N, vocab) and returns new scores. The
rules that change what may come next (repetition penalty, n-gram ban, minimum length) come first; the sampling
warpers (temperature, top-k, top-p) follow, and only when sampling. Search (greedy, sampling, beams) is
separate from them: `qvl.model.generation`.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .inputs import check_int, check_number

NEG_INF = float("-inf")
# Scores are float32: a temperature or repetition penalty below SCALE_LIMIT (or a penalty above its inverse)
# would push logits of any ordinary size (|x| < 1e8) past float32's range, to infinity, and sampling from
# infinities is undefined. Such arguments are refused rather than met as non-finite scores midway.
SCALE_LIMIT = 1e-30


class RepetitionPenalty:
    """Scores of tokens already in a row divided by `penalty` (multiplied when negative). `ignore` (N,): the
    left padding per row, whose tokens do not count (transformers' prompt_ignore_length)."""

    def __init__(self, penalty: float, ignore: torch.Tensor | None = None):
        self.penalty, self.ignore = penalty, ignore

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        if self.ignore is not None:  # ignored positions point at a spare column dropped below
            positions = torch.arange(ids.shape[1], device=ids.device)
            ids = ids.masked_fill(positions[None, :] < self.ignore[:, None], vocab)
        ids = ids.clamp(max=vocab)
        padded = torch.nn.functional.pad(scores, (0, 1))
        seen = padded.gather(1, ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return padded.scatter(1, ids, seen)[:, :vocab]


class NoRepeatNGram:
    """Ban every token that would complete an n-gram already present in the row (prompt included)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        length, n = ids.shape[1], self.size
        if length < n:
            return scores
        prefix = ids[:, length + 1 - n:]  # the last n - 1 tokens: an n-gram starting with them is banned
        windows = ids.unfold(1, n, 1)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(-1)
        vocab = scores.shape[-1]
        banned = scores.new_zeros(scores.shape[0], vocab + 1, dtype=torch.bool)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
        return scores.masked_fill(banned[:, :vocab], NEG_INF)


class MinLength:
    """No EOS while a row is shorter than `min_length` tokens, or has fewer than `min_new` new tokens after a
    prompt of `prompt_length` (transformers' MinLength and MinNewTokensLength processors)."""

    def __init__(self, min_length: int, eos: torch.Tensor, prompt_length: int = 0):
        self.min_length, self.eos, self.prompt_length = min_length, eos, prompt_length

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] - self.prompt_length >= self.min_length:
            return scores
        is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), self.eos)
        return scores.masked_fill(is_eos, NEG_INF)


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    """Keep the `top_k` highest scores (at least `keep`)."""

    def __init__(self, top_k: int, keep: int = 1):
        self.top_k = max(top_k, keep)

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(scores, min(self.top_k, scores.shape[-1]))[0][..., -1, None]
        return scores.masked_fill(scores < kth, NEG_INF)


class TopP:
    """Keep the smallest set of highest-probability tokens whose mass reaches `top_p` (at least `keep`)."""

    def __init__(self, top_p: float, keep: int = 1):
        self.top_p, self.keep = top_p, keep

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - self.top_p  # the low tail holding at most 1 - top_p of the mass
        drop[..., -self.keep:] = False
        return scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)


def same_name(name: str) -> str:
    """How the API spells an argument in messages: as it is (the CLI passes its flags instead)."""
    return name


def check_sampling(temperature, top_k, top_p, name=same_name) -> None:
    """transformers' ranges (its warpers' checks), finite: temperature >= 0 (0: greedy), top_k an integer >= 0
    (0: none), top_p in [0, 1]. `name` spells each argument in the messages (the CLI's flags)."""
    check_number(temperature, name("temperature"), 0.0, note=" (0 is greedy)")
    if 0 < temperature < SCALE_LIMIT:
        raise InputError(f"{name('temperature')} must be 0 (greedy) or at least {SCALE_LIMIT:g}: dividing float32 "
                         f"scores by {temperature!r} overflows them to infinity")
    check_int(top_k, name("top_k"), 0, optional=True, note=" (0: no top-k)")
    check_number(top_p, name("top_p"), 0.0, 1.0, optional=True)


def logits_processors(*, eos: torch.Tensor, prompt_length: int, padding: torch.Tensor | None,
                      repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                      min_length: int | None = None, min_new_tokens: int | None = None, sample: bool = False,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      beams: int = 1) -> list:
    """The processors transformers' `_get_logits_processor` builds for these settings, in its order. `eos`: the
    EOS ids (empty: none, so the minimum lengths have nothing to hold back). Warpers only when `sample`; with
    beams they keep at least one token more than there are EOS ids (a beam can always continue)."""
    processors: list = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(float(repetition_penalty), padding))
    if no_repeat_ngram_size:
        processors.append(NoRepeatNGram(no_repeat_ngram_size))
    if len(eos):
        if min_length:
            processors.append(MinLength(min_length, eos))
        if min_new_tokens:
            processors.append(MinLength(min_new_tokens, eos, prompt_length))
    if sample:
        keep = len(eos) + 1 if beams > 1 else 1
        if temperature != 1.0:  # numbers as floats: a tensor op with a Python int past int64 overflows
            processors.append(Temperature(float(temperature)))
        if top_k:
            processors.append(TopK(int(top_k), keep))
        if top_p is not None and top_p < 1.0:
            processors.append(TopP(float(top_p), keep))
    return processors


def check_processors(repetition_penalty, no_repeat_ngram_size, min_length, min_new_tokens, name=same_name) -> None:
    """repetition_penalty a number in [SCALE_LIMIT, 1 / SCALE_LIMIT] (1.0: none); the n-gram size and minimum
    lengths integers >= 0."""
    check_number(repetition_penalty, name("repetition_penalty"), SCALE_LIMIT, 1 / SCALE_LIMIT, optional=True,
                 note=" (1.0: none; beyond, float32 scores overflow)")
    for arg, value in (("no_repeat_ngram_size", no_repeat_ngram_size), ("min_length", min_length),
                       ("min_new_tokens", min_new_tokens)):
        check_int(value, name(arg), 0, optional=True)


def process(processors: list, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for processor in processors:
        scores = processor(ids, scores)
    return scores
