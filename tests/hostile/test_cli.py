"""Hostile use of the `qvl` command, `qvl ablate` and `qvl report`: every mistake ends in one stderr line
`qvl: error: ...` with exit status 2 (what the user gave) or 1 (the run itself failed), never a traceback unless
QVL_DEBUG=1; a full disk mid-run keeps the finished variants and leaves no temporary file; `qvl report` refuses
results of another schema, nested too deeply or not UTF-8 with a `qvl.ResultsError` naming the file.

A few cases run `python -m qvl` for real (each start imports torch: seconds); the rest call `qvl.cli.main`.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import errno
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvl import cli
from qvl.ablate import compare_runs, format_table, load_config, load_results, parse_config, run_ablation
from qvl.ablate.report import FORMAT, render_markdown
from qvl.cli import main
from qvl.errors import ConfigError, ResultsError
from qvl.processing import OptionalDependencyError
from tests.ablate.test_runner import interrupt_second_measurement

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# three tiny variants, one repeat, no warm-up: a whole run takes a second or two on a CPU
SMALL = """
name = "{name}"
reference = "eager"
[workload]
prompt_tokens = 6
decode_tokens = 2
[run]
warmup = 0
repeats = 1
[[variants]]
name = "eager"
[[variants]]
name = "second"
backends = "attention=eager"
[[variants]]
name = "third"
backends = "norm=eager"
"""


def write_config(tmp_path, name: str = "small", text: str | None = None):
    path = tmp_path / f"{name}.toml"
    path.write_text(SMALL.format(name=name) if text is None else text)
    return path


def cli_run(capsys, *argv) -> tuple[int, str, str]:
    """`qvl ARGV` in this process: (exit status, stdout, stderr); argparse's exit counts as a status."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def one_error(status: int, err: str, expected: int, *words: str) -> str:
    """stderr is exactly one `qvl: error:` line holding `words`, and the status is `expected`."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvl: error: "), err
    assert "Traceback" not in err
    assert status == expected, (status, err)
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def tmp_files(root) -> list[str]:
    return glob.glob(os.path.join(str(root), "**", "*.tmp*"), recursive=True)


# --- the command itself: real processes ---------------------------------------------------------------------------


def qvl_process(*args, debug: bool = False, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "QVL_DEBUG"}
    if debug:
        env["QVL_DEBUG"] = "1"
    return subprocess.Popen([sys.executable, "-m", "qvl", *map(str, args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def finish(p) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def test_process_usage_and_runtime_errors_are_one_line_and_qvl_debug_shows_the_traceback(tmp_path):
    deep = tmp_path / "results.json"
    deep.write_text("[" * 100_000)
    started = [qvl_process("ablate", "--repeats", "0"), qvl_process("report", deep),
               qvl_process("report", deep, debug=True)]  # run side by side: each spends seconds importing torch
    (usage, out, err), (runtime, _, err2), (debug, _, err3) = map(finish, started)
    one_error(usage, err, 2, "ablate: argument --repeats: must be an integer >= 1, got 0")
    assert out == ""
    one_error(runtime, err2, 2, f"{deep}: ", "nested too deeply")
    assert debug == 1 and "Traceback (most recent call last)" in err3 and "ResultsError" in err3


def test_process_reader_going_away_is_no_error(tmp_path):
    """`qvl report DIR | head -1`: the closed pipe ends the command quietly, no traceback, no 'Exception ignored'."""
    (tmp_path / "results.json").write_text(json.dumps(TEMPLATE))
    p = qvl_process("report", tmp_path, "--no-write")
    p.stdout.close()  # before qvl writes anything: all of its output meets a closed pipe
    err = p.stderr.read()
    p.wait(timeout=300)
    assert err == "" and p.returncode == 1


# --- argument errors: every subcommand -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    ([], ["the following arguments are required: command"]),
    (["nope"], ["invalid choice: 'nope'"]),
    (["backends", "--verbose"], ["unrecognized arguments: --verbose"]),
    (["demo", "--new-tokens", "0"], ["demo: argument --new-tokens: must be an integer >= 1, got 0"]),
    (["demo", "--new-tokens", "many"], ["--new-tokens: must be an integer >= 1, got 'many'"]),
    (["demo", "--preset", "huge"], ["demo: argument --preset: invalid choice: 'huge'"]),
    (["demo", "--device", "tpu"], ["--device: must be auto, cpu, cuda or cuda:N; got 'tpu'"]),
    (["ablate", "--repeats", "0"], ["ablate: argument --repeats: must be an integer >= 1, got 0"]),
    (["ablate", "--repeats", "-3"], ["--repeats: must be an integer >= 1, got -3"]),
    (["ablate", "--repeats", "1.5"], ["--repeats: must be an integer >= 1, got '1.5'"]),
    (["ablate", "--warmup", "-1"], ["ablate: argument --warmup: must be an integer >= 0, got -1"]),
    (["ablate", "--dtype", "float8"], ["--dtype: invalid choice: 'float8'"]),
    (["ablate", "--preset", "70b"], ["--preset: invalid choice: '70b'"]),
    (["ablate", "--device", "gpu"], ["--device: must be auto, cpu, cuda or cuda:N; got 'gpu'"]),
    (["ablate", "a.toml", "b.toml"], ["unrecognized arguments: b.toml"]),
    (["report"], ["report: the following arguments are required: DIR"]),
    (["generate", "--prompt", "hi"], ["generate: the following arguments are required: --model"]),
    (["generate", "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "x"], ["--max-new-tokens", "'x'"]),
])
def test_argument_errors(capsys, argv, words):
    status, out, err = cli_run(capsys, *argv)
    line = one_error(status, err, 2, *words)
    assert line.endswith("--help)") and out == ""


# --- bad values and missing files ----------------------------------------------------------------------------------


def test_ablate_config_files(tmp_path, capsys):
    """A config that is missing, a folder, not UTF-8, not TOML, nested absurdly deep, or whose [run] repeats /
    warmup break their minimum: ConfigError (exit 2), before anything is built."""
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'description = "caf\xe9"\n' + SMALL.format(name="latin1").encode())
    cases = {
        tmp_path / "missing.toml": "no such file",
        folder: "is a directory",
        latin1: "not UTF-8 (byte 0xe9 at offset 18)",
        write_config(tmp_path, "broken", "name = [1, 2\n"): "not valid TOML",
        write_config(tmp_path, "deep", "x = " + "[" * 5000): "nested too deeply",
        write_config(tmp_path, "repeats", SMALL.format(name="r").replace("repeats = 1", "repeats = 0")):
            "[run] repeats: must be an integer >= 1, got 0",
        write_config(tmp_path, "warmup", SMALL.format(name="w").replace("warmup = 0", "warmup = -1")):
            "[run] warmup: must be an integer >= 0, got -1",
        write_config(tmp_path, "boolean", SMALL.format(name="b").replace("repeats = 1", "repeats = true")):
            "[run] repeats: must be an integer >= 1, got true",
    }
    for path, words in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert str(path) in str(caught.value) and words in str(caught.value)
        status, _, err = cli_run(capsys, "ablate", path, "--check")
        one_error(status, err, 2, str(path), words)
    assert not (tmp_path / "results").exists()


def test_ablate_api_repeats_and_warmup_overrides(tmp_path):
    """The same rule as the config keys, for AblationRun's own arguments (the CLI's --repeats 0 no longer falls
    back silently to the config's value)."""
    config = parse_config(SMALL.format(name="api"))
    for kwargs, words in [({"repeats": 0}, "repeats: must be an integer >= 1, got 0"),
                          ({"warmup": -1}, "warmup: must be an integer >= 0, got -1"),
                          ({"repeats": 2.0}, "repeats: must be an integer >= 1, got 2.0"),
                          ({"device": "cuda:99"}, "cuda:99"), ({"device": "npu"}, "device: must be auto, cpu")]:
        with pytest.raises(ConfigError, match=words):
            run_ablation(config, results_root=str(tmp_path), quiet=True, **kwargs)
    assert os.listdir(tmp_path) == []  # refused before any folder was made


