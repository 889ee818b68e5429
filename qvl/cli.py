"""The `qvl` command: `qvl backends`, `qvl demo`, `qvl ablate`, `qvl report`, `qvl generate`, `qvl plan`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from .errors import QvlError, one_line


def cmd_backends(args: argparse.Namespace) -> int:
    from .backends import all_backends, availability_table

    backends = all_backends()
    names = [b.name for b in backends]
    notes: dict[str, int] = {}  # reason text -> footnote number, shared by identical cells

    def cell(operator: str, backend, text: str) -> str:
        if operator not in backend.impls:
            return "-"  # a partial backend (triton-gemm): nothing to explain
        if text == "ok" or text.startswith("ok ("):
            return ("fwd+bwd" if backend.impls[operator].backward else "fwd only") + text[2:]
        number = notes.setdefault(text, len(notes) + 1)
        return f"unavailable [{number}]"

    rows = [[row["operator"]] + [cell(row["operator"], b, row[b.name]) for b in backends]
            for row in availability_table()]
    widths = [max(len(r[i]) for r in rows + [["operator"] + names]) for i in range(len(names) + 1)]
    print("  ".join(h.ljust(w) for h, w in zip(["operator"] + names, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print("\nfwd+bwd: forward and backward (training); fwd only: calls that need gradients are refused (\"no "
          "backward\"), or routed to the fallback")
    for text, number in notes.items():
        print(f"\n[{number}] {text}")
    print()
    for b in backends:
        print(f"{b.name}: {b.description}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    print(f"qvl demo: preset {args.preset}, image + text prompt, {args.new_tokens} greedy tokens; "
          "error and token agreement against the eager backend")
    rows = run_demo(args.preset, args.new_tokens, args.device)
    print(format_table(rows))
    return 1 if any("error" in r for r in rows) else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block a scheduler's or `timeout`'s SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so
    long work can write what it has measured before it stops."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_ablate(args: argparse.Namespace) -> int:
    from .ablate import AblationRun, default_config, format_table, load_config

    config = load_config(args.config) if args.config is not None else default_config(args.device or "auto")
    if args.preset:
        from .ablate.config import with_preset

        config = with_preset(config, args.preset)
    if args.dtype:
        from .ablate.config import with_dtype

        config = with_dtype(config, args.dtype)
    if args.tp:
        from .ablate.config import with_tp

        config = with_tp(config, args.tp)  # the degree checked against every variant's architecture
    tp = f", tp {config.model.tp}" if config.model.tp > 1 else ""
    if args.check:
        print(f"{config.path or 'built-in default'}: ok: {config.name}, {config.model.describe()} in "
              f"{config.model.dtype}{tp}, {len(config.variants)} variants "
              f"({', '.join(v.name for v in config.variants)}), reference {config.reference}")
        print(_check_details(config), end="")
        return 0
    # tp > 1: local workers (or, under torchrun, this process is one of the ranks); rank 0 writes and prints
    run = AblationRun(config, results_root=args.results_dir, device=args.device, repeats=args.repeats,
                      warmup=args.warmup, quiet=args.quiet)
    if not run.quiet:
        print(f"qvl ablate: {config.name} on {run.device}{tp}: {len(config.variants)} variants, {run.warmup} "
              f"warm-up + {run.repeats} repeats each; results in {run.dir}", file=sys.stderr)
    # SIGTERM ends the run like Ctrl-C: the variant in flight is marked interrupted and results.json,
    # report.md and the plot are written for what was measured (by rank 0; local workers are stopped).
    try:
        with sigterm_as_interrupt():
            results = run.execute()
    except KeyboardInterrupt:
        if run.writes:
            print(f"\nqvl ablate: interrupted; what was measured is in {run.dir}", file=sys.stderr)
        return 130
    if run.writes:
        print(format_table(results))
        plot = results.get("plot") or {}
        print(f"\nresults: {run.dir}/results.json, report.md" + (", plot.png" if plot.get("file") else
                                                                 f" (plot skipped: {plot.get('skipped')})"))
    return 1 if any(v["status"] != "ok" for v in results["variants"]) else 0


def _check_details(config) -> str:
    """What `qvl ablate --check` adds to its one line: the config with every default filled in, then the
    variants whose backends cannot run on this machine (the run records them as failed)."""
    from .ablate.config import config_toml
    from .ablate.runner import check_backends
    from .backends import BackendUnsupportedError

    text = "\n# with every default filled in\n" + config_toml(config)
    for v in config.variants:
        try:
            check_backends(v)
        except (ValueError, BackendUnsupportedError) as e:
            text += f"\n# variant {v.name!r} cannot run here: {e}"
    return text + "\n"


def cmd_report(args: argparse.Namespace) -> int:
    from .ablate import compare_runs, format_table, load_results, render_run
    from .ablate.report import write_comparison

    runs = [load_results(d) for d in args.dirs]
    if len(runs) == 1 and not args.out:
        results, directory = runs[0]
        print(f"{results['name']} ({directory}): {results['status']}"
              + (f": {one_line(results['error'])}" if results.get("error") else ""))
        print(format_table(results))
        if not args.no_write:
            plot = render_run(results, directory)
            print(f"\nrendered {directory}/report.md" + (", plot.png" if plot.get("file") else
                                                          f" (plot skipped: {plot.get('skipped')})"))
        return 0
    print(compare_runs(runs))
    if args.out:
        print(f"\nwrote {write_comparison(runs, args.out)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .config import get_preset, load_hf_config
    from .dtypes import DTYPES
    from .errors import ConfigError
    from .memory import format_bytes
    from .parallel.plan import format_plan, memory_plan, plan_notes
    from .parallel.shard import valid_degrees

    cfg = load_hf_config(args.checkpoint) if args.checkpoint is not None else get_preset(args.preset)
    dtype = DTYPES[args.dtype]
    degrees = list(dict.fromkeys(args.tp)) if args.tp else [d for d in valid_degrees(cfg, args.vision) if d <= 8]
    rows: list = []
    refused: list[ConfigError] = []
    for tp in degrees:
        try:
            rows.append(memory_plan(cfg, dtype, tp, args.memory, args.batch, args.vision))
        except ConfigError as e:  # one degree: an error; among several: a row, unless none can split the model
            refused.append(e)
            rows.append((tp, str(e)))
    if len(refused) == len(degrees):
        raise refused[0]
    model = f"checkpoint {args.checkpoint}" if args.checkpoint is not None else f"preset {args.preset}"
    print(f"qvl plan: {model}, {cfg.num_parameters():,} parameters in {args.dtype}; {format_bytes(args.memory)} "
          f"per rank, batch {args.batch}")
    print(format_plan(rows))
    print(f"\n{plan_notes(dtype, args.vision)}")
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _memory_size(text: str) -> int:
    from .parallel.plan import parse_bytes

    try:
        return parse_bytes(text)
    except QvlError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with qvl's one-line usage errors (``qvl: error: ...``, exit status 2); subcommands inherit it."""

    def error(self, message: str):
        sub = self.prog.partition(" ")[2]
        self.exit(2, f"qvl: error: {sub + ': ' if sub else ''}{message} (see {self.prog} --help)\n")


