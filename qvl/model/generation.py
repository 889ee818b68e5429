"""Generation through the model's static KV cache: greedy, sampling, and beam search, as transformers' generate.

    inputs --> model.prepare --repeat (num_beams or num_return_sequences rows per sample)--> prefill
        --> [ float32 logits --> logits processors (`qvl.model.sampling`) --> choose --> decode step ] ...

The vision tower runs once per image: each sample's prepared prompt (its embeddings with the image features
placed, its positions) is repeated, which is what transformers' `_expand_inputs_for_generation` achieves by
repeating each sample's pixel rows.

Greedy and sampling (`_search`) pick one token per row; beam search (`_beam_search`) keeps `num_beams` rows per
sample in one static cache of B * num_beams rows and reorders them (`StaticKVCache.reorder`) after each step to
follow the beams chosen. Both follow transformers 5.24's `_sample` and vectorized `_beam_search`: the same
processors in the same order, the same candidates, finished hypotheses, length penalty and early stopping, so
the same tokens and scores come out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError, NonFiniteError
from ..parallel.group import agreed_seed
from . import graphs
from .inputs import SEED_MAX, SEED_MIN, check_int, check_number, check_token_shape
from .sampling import check_processors, check_sampling, logits_processors, process, same_name

UNREACHABLE = -1.0e9  # transformers' score for beams that must not be chosen
MAX_LOG_SCALE = math.log(1e300)  # the largest natural log of a length-penalty divisor that stays a float


@dataclass
class GenerateOutput:
    """What `generate(..., return_dict_in_generate=True)` returns (transformers' GenerateDecoderOnlyOutput and
    GenerateBeamDecoderOnlyOutput fields).

    sequences (B * num_return_sequences, L + n): prompt and new tokens. scores: with output_scores, one
    (rows, vocab) float32 tensor per step, the processed scores the choice was made from (log-probabilities for
    beam search; rows: B * num_beams for beams, else B * num_return_sequences). logits: with output_logits, the
    raw float32 logits per step. sequences_scores (B * num_return_sequences,): beam search with output_scores,
    each returned hypothesis' length-penalized log-probability. beam_indices (B * num_return_sequences, n):
    beam search, the flat row each new token was chosen from (-1 past the hypothesis' end).
    """

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None
    beam_indices: torch.Tensor | None = None


# --- inputs --------------------------------------------------------------------------------------------------------


# --- stopping --------------------------------------------------------------------------------------------------


class StopStrings:
    """A row stops when a stop string appears in its decoded text overlapping the last token (transformers'
    StopStringCriteria: the string may begin or end inside a token). `tokenizer.decode(ids) -> str` reads the
    last tokens: each token decodes to at least one character, so the longest string's length in tokens is
    enough."""

    def __init__(self, stop_strings, tokenizer):
        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise InputError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise InputError("stop_strings need a tokenizer: pass tokenizer= (an object with decode(ids), e.g. "
                             "qvl's Processor or QwenTokenizer)")
        self.strings, self.tokenizer = strings, tokenizer
        self.window = max(len(s) for s in strings)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        hits = [self._ends_with_stop(row) for row in ids[:, -self.window:].tolist()]
        return torch.tensor(hits, dtype=torch.bool, device=ids.device)

    def _ends_with_stop(self, row: list[int]) -> bool:
        text, before = self.tokenizer.decode(row), len(self.tokenizer.decode(row[:-1]))
        for s in self.strings:
            # an occurrence counts when it ends inside the last token's text
            at = text.find(s, max(0, before - len(s) + 1))
            if at != -1 and at + len(s) > before:
                return True
        return False


def _stopped(ids: torch.Tensor, eos: torch.Tensor, stop_strings: StopStrings | None) -> torch.Tensor:
    """(rows,) True where the last token is an EOS or a stop string just appeared."""
    done = torch.isin(ids[:, -1], eos)
    if stop_strings is not None:
        done |= stop_strings(ids)
    return done


# --- generate ------------------------------------------------------------------------------------------------------


def check_generate_args(*, max_new_tokens=32, do_sample=None, temperature=0.0, top_k=None, top_p=None, seed=None,
                        num_beams=1, num_return_sequences=1, length_penalty=1.0, early_stopping=False,
                        repetition_penalty=None, no_repeat_ngram_size=None, min_length=None, min_new_tokens=None,
                        cuda_graph=False, on_token=None, name=same_name) -> bool:
    """Check `generate`'s numeric and search arguments before anything runs (transformers' rules where it has
    them, and finite numbers); `InputError` names the argument as `name` spells it (the CLI: its flags).
    Returns whether the search samples."""
    check_int(max_new_tokens, name("max_new_tokens"), 1)
    if do_sample is not None and not isinstance(do_sample, bool):
        raise InputError(f"{name('do_sample')} must be True, False or None, got {do_sample!r:.60}")
    check_sampling(temperature, top_k, top_p, name)
    sample = temperature > 0 if do_sample is None else do_sample
    if sample and temperature == 0:
        raise InputError(f"{name('do_sample')}=True needs {name('temperature')} > 0 (0 is greedy)")
    check_int(seed, name("seed"), SEED_MIN, SEED_MAX, optional=True)
    check_processors(repetition_penalty, no_repeat_ngram_size, min_length, min_new_tokens, name)
    check_int(num_beams, name("num_beams"), 1)
    check_int(num_return_sequences, name("num_return_sequences"), 1)
    check_number(length_penalty, name("length_penalty"))
    # hypotheses are scored by log-prob / generated_length ** length_penalty: that power must stay a float
    if abs(length_penalty) * math.log(max_new_tokens) > MAX_LOG_SCALE:
        raise InputError(f"{name('length_penalty')} ({length_penalty!r}) is too large in magnitude for "
                         f"{name('max_new_tokens')} {max_new_tokens}: {max_new_tokens} ** length_penalty leaves the "
                         f"float range (|length_penalty| <= {MAX_LOG_SCALE / math.log(max_new_tokens):.4g})")
    if not (isinstance(early_stopping, bool) or (isinstance(early_stopping, str) and early_stopping == "never")):
        raise InputError(f"{name('early_stopping')} must be True, False or 'never', got {early_stopping!r:.60}")
    if num_beams == 1 and num_return_sequences > 1 and not sample:
        raise InputError(f"{name('num_return_sequences')} ({num_return_sequences}) > 1 needs sampling "
                         f"({name('temperature')} > 0) or beam search ({name('num_beams')} > 1): greedy decoding "
                         "returns one sequence per prompt")
    if num_return_sequences > num_beams > 1:
        raise InputError(f"{name('num_return_sequences')} ({num_return_sequences}) must be <= {name('num_beams')} "
                         f"({num_beams})")
    if num_beams > 1 and cuda_graph:
        raise InputError(f"{name('cuda_graph')} cannot run beam search ({name('num_beams')} > 1): the beams reorder "
                         "the cache rows every step")
    if on_token is not None and not callable(on_token):
        raise InputError(f"on_token must be a callable (tokens) -> None, got {type(on_token).__name__}")
    if num_beams > 1 and on_token is not None:
        raise InputError("on_token streams one token per row and step; beam search (num_beams > 1) decides its "
                         "tokens only at the end")
    return sample


def check_length(prompt_length: int, max_new_tokens: int, max_position_embeddings: int) -> None:
    """Prompt and new tokens within max_position_embeddings: refused rather than run past the positions the model
    was trained on (transformers would run on), and the cache is sized by it."""
    if prompt_length + max_new_tokens > max_position_embeddings:
        room = (f"at most {max_position_embeddings - prompt_length} new tokens fit"
                if prompt_length < max_position_embeddings else "the prompt alone fills them")
        raise InputError(f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({max_position_embeddings}): {room}")


def _token_ids(value, name: str, vocab: int) -> tuple[int, ...]:
    """An id or a list of ids (a tensor too), each in the vocabulary."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    ids = [value] if not isinstance(value, (list, tuple)) else list(value)
    for i in ids:
        check_int(i, name, 0, vocab - 1)
    return tuple(dict.fromkeys(int(i) for i in ids))  # each once, in order


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *,
             max_new_tokens: int = 32, do_sample: bool | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             num_beams: int = 1, num_return_sequences: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, repetition_penalty: float | None = None,
             no_repeat_ngram_size: int | None = None, min_length: int | None = None,
             min_new_tokens: int | None = None, eos_token_id=None, pad_token_id: int | None = None,
             stop_strings=None, tokenizer=None, return_dict_in_generate: bool = False, output_scores: bool = False,
             output_logits: bool = False, on_token=None, cuda_graph: bool = False, mm_token_type_ids=None):
    """Continue prompts; transformers' generate arguments and meanings. Returns ids (B * num_return_sequences,
    L + n) including the prompt, or a `GenerateOutput` with return_dict_in_generate.

    Search: greedy (temperature 0, the default), sampling (temperature > 0, or do_sample=True with a
    temperature; `top_k`, `top_p`, `seed`), or beam search (`num_beams` > 1, with `length_penalty` on the
    generated length and `early_stopping` True / False / "never"; sampled beams when sampling).
    `num_return_sequences` rows per prompt, in order: with sampling, independent samples; with beams, the best
    hypotheses (<= num_beams). Each sample's images and videos go with its own rows.

    Scores, in transformers' order, on float32: `repetition_penalty` (left padding does not count),
    `no_repeat_ngram_size`, `min_length` (prompt included) and `min_new_tokens` (EOS held back), then when
    sampling temperature, top-k, top-p.

    Arguments are checked before anything runs (`check_generate_args`; `InputError`): transformers' ranges
    (max_new_tokens >= 1, top_k >= 0 with 0 for none, top_p in [0, 1], ...), finite numbers that keep float32
    scores finite (temperature 0 or >= 1e-30, repetition_penalty in [1e-30, 1e30]), ints that are not bools,
    token ids inside the vocabulary. A prompt whose length + max_new_tokens
    passes max_position_embeddings is refused (transformers would run on past the trained positions), and a
    cache that would not fit the device is refused with its size (`ResourceError`) before anything is
    allocated. Non-finite logits (NaN or inf, from non-finite weights or inputs) stop generation with
    `NonFiniteError` naming the step; no token is emitted from them.

    Stopping: `eos_token_id` (an int or a list; default the config's; an empty list: never stop) and
    `stop_strings` (a string or a list; needs `tokenizer=` with `decode(ids)`). Finished rows are padded with
    `pad_token_id` (default: the config's pad, else the first EOS) and generation stops when every row has
    finished or after `max_new_tokens`.

    `on_token(tokens)` is called with each new (rows,) step, for streaming (not with beams).
    cuda_graph: replay the decode step from a CUDA graph for greedy and sampling, captured by the first call of
    a batch size and cache-length bucket and kept for later ones (`model.graphs`, a `DecodeGraphPool`); beam
    search refuses it (it reorders the cache every step). The vision tower is replayed the same way, captured
    by the first call of its images' grids (`model.vision_graphs`, a `VisionGraphPool`), and the prefill, by
    the first prompt of its shape (rows, length), into the decode step's pooled cache (`model.prefill_graphs`,
    a `PrefillGraphPool`).
    """
    sample = check_generate_args(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, num_beams=num_beams, num_return_sequences=num_return_sequences, length_penalty=length_penalty,
        early_stopping=early_stopping, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, min_length=min_length, min_new_tokens=min_new_tokens,
        cuda_graph=cuda_graph, on_token=on_token)
    length_penalty = float(length_penalty)  # an int ** int stays an int: past int64 a tensor cannot divide by it
    if cuda_graph:
        graphs.require_cuda(model.device, "generate: cuda_graph=True")
    stops = None if stop_strings is None else StopStrings(stop_strings, tokenizer)
    cfg = model.cfg
    vocab = cfg.text.vocab_size
    eos = cfg.eos_token_id if eos_token_id is None else _token_ids(eos_token_id, "eos_token_id", vocab)
    pad_id = pad_token_id if pad_token_id is not None else (
        cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
    check_int(pad_id, "pad_token_id", 0, vocab - 1)  # finished rows feed it back as their next token
    batch, length = check_token_shape(input_ids, "input_ids")
    check_length(length, max_new_tokens, cfg.text.max_position_embeddings)
    rows_per_sample = max(num_beams, num_return_sequences)
    # the cache is the largest thing generation allocates: refused with its size before anything is allocated
    model.check_cache_fits(batch * rows_per_sample, length + max_new_tokens)

    prompt = model.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                           video_grid_thw, second_per_grid_ts, mm_token_type_ids=mm_token_type_ids,
                           cuda_graph=cuda_graph)
    prompt = prompt.repeat_rows(rows_per_sample)
    ids = input_ids.to(model.device, torch.long).repeat_interleave(rows_per_sample, dim=0)
    device = model.device
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    processors = logits_processors(
        eos=eos_t, prompt_length=length, padding=prompt.pad, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, min_length=min_length, min_new_tokens=min_new_tokens,
        sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, beams=num_beams)
    generator = None
    if sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(agreed_seed(model.parallel, seed))  # under tensor parallelism the ranks draw alike
    cache = model.decode_cache(ids.shape[0], length + max_new_tokens, cuda_graph)
    logits = model.prefill(prompt, cache, cuda_graph)
    record = Record(return_dict_in_generate and output_scores, return_dict_in_generate and output_logits)
    if num_beams > 1:
        out = _beam_search(model, prompt, cache, logits, ids, processors, record, eos_t, stops, pad_id,
                           max_new_tokens, num_beams, num_return_sequences, length_penalty, early_stopping,
                           generator)
    else:
        out = _search(model.decoder(prompt, cache, cuda_graph), logits, ids, processors, record, eos_t, stops,
                      pad_id, max_new_tokens, generator, on_token)
    return out if return_dict_in_generate else out.sequences


