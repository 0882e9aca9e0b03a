"""The `pylandmark` command. Each sub-command parses its options and calls one library function."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

EXAMPLES = {
    "bench": "examples:\n  pylandmark bench\n  pylandmark bench --n 1000000 --queries 1 64 --k 100 --json",
}


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, format_rows, run_bench
    from .ops import set_num_threads

    if args.threads is not None:
        set_num_threads(args.threads)
    cfg = BenchConfig(n=args.n, dim=args.dim, queries=tuple(args.queries), k=args.k, repeat=args.repeat)
    rows = run_bench(cfg)
    if args.json:
        print(json.dumps({"config": asdict(cfg), "rows": [asdict(r) for r in rows]}, indent=1))
    else:
        print(format_rows(cfg, rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or log messages")
    parser = argparse.ArgumentParser(prog="pylandmark", description="Landmark recognition by image search.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common], epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("bench", "search speed on this machine next to numpy's")
    p.add_argument("--n", type=int, default=200_000, help="database rows (default 200000)")
    p.add_argument("--dim", type=int, default=1024, help="descriptor length (default 1024)")
    p.add_argument("--queries", type=int, nargs="+", default=[1, 64, 1024], help="query batch sizes")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeat", type=int, default=5, help="timed runs per size (median reported)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        print(f"pylandmark {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
