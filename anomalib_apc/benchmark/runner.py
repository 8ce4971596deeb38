"""Trains anomalib's ``Patchcore`` and ``AnomalousPatchCore`` on one supervised split and measures both.

What makes the comparison fair, and where it is enforced:

- One split (``data``): each model gets its own datamodule built with the same arguments and seed;
  both are tested on the test split, which no longer holds the anomalies moved to APC's training.
  The test images each model was actually scored on are compared afterwards, and a difference
  fails the run instead of producing a misleading table.
- One initialisation and one coreset draw (``models``): identical starting weights, coresets drawn
  under the same seed.
- One measurement: both go through anomalib's ``Engine``, timed by the same callback (``meter``) and
  scored by anomalib's ``Evaluator`` with ``AUROC``, ``F1Max`` and ``AUPRO`` on the raw scores and maps.

This module only orchestrates: check the inputs and the output folder, then train and test every
model on every category and seed (``engines`` says how, on one device or with ``--devices N``).
"""

import logging
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything
from tqdm.auto import tqdm

from anomalib_apc.benchmark.allocator import map_large_temporaries
from anomalib_apc.benchmark.data import (
    CategoryData,
    describe_datamodule_mismatch,
    make_datamodule,
    resolve_categories,
)
from anomalib_apc.benchmark.engines import (
    check_devices,
    engine,
    fit_and_test,
    is_main_process,
    scratch_output,
)
from anomalib_apc.benchmark.finetuning_reuse import derive_and_test
from anomalib_apc.benchmark.meter import RunMeter, warm_up
from anomalib_apc.benchmark.metrics import METRIC_NAMES
from anomalib_apc.benchmark.models import (
    Initialisation,
    build_models,
    check_variant_arguments,
    resolve_initialisation,
)
from anomalib_apc.benchmark.results import (
    BENCHMARK_OUTPUTS,
    DEMO_DATASET_DIR,
    RUNS_DIR,
    BenchmarkResult,
    ModelRun,
    SplitRun,
)
from anomalib_apc.benchmark.rows import Row, plan_rows
from anomalib_apc.benchmark.settings import APC, CONFIG_FILE, BenchmarkSettings
from anomalib_apc.benchmark.variants import select_variants
from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.errors import (
    InterruptedRunError,
    InvalidInputError,
    OutputExistsError,
    PretrainedWeightsUnavailableError,
)
from anomalib_apc.models.apc.init_weights import create_encoder_backbone

logger = logging.getLogger(__name__)


def run_benchmark(
    settings: BenchmarkSettings,
    on_split_done: Callable[[BenchmarkResult], None] | None = None,
) -> BenchmarkResult:
    """Run every category and seed; ``on_split_done`` is called after each (e.g. to write partial results).

    Every input is checked, and the output folder refused or cleared, before any training. A category
    whose data fails later (e.g. an unreadable image) fails its own runs; the others go on.

    Raises:
        OutputExistsError: The output folder holds files and ``overwrite`` is off.
        MissingInputError: The root, a category folder or the initial weights are missing.
        InvalidInputError: A setting that cannot be used.
    """
    settings = settings.resolved()
    map_large_temporaries()  # anomalib's coreset sampler would otherwise grow without bound (see allocator)
    variants = select_variants(settings.variants)
    check_variant_arguments(variants)
    rows = plan_rows(settings, variants)
    main = is_main_process()  # with --devices N, ranks 1..N-1 re-run this to join APC's fits (see engines)
    if main:
        refuse_existing_output(settings)
    check_devices(settings)
    categories = resolve_categories(settings, write_demo_dataset=main)
    initialisation = resolve_initialisation(settings)
    notices = [initialisation.notice] if initialisation.notice else []
    rows, skipped = split_off_unavailable_rows(settings, initialisation, rows)
    notices += skipped
    for notice in notices if main else []:
        logger.warning(notice)
    build_models(rows, settings, initialisation, settings.seeds[0])  # all can be built, before any training
    reused = [row.name for row in rows if row.reuses_apc_finetuning]
    if reused:
        skipped.append(f"Rows {', '.join(reused)} reuse APC's fine-tuning of the same seed: they differ from APC only "
                       "in arguments fine-tuning never reads; each builds its own memory bank, and its fine-tuning "
                       "time is APC's.")
    if main:
        clear_earlier_results(settings)
        settings.output.mkdir(parents=True, exist_ok=True)
        (settings.output / CONFIG_FILE).write_text(settings.as_config())
    result = BenchmarkResult(settings, rows, initialisation, describe_device(settings), notices=skipped)
    jobs = [(data, seed) for data in categories for seed in settings.seeds]
    progress = tqdm(jobs, desc="Benchmark", unit="split", disable=not main)
    with scratch_output(settings) as output:
        for data, seed in progress:
            progress.set_postfix_str(f"{data.category}, seed {seed}")
            split = run_split(settings, rows, initialisation, data, seed, output)
            result.splits.append(split)
            if on_split_done is not None and main:
                on_split_done(result)
    return result


