"""The ``sarloc`` command: argument parsing only; every subcommand calls a library function.

One module per command group (:mod:`~sarloc.cli.data`, :mod:`~sarloc.cli.training`, :mod:`~sarloc.cli.evaluate`,
:mod:`~sarloc.cli.models`, :mod:`~sarloc.cli.maps`, :mod:`~sarloc.cli.flight`); each adds its subcommands with
``add_parsers``. Exit codes: 0 success, 1 a known error (one line naming what to fix), 2 a usage error, 130
interrupted (Ctrl-C), 143 a training run stopped by SIGTERM (it saved where to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys

from sarloc import __version__
from sarloc.cli import data, evaluate, flight, maps, models, training
from sarloc.core.errors import SarlocError

logger = logging.getLogger("sarloc.cli")

GROUPS = (data, training, evaluate, models, maps, flight)


def _common() -> argparse.ArgumentParser:
    """Options every subcommand accepts after its name (``SUPPRESS``: a value given before the name stands)."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    c.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")
    return c


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = argparse.ArgumentParser(prog="sarloc", description="GNSS-free UAV localisation from SAR imagery.")
    p.add_argument("--version", action="version", version=f"sarloc {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    common = _common()
    for group in GROUPS:
        group.add_parsers(sub, common)
    return p


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command that ``args`` ran (``sarloc map build``: the ``build`` parser)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def main(argv: list[str] | None = None) -> int:
    """Entry point. Known user errors print one line and return 1; usage errors exit 2; bugs raise."""
    from sarloc.core.log import setup_logging

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse would blame "sarloc"; the usage and the error belong to the subcommand given them
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(verbose=args.verbose, quiet=args.quiet)
    name = " ".join(x for x in (args.cmd, getattr(args, "map_cmd", None)) if x)
    try:
        return int(args.fn(args) or 0)
    except SarlocError as e:
        print(f"sarloc {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sarloc {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
