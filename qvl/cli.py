"""The `qvl` command: `qvl backends`, `qvl demo`, `qvl ablate`, `qvl report`, `qvl generate`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from .errors import QvlError


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

    config = load_config(args.config) if args.config else default_config(args.device or "auto")
    if args.preset:
        from .ablate.config import with_preset

        config = with_preset(config, args.preset)
    if args.dtype:
        from .ablate.config import with_dtype

        config = with_dtype(config, args.dtype)
    if args.check:
        print(f"{config.path or 'built-in default'}: ok: {config.name}, {config.model.describe()} in "
              f"{config.model.dtype}, {len(config.variants)} variants ({', '.join(v.name for v in config.variants)}), "
              f"reference {config.reference}")
        print(_check_details(config), end="")
        return 0
    run = AblationRun(config, results_root=args.results_dir, device=args.device, repeats=args.repeats,
                      warmup=args.warmup, quiet=args.quiet)
    if not args.quiet:
        print(f"qvl ablate: {config.name} on {run.device}: {len(config.variants)} variants, {run.warmup} warm-up + "
              f"{run.repeats} repeats each; results in {run.dir}", file=sys.stderr)
    # SIGTERM ends the run like Ctrl-C: the variant in flight is marked interrupted and results.json,
    # report.md and the plot are written for what was measured.
    try:
        with sigterm_as_interrupt():
            results = run.execute()
    except KeyboardInterrupt:
        print(f"\nqvl ablate: interrupted; what was measured is in {run.dir}", file=sys.stderr)
        return 130
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

    runs = [load_results(d) for d in args.dirs]
    if len(runs) == 1 and not args.out:
        results, directory = runs[0]
        print(f"{results['name']} ({directory}): {results['status']}")
        print(format_table(results))
        if not args.no_write:
            plot = render_run(results, directory)
            print(f"\nrendered {directory}/report.md" + (", plot.png" if plot.get("file") else
                                                          f" (plot skipped: {plot.get('skipped')})"))
        return 0
    print(compare_runs(runs))
    if args.out:
        import os

        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "compare.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(compare_runs(runs, style="md"))
        print(f"\nwrote {path}")
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse with qvl's one-line usage errors (``qvl: error: ...``, exit status 2); subcommands inherit it."""

    def error(self, message: str):
        sub = self.prog.partition(" ")[2]
        self.exit(2, f"qvl: error: {sub + ': ' if sub else ''}{message} (see {self.prog} --help)\n")


def one_line(e: BaseException) -> str:
    """An exception's message on one line: its lines joined by '; ' (list bullets dropped)."""
    lines = [line.strip().removeprefix("- ") for line in str(e).splitlines()]
    return "; ".join(line for line in lines if line) or type(e).__name__


def error_status(e: Exception) -> tuple[int, str]:
    """(exit status, message) for an exception that ends a command: 2 for what the user gave (qvl's errors,
    bad values, missing or unreadable paths, backends this machine cannot run), 1 for failures of the run
    itself (a full disk, memory, non-finite numbers midway, a bug)."""
    from .backends import BackendUnsupportedError

    if isinstance(e, QvlError):
        return e.exit_status, one_line(e)
    if isinstance(e, (ValueError, BackendUnsupportedError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                      PermissionError)):
        return 2, one_line(e)
    if isinstance(e, OSError):
        return 1, one_line(e)
    if isinstance(e, MemoryError):
        return 1, f"out of memory: {one_line(e)}"
    return 1, f"internal error ({type(e).__name__}): {one_line(e)}; QVL_DEBUG=1 shows the traceback"


def main(argv: list[str] | None = None) -> int:
    from .config import PRESETS
    from .dtypes import DTYPES

    parser = ArgumentParser(prog="qvl", description="Qwen2.5-VL with interchangeable operator backends")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="operator x backend availability on this machine, with reasons")
    p.set_defaults(func=cmd_backends)
    p = sub.add_parser("demo", help="run the tiny model through every available backend mix")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("ablate",
                       help="run an ablation config (ablations/*.toml); no config: a default for this machine",
                       description="Measure every variant of an ablation config (speed, memory, error and token "
                                   "agreement against the reference variant) and write "
                                   "RESULTS_DIR/<config name>/<timestamp>/{results.json,report.md,plot.png}.")
    p.add_argument("config", nargs="?", help="an ablations/*.toml file (default: tiny preset on a CPU, 3b on a GPU)")
    p.add_argument("--results-dir", default="results", help="root folder for results (default: results)")
    p.add_argument("--device", help="override the config's device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--preset", help=f"run the config on another preset ({', '.join(PRESETS)})")
    p.add_argument("--dtype", help=f"override the config's model dtype ({', '.join(DTYPES)}); variants that set "
                                   "their own keep it")
    p.add_argument("--repeats", type=int,
                   help="timed repeats per variant (default: the config's, else 3 on a CPU, 10 on a GPU)")
    p.add_argument("--warmup", type=int, help="warm-up runs per variant (default: the config's, else 1)")
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
    from .generate_cli import add_generate_parser

    add_generate_parser(sub)  # qvl generate
    args = parser.parse_args(argv)
    try:
        return args.func(args)
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