def split_off_unavailable_rows(
    settings: BenchmarkSettings,
    initialisation: Initialisation,
    rows: tuple[Row, ...],
) -> tuple[tuple[Row, ...], list[str]]:
    """The rows that can run, and one notice per variant row left out because its pretrained weights cannot be had.

    Only ``imagenet-init``-like variants (``pre_trained`` without a checkpoint) ask the hub, once; when APC
    itself starts from the hub's weights, they are there.
    """
    wanting = [row for row in rows if row.variant and row.variant.needs_pretrained_weights]
    if not wanting or initialisation.pre_trained:
        return rows, []
    try:
        create_encoder_backbone(settings.backbone, pre_trained=True)
    except PretrainedWeightsUnavailableError as error:
        logger.info("Pretrained weights unavailable: %s", error)
        notices = [
            f"Row {row.name} skipped: timm's pretrained weights for {settings.backbone!r} cannot be had here (no "
            "model hub, not in the local cache)."
            for row in wanting
        ]
        return tuple(row for row in rows if row not in wanting), notices
    return rows, []


def refuse_existing_output(settings: BenchmarkSettings) -> None:
    """Refuse an output folder that holds anything but the demo dataset, unless ``overwrite`` is set.

    Raises:
        OutputExistsError: The output is a file, or a folder with other entries and ``overwrite`` is off.
    """
    output = settings.output
    if output.exists() and not output.is_dir():
        msg = f"--output {output} is a file; give a folder."
        raise OutputExistsError(msg)
    entries = sorted(path.name for path in output.iterdir() if path.name != DEMO_DATASET_DIR) if output.exists() else []
    if entries and not settings.overwrite:
        msg = (
            f"--output {output} is not empty (it holds {', '.join(entries[:5])}{', ...' * (len(entries) > 5)}); "
            "choose another folder, or pass --overwrite to replace the earlier results."
        )
        raise OutputExistsError(msg)


def clear_earlier_results(settings: BenchmarkSettings) -> None:
    """With ``overwrite``, delete what an earlier benchmark wrote into the output (tables, figures, runs).

    Only the benchmark's own entries are deleted, never other files of the folder; the demo dataset
    is kept, as it is written identically again.
    """
    if not settings.overwrite:
        return
    for name in BENCHMARK_OUTPUTS:
        path = settings.output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def describe_device(settings: BenchmarkSettings) -> str:
    """The device the runs use, as the report names it next to the timings, and the devices APC fine-tuned on."""
    accelerator = settings.device
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        device = f"{accelerator}: {torch.cuda.get_device_name()}"
    else:
        device = f"{accelerator}: CPU, {torch.get_num_threads()} threads"
    if settings.devices == 1:
        return device
    return f"{device}; the APC rows fine-tuned on {settings.devices} devices (Lightning DDP), every model tested on one"


def run_split(
    settings: BenchmarkSettings,
    rows: Sequence[Row],
    initialisation: Initialisation,
    data: CategoryData,
    seed: int,
    output: Path,
    num_example_images: int = 4,
) -> SplitRun:
    """Train and test every row's model on one category with one seed; run folders go under ``output``.

    Each fine-tuned row gets its own datamodule, built with the same split arguments and its variant's
    overrides; the baselines share one. A model that fails is recorded with its error and the others
    still run. The models' test sets are compared at the end; a difference marks every run of the
    split as failed. With ``devices`` > 1, ranks other than 0 only fit the rows that fine-tune on all
    devices and return no runs.
    """
    split_dir = output / RUNS_DIR / _slug(data.category) / f"seed{seed}"
    seed_everything(seed, workers=True)
    models = build_models(rows, settings, initialisation, seed)
    warm_up(models[APC], settings)
    datamodules = make_datamodules(rows, settings, data, seed)
    main = is_main_process()
    runs: list[ModelRun] = []
    meters: dict[str, RunMeter] = {}
    for row in rows:
        distributed = row.fits_on_all_devices(settings.devices)
        if not main and not distributed:
            continue  # rank 0 alone fits the baselines and derives rows from APC's fine-tuning
        meter = RunMeter()
        run = ModelRun(model=row.name, category=data.category, seed=seed)
        model, datamodule = models[row.name], datamodules[row.name]
        try:
            seed_everything(seed, workers=True)
            if row.reuses_apc_finetuning:
                tester = engine(settings, split_dir / _slug(row.name), meter)
                metrics, finetune_s, memory_bank_s = derive_and_test(model, models[APC], runs, tester, datamodule)
                _fill_run(run, row, model, metrics, meter)
                run.finetune_s, run.memory_bank_s = finetune_s, memory_bank_s
            else:
                metrics = fit_and_test(settings, model, datamodule, split_dir / _slug(row.name), meter, distributed)
                if metrics is None:
                    continue  # another rank's share of a DDP fit: rank 0 tests and records it
                _fill_run(run, row, model, metrics, meter)
            meters[row.name] = meter
        except InterruptedRunError:
            raise  # a stopped run ends the whole benchmark, it is no model's failure
        except Exception as error:  # one failing model must not lose the others' results
            logger.exception("%s failed on %s, seed %d", row.name, data.category, seed)
            run.error = f"{type(error).__name__}: {error}"
        if main:
            runs.append(run)

    finished = [run for run in runs if run.ok]
    others = {id(module): module for name, module in datamodules.items() if name != APC}
    mismatch = describe_split_mismatch(finished, datamodules[APC], *others.values())
    if mismatch:
        for run in finished:
            run.error = f"Split mismatch: {mismatch}"
    elif finished:
        labels_by_path = meters[finished[0].model].labels_by_path()
        examples = select_example_images(labels_by_path, num_example_images)
        for run in finished:
            run.evidence = meters[run.model].evidence(examples)
    return SplitRun(data.category, seed, runs)


