"""`qvl generate` end to end on a tiny random checkpoint written here (save_pretrained + tokenizer.json).

It must run, stream the answer piece by piece, print the statistics, and generate exactly the tokens
`model.generate` gives for the processor's inputs. User mistakes end with one error line and exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qvl
from qvl.cli import main
from qvl.config import PRESETS
from qvl.generate_cli import TextStream, run_generate
from qvl.processing import Processor
from tests.processing.helpers import textured, write_tokenizer

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("tokenizers")
TINY = PRESETS["tiny"]
NEW_TOKENS = 10
REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_ckpt")
    model = qvl.from_config("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than init so greedy decoding does not repeat one token
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if "embed" in name else 0.15, generator=g)
    qvl.save_pretrained(model, d)
    write_tokenizer(d, TINY)
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 28 * 28 * 16, "patch_size": 14, "temporal_patch_size": 2,
         "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}))
    return d


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    paths = []
    for i, (h, w) in enumerate([(61, 97), (150, 40)]):
        p = d / f"img{i}.{'png' if i == 0 else 'jpg'}"
        PIL.fromarray(textured(h, w, seed=i)).save(p)
        paths.append(str(p))
    frames = d / "frames"
    frames.mkdir()
    for i in range(5):
        PIL.fromarray(textured(50, 70, seed=9, frame=i)).save(frames / f"{i:03d}.png")
    return {"images": paths, "video": str(frames)}


def reference(ckpt, prompt, images=(), videos=(), **gen):
    model = qvl.from_pretrained(ckpt)
    processor = Processor.from_pretrained(ckpt, model.cfg)
    inputs = processor(prompt, images=list(images), videos=list(videos))
    ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, **gen)
    return model, processor, inputs, ids[0, inputs["input_ids"].shape[1]:].tolist()


def test_generate_streams_and_matches_model_generate(ckpt, media, capsys):
    prompt = "Compare the two pictures."
    model, processor, inputs, expected = reference(ckpt, prompt, media["images"])
    assert len(expected) >= 4 and len(set(expected)) > 1

    written = []
    result = run_generate(model, processor, prompt, media["images"], max_new_tokens=NEW_TOKENS, write=written.append)
    assert result.tokens == expected
    assert result.text == processor.decode(expected)
    assert len(written) > 1 and "".join(written) == result.text  # streamed in pieces, nothing lost
    assert result.prompt_tokens == inputs["input_ids"].shape[1]

    rc = main(["generate", "--model", str(ckpt), "--image", media["images"][0], "--image", media["images"][1],
               "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), "--backends", "eager"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == result.text + "\n"
    assert "prefill" in err and "tokens/s" in err and "peak memory" in err and "MiB" in err


def test_generate_with_video_and_sampling(ckpt, media, capsys):
    prompt = "What is happening in this video?"
    model, processor, inputs, expected = reference(ckpt, prompt, media["images"][:1], [media["video"]],
                                                   temperature=0.8, seed=3)
    assert inputs["second_per_grid_ts"].tolist() == [1.0]  # frames without a rate: taken at 2 fps
    result = run_generate(model, processor, prompt, media["images"][:1], [media["video"]],
                          max_new_tokens=NEW_TOKENS, temperature=0.8, seed=3)
    assert result.tokens == expected
    rc = main(["generate", "--model", str(ckpt), "--image", media["images"][0], "--video", media["video"],
               "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0.8", "--seed", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == result.text + "\n"


def answers(model, processor, inputs, stop_ids, **gen):
    """Each returned sequence's text, as `qvl generate` prints it: up to the first stop id."""
    ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=list(stop_ids), **gen)
    texts = []
    for row in ids[:, inputs["input_ids"].shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        texts.append(processor.decode(row[:end]))
    return texts


@pytest.mark.parametrize(("flags", "gen"), [
    (["--num-beams", "3", "--num-return-sequences", "2"], {"num_beams": 3, "num_return_sequences": 2}),
    (["--temperature", "0.9", "--seed", "4", "--top-k", "20", "--top-p", "0.8", "--repetition-penalty", "1.3",
      "--num-return-sequences", "2"],
     {"temperature": 0.9, "seed": 4, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.3, "num_return_sequences": 2}),
])
def test_search_flags_reach_generate_and_print_every_answer(ckpt, media, capsys, flags, gen):
    prompt = "Describe the picture."
    model, processor, inputs, _ = reference(ckpt, prompt, media["images"][:1])
    expected = answers(model, processor, inputs, set(processor.stop_ids), **gen)
    assert len(expected) == 2
    rc = main(["generate", "--model", str(ckpt), "--image", media["images"][0], "--prompt", prompt,
               "--max-new-tokens", str(NEW_TOKENS), *flags])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == "".join(f"[{i + 1}] {text}\n" for i, text in enumerate(expected))


def test_stop_flag_ends_the_answer_at_the_text(ckpt, media, capsys):
    prompt = "Compare the two pictures."
    model, processor, inputs, full = reference(ckpt, prompt, media["images"])
    whole = processor.decode(full)
    stop = processor.decode(full[2:4])  # text the answer reaches after a few tokens
    assert stop and whole.find(stop) + len(stop) < len(whole)
    rc = main(["generate", "--model", str(ckpt), "--image", media["images"][0], "--image", media["images"][1],
               "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), "--stop", stop, "--stop", "unseen text"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == whole[: whole.find(stop) + len(stop)] + "\n"
    assert out.rstrip("\n").endswith(stop)


def test_generate_on_a_preset(media, capsys):
    rc = main(["generate", "--model", "tiny", "--image", media["images"][0], "--prompt", "hi",
               "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "decode" in err


def test_text_stream_holds_back_partial_characters():
    from qvl.processing import QwenTokenizer

    tok = QwenTokenizer.synthetic(TINY)
    pieces = []
    stream = TextStream(tok.decode, pieces.append)
    for t in tok.encode("a€b"):  # '€' is three byte tokens
        stream.push(t)
    assert stream.finish() == "a€b"
    assert pieces == ["a", "€", "b"]


# --- user mistakes: one line, exit code 2, no traceback ----------------------------------------------------------


def run_cli(capsys, *args):
    rc = main(["generate", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, err


def test_errors(ckpt, media, tmp_path, capsys):
    base = ["--prompt", "hi", "--max-new-tokens", "2"]

    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(ckpt, no_tok)
    (no_tok / "tokenizer.json").unlink()
    rc, err = run_cli(capsys, "--model", str(no_tok), *base)
    assert rc == 2 and "has no tokenizer.json" in err

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(ckpt / name, no_weights / name)
    rc, err = run_cli(capsys, "--model", str(no_weights), *base)
    assert rc == 2 and "no weights" in err

    rc, err = run_cli(capsys, "--model", "not-a-model", *base)
    assert rc == 2 and "neither a checkpoint directory nor a preset" in err

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    rc, err = run_cli(capsys, "--model", str(ckpt), "--image", str(corrupt), *base)
    assert rc == 2 and "qvl: error: cannot read image" in err

    rc, err = run_cli(capsys, "--model", str(ckpt), "--image", str(tmp_path / "missing.png"), *base)
    assert rc == 2 and "image file not found" in err

    thin = tmp_path / "thin.png"
    PIL.fromarray(np.zeros((10, 1500, 3), np.uint8)).save(thin)
    rc, err = run_cli(capsys, "--model", str(ckpt), "--image", str(thin), "--max-pixels", "3136", *base)
    assert rc == 2 and "cannot be resized within max_pixels=3136" in err

    empty = tmp_path / "empty_video"
    empty.mkdir()
    rc, err = run_cli(capsys, "--model", str(ckpt), "--video", str(empty), *base)
    assert rc == 2 and "no frame images" in err

    rc, err = run_cli(capsys, "--model", str(ckpt), "--backends", "nonsense", *base)
    assert rc == 2 and "error" in err

    rc, err = run_cli(capsys, "--model", str(ckpt), "--cuda-graph", *base)
    assert rc == 2 and "--cuda-graph needs a CUDA device (--device cuda); got --device cpu" in err

    for flags, message in [
        (["--num-beams", "2", "--num-return-sequences", "3"], "--num-return-sequences (3) must be <= --num-beams (2)"),
        (["--num-return-sequences", "2"], "--num-return-sequences (2) > 1 needs sampling (--temperature > 0)"),
        (["--top-p", "1.5"], "--top-p must be in [0, 1], got 1.5"),
        (["--top-p", "nan"], "--top-p must be a finite number in [0, 1], got nan"),
        (["--top-k", "-1"], "--top-k must be an integer >= 0 (0: no top-k), got -1"),
        (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 is greedy), got nan"),
        (["--temperature", "inf"], "--temperature must be a finite number >= 0 (0 is greedy), got inf"),
        (["--temperature", "-0.5"], "--temperature must be >= 0 (0 is greedy), got -0.5"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be in [1e-30, 1e+30] (1.0: none; beyond, float32 "
                                        "scores overflow), got 0.0"),
        (["--repetition-penalty=-inf"], "--repetition-penalty must be a finite number in [1e-30, 1e+30]"),
        (["--num-beams", "0"], "--num-beams must be an integer >= 1, got 0"),
        (["--num-beams", "2", "--cuda-graph"], "--cuda-graph cannot run beam search (--num-beams > 1)"),
        (["--stop", ""], "--stop needs a non-empty text"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
        (["--max-new-tokens", "-5"], "--max-new-tokens must be an integer >= 1, got -5"),
        (["--max-new-tokens", "100000"],
         "prompt (25 tokens) + max_new_tokens (100000) exceeds max_position_embeddings (4096): at most 4071 new "
         "tokens fit"),
        (["--seed", str(2**64)], f"--seed must be an integer in [{-(2**63)}, {2**64 - 1}], got {2**64}"),
        (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text: the byte 0xe9, which is not UTF-8, at "
                                     "character 3"),
        (["--system", "\ud800x"], "--system is not valid UTF-8 text: a lone surrogate U+D800, at character 0"),
    ]:
        rc, err = run_cli(capsys, "--model", str(ckpt), *base, *flags)
        assert rc == 2 and f"qvl: error: {message}" in err and len(err.strip().splitlines()) == 1, err
    for flags in (["--top-k", "nan"], ["--num-beams", "1.5"], ["--max-new-tokens", "1e12"]):  # argparse's own
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "--model", str(ckpt), *base, *flags])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("qvl: error: generate: argument") and "invalid int value" in err
        assert len(err.strip().splitlines()) == 1


def test_a_prompt_that_is_not_utf8_on_the_command_line(tmp_path):
    """Bytes that are not UTF-8 in argv reach Python as lone surrogates (surrogateescape): one error line, exit
    2, nothing loaded."""
    proc = subprocess.run([sys.executable, "-m", "qvl", "generate", "--model", "tiny", "--prompt", b"caf\xe9 \xff"],
                          capture_output=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO},
                          timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert err == "qvl: error: --prompt is not valid UTF-8 text: the byte 0xe9, which is not UTF-8, at character 3\n"