class Record:
    """The per-step scores and raw logits, kept only when asked for."""

    def __init__(self, scores: bool, logits: bool):
        self.scores = [] if scores else None
        self.logits = [] if logits else None

    def add(self, scores: torch.Tensor, logits: torch.Tensor) -> None:
        if self.scores is not None:
            self.scores.append(scores.clone())
        if self.logits is not None:
            self.logits.append(logits.clone())

    def output(self, sequences: torch.Tensor, **beam) -> GenerateOutput:
        return GenerateOutput(sequences, None if self.scores is None else tuple(self.scores),
                              None if self.logits is None else tuple(self.logits), **beam)


def _choose(scores: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, bad): the next token of each row, and (rows,) True where the scores hold NaN or +inf (their
    maximum is then not finite). The maximum comes from the reduction greedy search makes anyway; sampling
    draws such rows from uniform weights instead (a NaN probability fails the draw, on a GPU as a device-side
    assert), and the caller raises before their tokens are used."""
    if generator is None:
        best, tokens = scores.max(-1)
        return tokens, ~torch.isfinite(best)
    bad = ~torch.isfinite(scores.amax(-1))
    probs = scores.softmax(-1).masked_fill(bad[:, None], 1.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), bad


def _non_finite(step: int, max_new_tokens: int, bad: torch.Tensor, what: str = "rows") -> NonFiniteError:
    """The error for non-finite scores at `step` (0-based) in the `bad` rows (or samples, for beams)."""
    where = bad.nonzero().flatten().tolist()
    return NonFiniteError(f"generate: the scores for new token {step + 1} of {max_new_tokens} hold NaN or infinity "
                          f"({what} {where}): the model's logits are not finite (non-finite weights or inputs) or too "
                          "large for float32; generation stopped before emitting a token from them")


def _search(step_fn, logits, ids, processors, record, eos, stops, pad_id, max_new_tokens, generator,
            on_token) -> GenerateOutput:
    """Greedy or sampled: one token per row per step (transformers' `_sample`). Each step's non-finite check is
    read back with its stopping check, in one read."""
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        # a copy: a replayed CUDA graph overwrites its logits buffer at the next step
        raw = logits.to(dtype=torch.float32, copy=True)
        scores = process(processors, ids, raw)
        record.add(scores, raw)
        tokens, bad = _choose(scores, generator)
        if len(eos):  # as transformers: finished rows are padded only when EOS ids end rows
            tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        finished_before = finished
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        finished = finished | _stopped(ids, eos, stops)
        all_finished, any_bad = torch.stack([finished.all(), (bad & ~finished_before).any()]).tolist()
        if any_bad:
            raise _non_finite(step, max_new_tokens, bad & ~finished_before)
        if on_token is not None:
            on_token(tokens)
        if step == max_new_tokens - 1 or all_finished:
            break
        logits = step_fn(tokens)
    return record.output(ids)


def _beam_search(model, prompt, cache, logits, ids, processors, record, eos, stops, pad_id, max_new_tokens,
                 num_beams, num_return_sequences, length_penalty, early_stopping, generator) -> GenerateOutput:
    """transformers 5.24's vectorized `_beam_search`, on a static cache of B * num_beams rows.

    Per step: log-softmax, processors, running score + log-prob over every beam's vocabulary; the best
    2 * num_beams candidates (more with several EOS ids, so num_beams of them can go on); candidates that stop
    become finished hypotheses scored by log-prob / generated_length ** length_penalty when among the top
    num_beams; the best num_beams others continue, and the cache rows follow them.
    """
    rows, prompt_length = ids.shape
    batch, vocab, device = rows // num_beams, logits.shape[-1], ids.device
    max_length = prompt_length + max_new_tokens
    keep = min(max(2, 1 + len(eos)) * num_beams, num_beams * vocab)  # at most every candidate there is
    among_top = torch.arange(keep, device=device) < num_beams
    running = torch.full((batch, num_beams, max_length), pad_id, dtype=torch.long, device=device)
    running[:, :, :prompt_length] = ids.view(batch, num_beams, prompt_length)
    finished_seqs = running.clone()
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = UNREACHABLE  # every beam starts equal: only the first one's candidates count
    finished_scores = torch.full((batch, num_beams), UNREACHABLE, device=device)
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
    running_origin = torch.full((batch, num_beams, max_new_tokens), -1, dtype=torch.long, device=device)
    finished_origin = running_origin.clone()
    batch_offset = torch.arange(batch, device=device).view(-1, 1) * num_beams
    cur_len, flat = prompt_length, ids
    while True:
        raw = logits.to(dtype=torch.float32, copy=True)
        log_probs = process(processors, flat, torch.log_softmax(raw, dim=-1))
        record.add(log_probs, raw)
        accumulated = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)

        # NaN or +inf in a sample's scores make its maximum not finite (read with the stopping checks below)
        bad = ~torch.isfinite(accumulated.amax(-1))
        top_scores, source_beam, top_tokens = _candidates(accumulated, keep, vocab, generator, bad)
        top_seqs = running.gather(1, source_beam[:, :, None].expand(-1, -1, max_length))
        top_seqs[:, :, cur_len] = top_tokens
        top_origin = running_origin.gather(1, source_beam[:, :, None].expand(-1, -1, max_new_tokens))
        top_origin[:, :, cur_len - prompt_length] = source_beam + batch_offset
        stopped = _stopped(top_seqs[:, :, :cur_len + 1].reshape(batch * keep, -1), eos, stops)
        stopped = stopped.view(batch, keep) | (cur_len + 1 >= max_length)

        # the best num_beams continuations that did not stop run on
        next_scores = top_scores + stopped.float() * UNREACHABLE
        chosen = torch.topk(next_scores, num_beams)[1]
        running = top_seqs.gather(1, chosen[:, :, None].expand(-1, -1, max_length))
        running_scores = next_scores.gather(1, chosen)
        running_origin = top_origin.gather(1, chosen[:, :, None].expand(-1, -1, max_new_tokens))

        # stopped candidates among the top num_beams join the finished hypotheses if they beat them
        just_finished = stopped & among_top[None, :]
        penalized = top_scores / ((cur_len + 1 - prompt_length) ** length_penalty)
        full = is_finished.all(-1, keepdim=True) & (early_stopping is True)
        penalized = penalized + full.float() * UNREACHABLE + (~can_improve).float() * UNREACHABLE
        penalized = penalized + (~just_finished) * UNREACHABLE
        best = torch.topk(torch.cat([finished_scores, penalized], 1), num_beams)[1]
        finished_seqs = _take(torch.cat([finished_seqs, top_seqs], 1), best)
        finished_scores = _take(torch.cat([finished_scores, penalized], 1), best)
        finished_origin = _take(torch.cat([finished_origin, top_origin], 1), best)
        is_finished = _take(torch.cat([is_finished, just_finished], 1), best)

        cur_len += 1
        can_improve = _can_improve(can_improve, running_scores, finished_scores, is_finished, cur_len - prompt_length,
                                   max_new_tokens, early_stopping, length_penalty)
        all_finished, improvable, all_stopped, any_bad = torch.stack(
            [is_finished.all(), can_improve.any(), stopped.all(), bad.any()]).tolist()  # one read back
        if any_bad:
            raise _non_finite(cur_len - 1 - prompt_length, max_new_tokens, bad, "samples")
        open_beam = not (all_finished and early_stopping is True)
        if not (improvable and open_beam and not all_stopped):
            break
        # each running beam continues from the row it was chosen from
        source_rows = running_origin[:, :, cur_len - 1 - prompt_length].reshape(-1)
        cache.reorder(source_rows)
        prompt.deltas = prompt.deltas.index_select(0, source_rows)
        prompt.pad = None if prompt.pad is None else prompt.pad.index_select(0, source_rows)
        flat = running[:, :, :cur_len].reshape(rows, cur_len)
        logits = model.decode_step(flat[:, -1], prompt, cache)

    finished_seqs = finished_seqs[:, :num_return_sequences].reshape(batch * num_return_sequences, -1)
    finished_scores = finished_scores[:, :num_return_sequences].reshape(-1)
    finished_origin = finished_origin[:, :num_return_sequences].reshape(batch * num_return_sequences, -1)
    generated = int((finished_origin >= 0).sum(1).max())
    return record.output(finished_seqs[:, :prompt_length + generated],
                         sequences_scores=finished_scores if record.scores is not None else None,
                         beam_indices=finished_origin[:, :generated])


def _candidates(accumulated: torch.Tensor, keep: int, vocab: int, generator: torch.Generator | None,
                bad: torch.Tensor):
    """(scores, source beam, token), each (B, keep): the best `keep` continuations over all beams of a sample,
    best first; sampled without replacement from their softmax when sampling (samples whose scores are `bad`,
    not finite, from uniform weights: a NaN probability fails the draw; the caller raises for them)."""
    if generator is None:
        scores, flat = torch.topk(accumulated, keep)
    else:
        probs = accumulated.softmax(-1).masked_fill(bad[:, None], 1.0)
        # Drawn without replacement: a sample whose top-k / top-p left fewer than `keep` candidates with any
        # probability gives the others the smallest weight (taken last, their scores -inf or unreachable) where
        # a plain draw would fail. Other samples' weights are untouched.
        too_few = (probs > 0).sum(-1, keepdim=True) < keep
        probs = torch.where(too_few & (probs == 0), torch.finfo(probs.dtype).tiny, probs)
        flat = torch.multinomial(probs, keep, generator=generator)
        scores, order = accumulated.gather(1, flat).sort(dim=-1, descending=True)
        flat = flat.gather(1, order)
    return scores, flat // vocab, flat % vocab


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) gathered along K at index (B, k)."""
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))


def _can_improve(can_improve, running_scores, finished_scores, is_finished, generated, max_new_tokens,
                 early_stopping, length_penalty) -> torch.Tensor:
    """(B, 1): whether the best running beam could still beat the worst finished hypothesis (transformers'
    `_check_early_stop_heuristic`). Its best length is the current one, or with early_stopping="never" and a
    positive length penalty (longer is better) the longest allowed."""
    best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else generated
    best_running = running_scores[:, :1] / (best_length ** length_penalty)
    worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], UNREACHABLE)
    return can_improve & (best_running > worst_finished).any(-1, keepdim=True)
