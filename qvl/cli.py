"""The `qvl` command: `qvl backends`, `qvl demo`."""

from __future__ import annotations

import argparse
import sys


def cmd_backends(args: argparse.Namespace) -> int:
    from .backends import all_backends, availability_table

    backends = all_backends()
    rows = availability_table()
    names = [b.name for b in backends]
    print(f"{'operator':<10} " + " ".join(f"{n:<24}" for n in names))
    for row in rows:
        print(f"{row['operator']:<10} " + " ".join(f"{row[n]:<24}" for n in names))
    for b in backends:
        print(f"\n{b.name}: {b.description}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    print(f"qvl demo: preset {args.preset}, image + text prompt, {args.new_tokens} greedy tokens; "
          "error and token agreement against the eager backend")
    rows = run_demo(args.preset, args.new_tokens, args.device)
    print(format_table(rows))
    return 1 if any("error" in r for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qvl", description="Qwen2.5-VL with interchangeable operator backends")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="operator x backend availability on this machine, with reasons")
    p.set_defaults(func=cmd_backends)
    p = sub.add_parser("demo", help="run the tiny model through every available backend mix")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # input mistakes: a message, not a traceback
        print(f"qvl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
