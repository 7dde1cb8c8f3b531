"""The ``lsquant`` command. Each subcommand is a thin wrapper over the Python API (no logic lives here
that the API lacks). A subcommand is one ``_cmd_<name>(sub)`` function that adds its parser and sets
``func``; register it in COMMANDS."""
from __future__ import annotations

import argparse
import sys


def _cmd_build(sub) -> None:
    p = sub.add_parser("build", help="compile the CUDA extension now (otherwise it builds on first CUDA use)",
                       description="Compile csrc/ with ninja for this GPU's architecture and report the time. "
                                   "Honours MAX_JOBS and TORCH_EXTENSIONS_DIR.")
    p.add_argument("-q", "--quiet", action="store_true", help="hide the compiler's output")

    def run(args) -> int:
        from lsquant.ops.build import BuildError, build, sources

        try:
            seconds = build(verbose=not args.quiet)
        except BuildError as e:
            print(f"lsquant build: {e}", file=sys.stderr)
            return 1
        print(f"lsquant build: {len(sources())} sources ready in {seconds:.1f} s")
        return 0

    p.set_defaults(func=run)


def _cmd_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="run the whole pipeline on a small example and print a summary",
                       description="Runs every stage of the lsquant pipeline that is built so far on a small "
                                   "self-generated example, on the GPU if there is one, else on the CPU.")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    def run(args) -> int:
        from lsquant.quickstart import main as quickstart

        return quickstart(seed=args.seed)

    p.set_defaults(func=run)


COMMANDS = [_cmd_build, _cmd_quickstart]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lsquant", description="int8 quantization for Transformer models: "
                                     "QAT, PTQ, export and inference.")
    from lsquant import __version__

    parser.add_argument("--version", action="version", version=f"lsquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