def make_datamodules(
    rows: Sequence[Row], settings: BenchmarkSettings, data: CategoryData, seed: int
) -> dict[str, SupervisedMVTecAD]:
    """Each row's datamodule by row name: one per fine-tuned row (a variant's ``data.init_args`` applied),
    one that the baselines share.

    All are built with the same split arguments and seed, so they move the same anomalies to training.
    """
    shared = make_datamodule(settings, data, seed)
    return {
        row.name: make_datamodule(settings, data, seed, **row.data_arguments) if row.fine_tunes else shared
        for row in rows
    }


def _fill_run(run: ModelRun, row: Row, model: AnomalibModule, metrics: dict[str, float], meter: RunMeter) -> None:
    missing = [name for name in METRIC_NAMES if name not in metrics]
    if missing:
        msg = f"the evaluator reported no {missing} (does the test set have anomalies and masks?)"
        raise InvalidInputError(msg)
    run.metrics = {name: float(metrics[name]) for name in METRIC_NAMES}
    if row.fine_tunes:
        run.finetune_s, run.memory_bank_s = meter.training_pass_s, meter.fit_s
    else:
        run.memory_bank_s = meter.training_pass_s + meter.fit_s  # Patchcore has no fine-tuning: finetune_s stays NaN
    run.num_test_images = meter.num_test_images
    run.num_test_anomalous = sum(meter.labels_by_path().values())
    run.inference_ms_per_image = 1000 * meter.inference_s / max(meter.num_test_images, 1)
    run.memory_bank_rows, run.memory_bank_dim = _memory_bank_shape(model)
    run.test_image_paths = list(meter.image_paths)


def _memory_bank_shape(model: AnomalibModule) -> tuple[int, int]:
    """Rows and width of a model's memory bank (a tensor, or an object holding one as ``bank``); (0, 0) without."""
    bank = getattr(model.model, "memory_bank", None)
    bank = getattr(bank, "bank", bank)
    if not isinstance(bank, torch.Tensor) or bank.ndim != 2:
        return 0, 0
    return int(bank.shape[0]), int(bank.shape[1])


def describe_split_mismatch(
    runs: Sequence[ModelRun],
    apc_datamodule: SupervisedMVTecAD,
    *other_datamodules: SupervisedMVTecAD,
) -> str | None:
    """Describe how the models' data differ, or ``None`` when they saw the same split.

    The test images each run was scored on must be identical; every other datamodule (the baselines',
    each variant's) must have moved the same anomalies to training and hold the same normal images as APC's.
    """
    tested = {run.model: run.test_image_paths for run in runs}
    reference_model, reference_paths = next(iter(tested.items()), (None, []))
    for model, paths in tested.items():
        if paths != reference_paths:
            only_here = sorted(set(paths) - set(reference_paths))[:3]
            only_there = sorted(set(reference_paths) - set(paths))[:3]
            return (
                f"{model} was tested on {len(paths)} images, {reference_model} on {len(reference_paths)} "
                f"(only in {model}: {only_here}, only in {reference_model}: {only_there})"
            )
    if APC not in tested or len(tested) < 2:
        return None  # nothing to compare: the datamodule of a failed run may not have set up
    for other in other_datamodules:
        mismatch = describe_datamodule_mismatch(apc_datamodule, other)
        if mismatch:
            return mismatch
    return None


def select_example_images(labels_by_path: dict[str, int], count: int) -> list[str]:
    """``count`` test images for the side-by-side figure: evenly spread anomalous ones and one normal one.

    Depends only on the test set, so every model's maps of the same images are shown.
    """
    anomalous = sorted(path for path, label in labels_by_path.items() if label == 1)
    normal = sorted(path for path, label in labels_by_path.items() if label == 0)
    num_anomalous = min(len(anomalous), count - 1 if normal else count)
    picks = np.linspace(0, len(anomalous) - 1, num_anomalous).round().astype(int) if num_anomalous else []
    return [anomalous[index] for index in dict.fromkeys(picks)] + normal[:1]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
