"""The ``anomalib-apc`` console script: ``benchmark``, ``export-bundle``, ``predict`` and ``weights``.

Only parses arguments and hands them to the packages that do the work. Errors that a user can fix
(an :class:`~anomalib_apc.errors.ApcError`: a bad argument, a missing or existing file; or a file
error from the operating system) are printed as one line and exit status 2; ``-v`` adds their
traceback. Anything else (a torch out-of-memory, a bug) keeps Python's traceback, so it can be reported.
"""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from anomalib_apc import __version__
from anomalib_apc.errors import run_reporting_user_errors


def build_parser() -> argparse.ArgumentParser:
    """The parser with one sub-parser per command, each defined by the package that runs it."""
    from anomalib_apc.benchmark.cli import add_arguments as add_benchmark_arguments
    from anomalib_apc.benchmark.cli import run as run_benchmark
    from anomalib_apc.deploy.cli import (
        add_export_bundle_arguments,
        add_predict_arguments,
        run_export_bundle,
        run_predict,
    )

    parser = argparse.ArgumentParser(prog="anomalib-apc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level, and print the traceback of a user error")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in (
        ("benchmark", "train Patchcore and APC on one split and compare them", add_benchmark_arguments, run_benchmark),
        ("export-bundle", "export a trained APC checkpoint as a deployment bundle", add_export_bundle_arguments,
         run_export_bundle),
        ("predict", "score images with a deployment bundle", add_predict_arguments, run_predict),
        ("weights", "fetch named pretrained encoder weights into the cache (or a file)", add_weights_arguments,
         run_weights),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """``anomalib-apc weights NAME [--output FILE]``: the names come from :mod:`anomalib_apc.named_weights`."""
    from anomalib_apc.named_weights import NAMED_WEIGHTS

    parser.add_argument("name", choices=sorted(NAMED_WEIGHTS), help="which weights (a timm state dict once converted)")
    parser.add_argument("--output", type=Path, help="also copy the converted checkpoint to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def run_weights(args: argparse.Namespace) -> int:
    """Fetch (or find in the cache) the named weights and print where the checkpoint is."""
    from anomalib_apc.named_weights import copy_named_weights, named_weights_path, named_weights_source

    source = named_weights_source(args.name)
    if args.output is not None:
        path = copy_named_weights(args.name, args.output, overwrite=args.overwrite)
    else:
        path = named_weights_path(source)
    print(f"{source.name}: timm {source.backbone} checkpoint at {path} (use init_weights: {source.name} or {path}).")
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Runs a parsed command (``args.run``) under the project's error policy and returns its exit status."""
    return run_reporting_user_errors(lambda: args.run(args), f"anomalib-apc {args.command}", args.verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