@pytest.mark.parametrize("argv, words", [
    (["ablate", "CONFIG", "--device", "cuda:99", "--quiet"], ["cuda:99"]),  # no GPU, or not that many
    (["ablate", "CONFIG", "--preset", "tiny_qwen2_vl", "--check"], []),  # a valid override: not an error
    (["report", "MISSING"], ["MISSING", ": no such file"]),
    (["report", "TMP", "--out", "CONFIG"], ["cannot create the folder", "CONFIG"]),
    (["demo", "--device", "cuda:99"], ["cuda:99"]),
    (["generate", "--model", "MISSING", "--prompt", "hi"], ["--model", "MISSING"]),
    (["generate", "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["generate", "--model", "tiny", "--prompt", "hi", "--top-p", "nan"], ["--top-p"]),
])
def test_bad_values_and_missing_files(tmp_path, capsys, argv, words):
    config = write_config(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps(TEMPLATE))
    names = {"CONFIG": str(config), "MISSING": str(tmp_path / "missing"), "TMP": str(tmp_path)}
    argv = [names.get(a, a) for a in argv]
    status, _, err = cli_run(capsys, *argv)
    if not words:
        assert status == 0 and err == ""
        return
    one_error(status, err, 2, *(names.get(w, w) for w in words))
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("error, status, words", [
    (OptionalDependencyError("decoding videos needs PyAV: pip install av"), 1, ["needs PyAV: pip install av"]),
    (RecursionError("maximum recursion depth exceeded"), 1, ["nested too deeply", "maximum recursion depth"]),
    (UnicodeDecodeError("utf-8", b"caf\xe9", 3, 4, "invalid continuation byte"), 2,
     ["not utf-8 text: byte 0xe9 at offset 3 (invalid continuation byte)"]),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 1, ["No space left on device"]),
    (FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/x/y"), 2, ["/x/y: No such file or directory"]),
    (MemoryError(), 1, ["out of memory"]),
    (KeyError("oops"), 1, ["internal error (KeyError): 'oops'; QVL_DEBUG=1 shows the traceback"]),
])
def test_runtime_error_kinds(capsys, monkeypatch, error, status, words):
    """What a command can raise, through main(): the status and the one line (QVL_DEBUG=1: the exception)."""
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_backends", fail)
    got, _, err = cli_run(capsys, "backends")
    one_error(got, err, status, *words)
    monkeypatch.setenv("QVL_DEBUG", "1")
    with pytest.raises(type(error)):
        main(["backends"])


# --- the results folder ---------------------------------------------------------------------------------------------


def test_results_folder_is_a_file_or_under_one(tmp_path, capsys):
    config = write_config(tmp_path)
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    for root in (blocker, blocker / "inside"):
        status, _, err = cli_run(capsys, "ablate", config, "--results-dir", root, "--quiet")
        one_error(status, err, 2, "cannot create the run folder", f"under the results folder {root}",
                  "Not a directory")
    assert blocker.read_text() == "not a folder" and sorted(os.listdir(tmp_path)) == ["results", "small.toml"]


@contextlib.contextmanager
def unwritable(folder):
    """`folder` made unwritable: mode 0o500; for root, whom modes do not bind, the immutable flag (chattr +i),
    where this machine lets it be set, else the test is skipped."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", folder], capture_output=True).returncode:
        pytest.skip("running as root, where chmod does not bind, and chattr +i is not available")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", folder], check=True)


def test_results_folder_unwritable(tmp_path, capsys):
    config = write_config(tmp_path)
    root = tmp_path / "results"
    root.mkdir()
    with unwritable(root):
        status, _, err = cli_run(capsys, "ablate", config, "--results-dir", root, "--quiet")
    line = one_error(status, err, 2, f"cannot create the run folder {root}", f"under the results folder {root}")
    assert line.endswith(("Permission denied", "Operation not permitted")) and os.listdir(root) == []


class NoSpace:
    """A file on a full disk: it exists, but no byte fits."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.fixture
def disk(monkeypatch, tmp_path):
    """The disk under tmp_path: `disk.full = n` makes the next n files opened for writing there (None: all of
    them) fail with ENOSPC on their first write; `disk.only` limits that to names ending so."""

    state = types.SimpleNamespace(full=0, only=(), refused=[])
    real_open, root = builtins.open, str(tmp_path)

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        name = os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
        writing = any(c in mode for c in "wax") and name.startswith(root)
        target = re.sub(r"\.tmp\d*$", "", name)  # a file written beside its target, then renamed over it
        if (writing and (state.full is None or state.full > 0)
                and (not state.only or target.endswith(tuple(state.only)))):
            if state.full is not None:
                state.full -= 1
            state.refused.append(name)
            return NoSpace(f)
        return f

    monkeypatch.setattr(builtins, "open", open_)
    return state


def test_disk_fills_up_for_good_mid_run(tmp_path, capsys, monkeypatch, disk):
    """From the second variant on nothing can be written: the error says so, the results.json written after
    the first variant is intact, no temporary file is left."""
    interrupt_second_measurement(monkeypatch, lambda: setattr(disk, "full", None))
    root = tmp_path / "results"
    status, _, err = cli_run(capsys, "ablate", write_config(tmp_path), "--results-dir", root, "--quiet")
    (run,) = glob.glob(str(root / "small" / "*"))
    file = os.path.join(run, "results.json")
    one_error(status, err, 1, f"cannot write {file}: No space left on device", "2 of 3 variants measured",
              "could not be updated either (No space left on device), the one written last is intact")
    assert any(r.startswith(file) for r in disk.refused) and tmp_files(root) == []
    disk.full = 0
    results, _ = load_results(run)
    assert [v["status"] for v in results["variants"]] == ["ok", "running", "pending"]
    assert results["variants"][0]["figures"]["prefill_ms"]["n"] == 1


def test_disk_full_for_a_moment_marks_the_run_failed(tmp_path, monkeypatch, disk):
    """One write fails (space comes back: a log rotated): the run stops there and results.json, written again,
    marks it failed with every finished variant kept (API: the OSError, errno ENOSPC)."""
    interrupt_second_measurement(monkeypatch, lambda: setattr(disk, "full", 1))
    config = parse_config(SMALL.format(name="moment"), path=str(tmp_path / "moment.toml"))
    with pytest.raises(OSError) as caught:
        run_ablation(config, results_root=str(tmp_path / "results"), quiet=True)
    assert caught.value.errno == errno.ENOSPC
    assert "the run stopped with 2 of 3 variants measured" in str(caught.value)
    assert "marks it failed and keeps them" in str(caught.value)
    (run,) = glob.glob(str(tmp_path / "results" / "moment" / "*"))
    results, _ = load_results(run)
    assert results["status"] == "failed" and "No space left on device" in results["error"]
    # the second variant was measured before its results could not be written: kept
    assert [v["status"] for v in results["variants"]] == ["ok", "ok", "pending"]
    assert results["finished"] and tmp_files(tmp_path) == []


def test_disk_full_for_the_report(tmp_path, capsys, disk):
    """Every variant measured, then neither plot.png nor report.md fits: the run is marked failed in results.json
    (which still fits), the measurements kept, no partial plot or report left."""
    disk.full, disk.only = None, ("plot.png", "report.md")
    root = tmp_path / "results"
    status, _, err = cli_run(capsys, "ablate", write_config(tmp_path), "--results-dir", root, "--quiet")
    (run,) = glob.glob(str(root / "small" / "*"))
    one_error(status, err, 1, f"cannot write {run}/report.md: No space left on device", "3 of 3 variants measured",
              "marks it failed")
    assert len(disk.refused) == 2 and tmp_files(root) == [] and sorted(os.listdir(run)) == ["results.json"]
    results, _ = load_results(run)
    assert results["status"] == "failed" and "report.md" in results["error"]
    assert [v["status"] for v in results["variants"]] == ["ok", "ok", "ok"]
    disk.full = 0
    status, out, _ = cli_run(capsys, "report", run)  # space again: the report renders from what was kept
    assert status == 0 and "small" in out and "failed: OSError: cannot write" in out
    assert sorted(os.listdir(run)) == ["plot.png", "report.md", "results.json"]


# --- qvl report on what is not a results.json -----------------------------------------------------------------------

# every field the renderers read, in both modes' shapes (a train run reads step_ms, loss, ...; the rest "-")
TIMING = {"median": 2.0, "min": 1.0, "max": 4, "n": 3}
TEMPLATE = {
    "format": FORMAT, "name": "fuzz", "description": "a stored run", "status": "complete", "error": None,
    "started": "2026-01-01T00:00:00", "finished": None, "results_dir": "x", "config_path": None, "reference": "eager",
    "config": {"model": {"preset": "tiny", "dtype": "float32", "overrides": {"vision.window_size": 56}}},
    "run": {"device": "cpu", "repeats": 3, "warmup": 1, "mode": "generate", "train_steps": 2, "learning_rate": 1e-4},
    "environment": {"device_name": "cpu", "timer": "time.perf_counter", "python": "3.11", "git": {"commit": "abc",
                                                                                                  "dirty": True}},
    "workload": {"batch_size": 1, "prompt_length": 30, "text_tokens": 6, "vision_tokens": 24, "decode_tokens": 3,
                 "image_grids_thw": [[1, 8, 12]], "video_grids_thw": []},
    "variants": [
        {"name": "eager", "status": "ok", "reference": True, "backends": "eager", "description": "",
         "requested": {"dtype": "float32", "overrides": {}, "gradient_checkpointing": True},
         "figures": {"vision_ms": TIMING, "prefill_ms": TIMING, "decode_tok_s": TIMING, "step_ms": TIMING,
                     "tokens_per_s": TIMING, "launches_per_decode_step": 40, "peak_memory_mib": None, "loss": 6.9,
                     "loss_curve": [6.9, 6.5, "nan"]},
         "comparison": {"compared_to": "eager", "logits_rel_err": 0.0, "logits_max_err": 0.0, "token_agreement": 1.0,
                        "first_divergence": None, "grad_rel_err": 0.0, "note": "the reference"},
         "fallbacks": [], "plan": {"text": "all eager"}, "model": {"weights": "seed 0"}},
        {"name": "triton", "status": "ok", "reference": False, "backends": "triton",
         "requested": {"dtype": "bfloat16", "overrides": {"text.rope_theta": 1e4}},
         "figures": {"vision_ms": None, "prefill_ms": TIMING, "decode_tok_s": TIMING, "step_ms": TIMING,
                     "launches_per_decode_step": 12, "peak_memory_mib": 12.5, "loss": "nan", "loss_curve": []},
         "comparison": {"compared_to": "eager", "logits_rel_err": "nan", "logits_max_err": "inf",
                        "token_agreement": 0.5, "first_divergence": 1, "grad_rel_err": 1e-3,
                        "grad_rel_err_param": "lm_head.weight", "note": "teacher-forced"},
         "fallbacks": [{"operator": "norm", "requested": "triton", "used": "eager", "call": "rms_norm",
                        "reasons": ["no backward"]}],
         "plan": None, "model": None},
        {"name": "broken", "status": "failed", "error": "OutOfMemoryError: 20 GiB\n  more lines", "figures": None,
         "comparison": {"compared_to": None, "note": "not compared: the reference failed"}},
    ],
}


def without(path: list, key) -> dict:
    doc = copy.deepcopy(TEMPLATE)
    node = doc
    for p in path:
        node = node[p]
    del node[key]
    return doc


def changed(path: list, value) -> dict:
    doc = copy.deepcopy(TEMPLATE)
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


def nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


BAD_RESULTS = [
    ("a list", b"[1, 2]", "not a qvl ablation results file: the top level is a list of 2, not an object"),
    ("a number", b"5", "not a qvl ablation results file: the top level is 5"),
    ("no variants", b'{"name": "x"}', 'not a qvl ablation results file: no "variants"'),
    ("variants a number", json.dumps(changed(["variants"], 5)), "variants: must be a list of variants, got 5"),
    ("no name", json.dumps(without([], "name")), ": name: missing"),
    ("name a number", json.dumps(changed(["name"], 7)), "name: must be a string, got 7"),
    ("variant not an object", json.dumps(changed(["variants", 1], "x")), 'variants[1]: must be an object, got "x"'),
    ("variant without a name", json.dumps(without(["variants", 0], "name")), "variants[0].name: missing"),
    ("timing a string", json.dumps(changed(["variants", 0, "figures", "prefill_ms"], "fast")),
     'variants[0].figures.prefill_ms: must be null or an object of numbers median, min and max, got "fast"'),
    ("timing without min", json.dumps(changed(["variants", 0, "figures", "decode_tok_s"], {"median": 1})),
     "variants[0].figures.decode_tok_s: must be null or an object of numbers"),
    ("launches a float", json.dumps(changed(["variants", 0, "figures", "launches_per_decode_step"], 1.5)),
     "launches_per_decode_step: must be an integer, a string or null, got 1.5"),
    ("an error a list", json.dumps(changed(["variants", 2, "error"], ["x"])), "variants[2].error: must be a string"),
    ("reasons not a list", json.dumps(changed(["variants", 1, "fallbacks", 0, "reasons"], "slow")),
     "variants[1].fallbacks[0].reasons: must be a list of strings"),
    ("device a number", json.dumps(changed(["run", "device"], 0)), "run.device: must be a string, got 0"),
    ("an integer beyond a double", json.dumps(changed(["variants", 0, "figures", "loss"], 10**400)),
     "variants[0].figures.loss: must be a number, a string or null, got 1000000"),
    ("another format", json.dumps(changed(["format"], "qvl-ablation/9")),
     'format "qvl-ablation/9": another schema than this qvl\'s qvl-ablation/1'),
    ("nested deep, parseable", json.dumps(changed(["started"], nested(200))), "values nested more than 32 deep"),
    ("nested absurdly deep", b"[" * 100_000, "nested too deeply"),
    ("not UTF-8", b'{"name": "caf\xe9"}', "not UTF-8"),
    ("UTF-16", json.dumps(TEMPLATE).encode("utf-16"), "not UTF-8"),
    ("empty", b"", "empty, not JSON"),
    ("not JSON", b"{'python': 'dict'}", "not JSON"),
]


@pytest.mark.parametrize("content, words", [c[1:] for c in BAD_RESULTS], ids=[c[0] for c in BAD_RESULTS])
def test_report_refuses_what_is_not_results(tmp_path, capsys, content, words):
    file = tmp_path / "results.json"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ResultsError) as caught:
        load_results(str(tmp_path))
    assert str(caught.value).startswith(f"{file}: ") and words in str(caught.value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
    status, out, err = cli_run(capsys, "report", tmp_path)
    one_error(status, err, 2, str(file), words)
    assert out == "" and os.listdir(tmp_path) == ["results.json"]


def test_report_on_folders_that_hold_no_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "runs" / "20260101-000000" / "results.json").mkdir(parents=True)  # a folder named results.json
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").mkdir()
    cases = {empty: f"{empty}: no results.json here or in its subfolders",
             tmp_path / "runs": "no results.json here or in its subfolders",
             tmp_path / "run": f"{tmp_path / 'run' / 'results.json'}: is a directory",
             tmp_path / "run" / "results.json": "results.json: is a directory"}
    for path, words in cases.items():
        with pytest.raises(ResultsError) as caught:
            load_results(str(path))
        assert words in str(caught.value)
        status, _, err = cli_run(capsys, "report", path)
        one_error(status, err, 2, words)


def test_stored_non_finite_values_render(tmp_path, capsys):
    """NaN and Infinity as JSON literals (not qvl's own "nan" strings) are numbers: the report renders them."""
    text = json.dumps(changed(["variants", 1, "comparison", "logits_rel_err"], float("nan")))
    (tmp_path / "results.json").write_text(text.replace('"inf"', "Infinity"))
    status, out, err = cli_run(capsys, "report", tmp_path)
    assert status == 0 and err == "" and "nan" in out and "inf" in out
    assert (tmp_path / "report.md").is_file() and tmp_files(tmp_path) == []


# --- fuzz: any JSON as results.json ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12)


def paths(value, prefix=()) -> list[tuple]:
    """Every place in a JSON value: the keys and indexes that lead there."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [p for k, v in items for p in [prefix + (k,)] + paths(v, prefix + (k,))]


TEMPLATE_PATHS = paths(TEMPLATE)


@st.composite
def mutated_results(draw):
    """The template (either mode) with one to three of its values, anywhere, replaced by random JSON or removed."""
    doc = copy.deepcopy(TEMPLATE)
    doc["run"]["mode"] = draw(st.sampled_from(["generate", "train"]))
    for path in draw(st.lists(st.sampled_from(TEMPLATE_PATHS), min_size=1, max_size=3)):
        node = doc
        for k in path[:-1]:
            if not isinstance(node, (dict, list)) or k not in (node if isinstance(node, dict) else range(len(node))):
                break  # an earlier change removed or replaced this place
            node = node[k]
        else:
            if isinstance(node, (dict, list)) and path[-1] in (node if isinstance(node, dict) else range(len(node))):
                if draw(st.booleans()):
                    node[path[-1]] = draw(json_values)
                else:
                    del node[path[-1]]
    return doc


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(doc=st.one_of(json_values, mutated_results()))
def test_fuzz_any_json_renders_or_is_a_results_error(doc):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "results.json"), "w") as f:
            json.dump(doc, f)
        try:
            results, directory = load_results(d)
        except ResultsError as e:
            assert d in str(e) and "\n" not in str(e)
            return
        format_table(results)
        render_markdown(results, None, "no plot")
        compare_runs([(results, directory), (results, directory)])
        compare_runs([(results, directory), (results, directory)], style="md")
