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
from pathlib import Path

from jsonargparse import ArgumentParser

from anomalib_apc import __version__
from anomalib_apc.errors import run_reporting_user_errors


def build_parser() -> ArgumentParser:
    """The parser with one subcommand per command (jsonargparse, as anomalib's), each defined by its package."""
    from anomalib_apc.benchmark.cli import build_parser as build_benchmark_parser
    from anomalib_apc.deploy.cli import add_export_bundle_arguments, add_predict_arguments

    parser = ArgumentParser(prog="anomalib-apc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level, and print the traceback of a user error")
    commands = parser.add_subcommands(dest="command", required=True)
    commands.add_subcommand("benchmark", build_benchmark_parser(), help=COMMAND_HELP["benchmark"])
    for name, add_arguments in (
        ("export-bundle", add_export_bundle_arguments),
        ("predict", add_predict_arguments),
        ("weights", add_weights_arguments),
    ):
        command = ArgumentParser(description=COMMAND_HELP[name])
        add_arguments(command)
        commands.add_subcommand(name, command, help=COMMAND_HELP[name])
    return parser


COMMAND_HELP = {
    "benchmark": "train Patchcore and APC on one split and compare them",
    "export-bundle": "export a trained APC checkpoint as a deployment bundle",
    "predict": "score images with a deployment bundle",
    "weights": "fetch named pretrained encoder weights into the cache (or a file)",
}


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


def command_runner(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs command ``name`` with its parsed arguments (imported only when it runs)."""
    if name == "benchmark":
        from anomalib_apc.benchmark.cli import run as run_benchmark

        return run_benchmark
    if name == "weights":
        return run_weights
    from anomalib_apc.deploy.cli import run_export_bundle, run_predict

    return {"export-bundle": run_export_bundle, "predict": run_predict}[name]


def run_command(name: str, args: argparse.Namespace, verbose: bool) -> int:
    """Runs command ``name`` with its parsed ``args`` under the project's error policy; its exit status."""
    return run_reporting_user_errors(lambda: command_runner(name)(args), f"anomalib-apc {name}", verbose)


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