def error_status(e: Exception) -> tuple[int, str]:
    """(exit status, message) for an exception that ends a command: 2 for what the user gave (qvl's errors,
    bad values, missing, unreadable or misplaced paths, text that is not UTF-8, backends this machine cannot
    run), 1 for failures of the run itself (a full disk, memory, a missing optional package, input nested too
    deeply for Python, non-finite numbers midway, a bug)."""
    from .backends import BackendUnsupportedError

    if isinstance(e, QvlError):
        return e.exit_status, one_line(e)
    if isinstance(e, UnicodeDecodeError):  # the readers that know the file name it (ConfigError, ResultsError)
        return 2, f"not {e.encoding} text: byte 0x{e.object[e.start]:02x} at offset {e.start} ({e.reason})"
    if isinstance(e, (ValueError, BackendUnsupportedError, FileNotFoundError, FileExistsError, IsADirectoryError,
                      NotADirectoryError, PermissionError)):
        return 2, _os_message(e) if isinstance(e, OSError) else one_line(e)
    if isinstance(e, OSError):
        return 1, _os_message(e)
    if isinstance(e, ImportError):  # an optional package (PyAV, Pillow, matplotlib): its message says what to install
        return 1, one_line(e)
    if isinstance(e, RecursionError):
        return 1, f"input nested too deeply for Python to follow ({one_line(e)})"
    if isinstance(e, MemoryError):
        return 1, f"out of memory: {one_line(e)}"
    return 1, f"internal error ({type(e).__name__}): {one_line(e)}; QVL_DEBUG=1 shows the traceback"


