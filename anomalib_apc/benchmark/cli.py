"""Arguments of ``anomalib-apc benchmark`` and the command itself.

The options are not declared here: each is a field of :class:`BenchmarkSettings`, whose metadata
gives its flag and help, and whose default is the one both the command line and the Python API
use. The parser is jsonargparse's, as ``anomalib train``'s: ``--config FILE.yaml`` reads settings
(keys: the field names, as ``--print_config`` writes them) and flags after it override them.
Building the parser imports nothing heavy, so ``anomalib-apc --help`` stays instant; torch,
anomalib and the models are imported when the command runs.
"""

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import Field, fields
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from anomalib_apc.benchmark.profiles import DEMO_PROFILE, PAPER_PROFILE, Profile
from anomalib_apc.benchmark.settings import CONFIG_FILE, MVTEC_LAYOUT, BenchmarkSettings
from anomalib_apc.errors import run_reporting_user_errors

DESCRIPTION = "Train anomalib's Patchcore and AnomalousPatchCore on one supervised split and compare them."


def _profile_line(datasets: str, profile: Profile, note: str) -> str:
    weights = f" from {profile.init_weights}" if profile.init_weights else ""
    return (
        f"  {datasets:<22}{profile.backbone}{weights} ({' + '.join(profile.layers)}), {profile.image_size} px, "
        f"{profile.finetune_epochs} fine-tuning epochs, seeds {' '.join(map(str, profile.seeds))} ({note})"
    )


EPILOG = f"""\
defaults by dataset:
{_profile_line("demo", DEMO_PROFILE, "about 5 minutes on a 2-core CPU")}
{_profile_line(f"mvtecad/{MVTEC_LAYOUT}", PAPER_PROFILE, "the paper's settings")}

examples:
  anomalib-apc benchmark
  anomalib-apc benchmark --config results/benchmark/{CONFIG_FILE}   # the settings of an earlier run, resolved
  anomalib-apc benchmark --dataset {MVTEC_LAYOUT} --root my_parts --print_config > my_parts.yaml
  anomalib-apc benchmark --dataset mvtecad --root datasets/MVTecAD --category pill --category screw --seeds 0 1 2
  anomalib-apc benchmark --dataset {MVTEC_LAYOUT} --root ../shared/datasets/mpdd/metal_plate --backbone resnet50 \\
      --image-size 128 --finetune-epochs 3 --no-pretrained --seeds 0 1 2 --output results/mpdd
  anomalib-apc benchmark --dataset mvtecad --root datasets/MVTecAD --category pill --device gpu --devices 4
"""


def build_parser(prog: str | None = None) -> ArgumentParser:
    """The benchmark's parser: ``--config``/``--print_config`` and one option per :class:`BenchmarkSettings` field."""
    parser = ArgumentParser(
        prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help=f"YAML file of settings, keys as --print_config writes them (every run writes its own, resolved, as "
        f"OUTPUT/{CONFIG_FILE}); options after it override it",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level, tracebacks of errors")
    add_setting_options(parser)
    return parser


def add_setting_options(parser: ArgumentParser) -> None:
    """Add one option per field of :class:`BenchmarkSettings` to ``parser``, with the field's default.

    The defaults are in the parser (not left to the dataclass) so that ``--print_config`` shows every
    setting; sequences are lists there, as YAML writes them.
    """
    groups: dict[str, Any] = {}
    for settings_field in fields(BenchmarkSettings):
        option = settings_field.metadata["cli"]
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        target = groups[option.group]
        if option.exclusive is not None:
            key = f"{option.group}/{option.exclusive}"
            if key not in groups:
                groups[key] = target.add_mutually_exclusive_group()
            target = groups[key]
        default = option.default_text or _default_text(settings_field)
        flag = option.flag or "--" + settings_field.name.replace("_", "-")
        keywords = dict(option.argparse)
        if keywords.get("action") not in ("store_true", "store_false") and "choices" not in keywords:
            keywords.setdefault("metavar", flag.removeprefix("--").upper().replace("-", "_"))
        field_default = settings_field.default
        target.add_argument(
            flag,
            dest=settings_field.name,
            default=list(field_default) if isinstance(field_default, tuple) else field_default,
            help=f"{option.help} (default: {default})".replace("%", "%%"),
            **keywords,
        )


def _default_text(settings_field: Field) -> str:
    """The field's default as the help shows it: ``off`` for a flag, items joined by spaces."""
    default = settings_field.default
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return " ".join(str(item) for item in default)
    return str(default)


def settings_from_arguments(args: argparse.Namespace) -> BenchmarkSettings:
    """The benchmark settings the parsed arguments ask for (profile defaults still unresolved)."""
    given = {settings_field.name: getattr(args, settings_field.name) for settings_field in fields(BenchmarkSettings)}
    lists_as_tuples = {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()}
    return BenchmarkSettings(**lists_as_tuples)


def _hide_library_warnings() -> None:
    """Hide warnings a benchmark user cannot act on; before the imports, as timm and anomalib warn on import."""
    for message in (
        ".*but have no logger configured",  # the benchmark keeps no training curves
        ".*no `val_dataloader`. Skipping val loop",  # on purpose: the test is the only evaluation
        ".*returned `None`, this fit will run with no optimizer",  # Patchcore has nothing to optimise
        ".*module\\(s\\) in eval mode at the start of training",  # Patchcore's frozen extractor
        ".*treespec, LeafSpec",  # Lightning on a newer torch
    ):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(timm|anomalib)\.")  # their own deprecations


def _lower_library_loggers() -> None:
    """Hide Lightning's and anomalib's start-up lines; after the imports, as Lightning sets INFO when imported."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "anomalib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, writing the results after every category and seed; 1 if any run failed."""
    quiet = not args.verbose
    if quiet:
        _hide_library_warnings()
    from anomalib_apc.benchmark.engines import is_main_process
    from anomalib_apc.benchmark.report import write_report
    from anomalib_apc.benchmark.results import FIGURES_DIR
    from anomalib_apc.benchmark.runner import run_benchmark

    if quiet:
        _lower_library_loggers()

    result = run_benchmark(settings_from_arguments(args), on_split_done=write_report)
    if not is_main_process():
        return 0  # another rank of --devices N: the first process reports
    paths = write_report(result)
    print()
    print(paths["markdown"].read_text())
    figures = paths["markdown"].parent / FIGURES_DIR
    print(f"Results: {paths['markdown']}, {paths['csv']}, {paths['json']}; figures in {figures}; the settings, "
          f"for --config: {result.settings.output / CONFIG_FILE}")
    if result.failures:
        print(f"{len(result.failures)} run(s) failed (partial results kept):", file=sys.stderr)
        for failure in result.failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m anomalib_apc.benchmark``: the benchmark command alone, without the other commands' imports.

    Errors are reported as by ``anomalib-apc`` (:func:`~anomalib_apc.errors.run_reporting_user_errors`).
    """
    parser = build_parser(prog="python -m anomalib_apc.benchmark")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_reporting_user_errors(lambda: run(args), parser.prog, args.verbose)
