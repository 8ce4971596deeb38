"""The ``anomalib-apc`` console script: ``benchmark``, ``export-bundle``, ``predict`` and ``weights``.

Only parses arguments and hands them to the packages that do the work. Errors that a user can fix
(an :class:`~anomalib_apc.errors.ApcError`: a bad argument, a missing or existing file; or a file
error from the operating system) are printed as one line and exit status 2; ``-v`` adds their
traceback. Anything else (a torch out-of-memory, a bug) keeps Python's traceback, so it can be reported.
"""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

from jsonargparse import ArgumentParser

from anomalib_apc import __version__
from anomalib_apc.errors import run_reporting_user_errors


class Command(NamedTuple):
    """One subcommand: its help line, its parser and the function that runs it with the parsed arguments."""

    help: str
    parser: Callable[[], ArgumentParser]
    run: Callable[[argparse.Namespace], int]


def commands() -> dict[str, Command]:
    """Every subcommand, each defined by the package that runs it (imported here, when the CLI is used)."""
    from anomalib_apc.benchmark import cli as benchmark
    from anomalib_apc.deploy import cli as deploy

    return {
        "benchmark": Command("train Patchcore and APC on one split and compare them", benchmark.build_parser,
                             benchmark.run),
        "export-bundle": Command("export a trained APC checkpoint as a deployment bundle",
                                 partial(_parser, deploy.add_export_bundle_arguments), deploy.run_export_bundle),
        "predict": Command("score images with a deployment bundle", partial(_parser, deploy.add_predict_arguments),
                           deploy.run_predict),
        "weights": Command("fetch named pretrained encoder weights into the cache (or a file)",
                           partial(_parser, add_weights_arguments), run_weights),
    }


def _parser(add_arguments: Callable[[ArgumentParser], None]) -> ArgumentParser:
    parser = ArgumentParser()
    add_arguments(parser)
    return parser


def build_parser() -> ArgumentParser:
    """The parser with one subcommand per command (jsonargparse subcommands, as anomalib's)."""
    parser = ArgumentParser(prog="anomalib-apc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level, and print the traceback of a user error")
    subcommands = parser.add_subcommands(dest="command", required=True)
    for name, command in commands().items():
        subparser = command.parser()
        subparser.description = subparser.description or command.help
        subcommands.add_subcommand(name, subparser, help=command.help)
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


def run_command(name: str, args: argparse.Namespace, verbose: bool) -> int:
    """Runs command ``name`` with its parsed ``args`` under the project's error policy; its exit status."""
    run = commands()[name].run
    return run_reporting_user_errors(lambda: run(args), f"anomalib-apc {name}", verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    name = args.command
    command_args = args[name]
    verbose = args.verbose or bool(command_args.get("verbose"))
    if "verbose" in command_args:
        command_args.verbose = verbose  # ``anomalib-apc -v benchmark`` as ``anomalib-apc benchmark -v``
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(name, command_args, verbose)


if __name__ == "__main__":
    sys.exit(main())