def _os_message(e: OSError) -> str:
    """``<file>: <reason>`` rather than Python's ``[Errno 2] No such file or directory: '<file>'``."""
    if e.strerror and e.filename is not None:
        return one_line(f"{e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 else ""))
    return one_line(e.strerror or e)


def _discard_stdout() -> None:
    """stdout to /dev/null: its reader went away (`qvl backends | head -1`), and Python's last flush of what is
    still buffered must not fail again at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no file descriptor (captured in tests)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def key_type(spec: str, name: str, flag: str, integer: bool = False):
    """An argparse type that checks a flag by the rule of the config key it stands for (qvl.ablate.config's
    `spec`.`name`), so ``--repeats 0`` is refused as ``[run] repeats = 0`` is, in the same words."""

    def parse(text: str):
        from .ablate import config

        value: object = text
        if integer:
            with contextlib.suppress(ValueError):
                value = int(text)
        try:
            return config.check_key(getattr(config, spec), name, value, flag)
        except QvlError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag}: ")) from None

    return parse


def main(argv: list[str] | None = None) -> int:
    from .config import PRESETS
    from .dtypes import DTYPES

    parser = ArgumentParser(prog="qvl", description="Qwen2.5-VL with interchangeable operator backends")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="operator x backend availability on this machine, with reasons")
    p.set_defaults(func=cmd_backends)
    p = sub.add_parser("demo", help="run the tiny model through every available backend mix")
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--new-tokens", type=key_type("WorkloadSpec", "decode_tokens", "--new-tokens", integer=True),
                   default=8)
    p.add_argument("--device", default="cpu", type=key_type("ModelSpec", "device", "--device"))
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("ablate",
                       help="run an ablation config (ablations/*.toml); no config: a default for this machine",
                       description="Measure every variant of an ablation config (speed, memory, error and token "
                                   "agreement against the reference variant) and write "
                                   "RESULTS_DIR/<config name>/<timestamp>/{results.json,report.md,plot.png}.")
    p.add_argument("config", nargs="?", help="an ablations/*.toml file (default: tiny preset on a CPU, 3b on a GPU)")
    p.add_argument("--results-dir", default="results", help="root folder for results (default: results)")
    p.add_argument("--device", type=key_type("ModelSpec", "device", "--device"),
                   help="override the config's device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--preset", choices=PRESETS, help=f"run the config on another preset ({', '.join(PRESETS)})")
    p.add_argument("--dtype", choices=DTYPES, help=f"override the config's model dtype ({', '.join(DTYPES)}); "
                                                   "variants that set their own keep it")
    p.add_argument("--tp", type=key_type("ModelSpec", "tp", "--tp", integer=True), metavar="N",
                   help="override the config's tensor-parallel degree ([model] tp): N local worker processes (one GPU "
                        "each on CUDA); under torchrun, N must be its WORLD_SIZE")
    p.add_argument("--repeats", type=key_type("RunSpec", "repeats", "--repeats", integer=True),
                   help="timed repeats per variant, >= 1 (default: the config's, else 3 on a CPU, 10 on a GPU)")
    p.add_argument("--warmup", type=key_type("RunSpec", "warmup", "--warmup", integer=True),
                   help="warm-up runs per variant, >= 0 (default: the config's, else 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-variant lines")
    p.add_argument("--check", action="store_true",
                   help="only check the config, and print it with every default filled in")
    p.set_defaults(func=cmd_ablate)
    p = sub.add_parser("report", help="render stored ablation results again; several runs: side by side",
                       description="DIR: a run folder (results/<name>/<timestamp>), a config's folder of runs (the "
                                   "latest is taken) or a results.json. One DIR: print the table and rewrite its "
                                   "report.md and plot.png. Several: compare them variant by variant.")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--out", help="write the comparison to OUT/compare.md")
    p.add_argument("--no-write", action="store_true", help="one DIR: print only, do not rewrite report.md and plot.png")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("plan", help="tensor-parallel memory plan: weights and KV cache per rank, longest context",
                       description="For each tensor-parallel degree: the weights one rank holds, its KV cache per "
                                   "token, and the longest context that fits MEMORY per rank. One --tp that cannot "
                                   "split the model is an error; among several it is a row saying why (an error only "
                                   "when none can).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=PRESETS, help=f"a preset ({', '.join(PRESETS)})")
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint folder (its config.json is read)")
    p.add_argument("--tp", type=positive_int, nargs="+", metavar="N",
                   help="tensor-parallel degrees, e.g. --tp 1 2 4 8 (default: those up to 8 that split the model)")
    p.add_argument("--memory", type=_memory_size, required=True,
                   help="device memory per rank: 141GiB, 80GB (10^9 bytes) or a number of bytes")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight and cache dtype (default bfloat16)")
    p.add_argument("--batch", type=positive_int, default=1, help="rows sharing the KV cache (default 1)")
    p.add_argument("--vision", choices=("data", "tensor"), default="data",
                   help="the vision tower whole on each rank, run data-parallel (default), or split like the decoder")
    p.set_defaults(func=cmd_plan)
    from .generate_cli import add_generate_parser

    add_generate_parser(sub)  # qvl generate
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not in Python's flush at exit
        return status
    except BrokenPipeError:
        _discard_stdout()
        return 1
    except KeyboardInterrupt:
        print("qvl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, no traceback, unless QVL_DEBUG=1
        if os.environ.get("QVL_DEBUG") == "1":
            raise
        status, message = error_status(e)
        print(f"qvl: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
