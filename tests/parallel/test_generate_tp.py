"""`qvl generate --tp N`: two local workers print exactly the answer one process prints (rank 0 alone writes), an
external torchrun's ranks do too, and a degree that cannot be used ends with one error line and exit 2 before
anything is loaded or started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qvl
from qvl.cli import main
from qvl.config import PRESETS
from qvl.errors import ConfigError
from qvl.generate_cli import run_generate
from qvl.parallel import check_degree
from qvl.processing import Processor
from tests.processing.helpers import textured, write_tokenizer

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("tokenizers")
TINY = PRESETS["tiny"]
REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny checkpoint, an image, and the flags of one `qvl generate` call over them. The weights are larger than
    init so that the greedy answer is not one token repeated (checked): an answer worth comparing."""
    d = tmp_path_factory.mktemp("tp")
    model = qvl.from_config("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if "embed" in name else 0.3, generator=g)
    qvl.save_pretrained(model, d / "ckpt")
    write_tokenizer(d / "ckpt", TINY)
    (d / "ckpt" / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 28 * 28 * 16, "patch_size": 14, "temporal_patch_size": 2,
         "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}))
    PIL.fromarray(textured(61, 97)).save(d / "img.png")
    prompt = "What is in this picture?"
    processor = Processor.from_pretrained(d / "ckpt", TINY)
    tokens = run_generate(model, processor, prompt, [str(d / "img.png")], max_new_tokens=4).tokens
    assert len(set(tokens)) > 1, tokens
    return ["generate", "--model", str(d / "ckpt"), "--image", str(d / "img.png"), "--prompt", prompt,
            "--max-new-tokens", "4"]


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "PYTHONIOENCODING": "utf-8"})


@pytest.mark.parametrize("vision", ["data", "tensor"])
def test_two_local_workers_print_the_answer_one_process_prints(case, capsys, vision):
    assert main([*case, "--tp", "1"]) == 0
    expected = capsys.readouterr().out
    proc = run("-m", "qvl", *case, "--tp", "2", "--vision-parallel", vision)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert proc.stdout.decode() == expected  # written once: by rank 0
    assert err.count("peak memory") == 1 and "rank 0 of 2)" in err


def test_an_external_torchruns_ranks_print_the_sampled_answer_once(case, capsys):
    sampled = [*case, "--temperature", "1.0", "--seed", "5"]  # the same seed: the same draws on every rank
    assert main([*sampled, "--tp", "1"]) == 0
    expected = capsys.readouterr().out
    proc = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qvl", *sampled,
               "--tp", "2")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == expected


@pytest.mark.parametrize("tp", ["0", "-2", "x", "1.5"])
def test_a_tp_that_is_not_a_positive_integer(tp, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "tiny", "--prompt", "hi", "--tp", tp])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err == f"qvl: error: generate: argument --tp: must be a positive integer, got '{tp}' (see qvl generate " \
                  "--help)\n"


def test_a_degree_that_cannot_split_the_model(capsys):
    with pytest.raises(ConfigError) as refused:
        check_degree(TINY, 3)
    assert main(["generate", "--model", "tiny", "--prompt", "hi", "--tp", "3"]) == 2
    assert capsys.readouterr().err == f"qvl: error: {refused.value}\n"


@pytest.mark.parametrize("tp", ["1", "4"])
def test_under_torchrun_tp_must_be_its_world_size(tp, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["generate", "--model", "tiny", "--prompt", "hi", "--tp", tp]) == 2
    assert capsys.readouterr().err == (f"qvl: error: --tp {tp} but torchrun started WORLD_SIZE 2 processes: they "
                                       "must be equal\n")


def test_backends_are_refused_as_in_one_process(capsys):
    """Checked before the workers start: a worker's error would end the run with exit 1, not 2."""
    argv = ["generate", "--model", "tiny", "--prompt", "hi", "--backends", "bogus"]
    assert main([*argv, "--tp", "1"]) == 2
    one = capsys.readouterr().err
    assert main([*argv, "--tp", "2"]) == 2
    assert capsys.readouterr().err == one and one.startswith("qvl: error: backends: unknown backend 'bogus'")
