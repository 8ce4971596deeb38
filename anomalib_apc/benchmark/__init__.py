"""Side-by-side benchmark of anomalib's Patchcore and AnomalousPatchCore on one supervised split.

One job per module: ``settings`` declares every option (the command line is built from it,
``cli_option`` says how each appears there) and ``profiles`` the defaults per kind of dataset; ``rows``
decides the table's rows once (name, kind, how the model is made, data overrides, what it reuses),
``baselines`` any anomalib model as a row, ``variants`` APC rows from ``configs/ablations/``; ``data``
checks the dataset folders and builds the datamodules; ``models`` builds each row's model on identical
weights and coreset seeds; ``engines`` fits and tests them (on one device, or APC with Lightning's DDP
for ``--devices N``), ``finetuning_reuse`` derives rows from APC's fine-tuning, ``meter`` times them (a
Lightning callback) and ``metrics`` scores them; ``results`` holds the records, ``runner`` orchestrates,
``allocator`` keeps anomalib's coreset sampler's memory bounded; ``report``, ``verdict`` and ``figures``
write the tables, the verdict and the figures; ``cli`` is the ``anomalib-apc benchmark`` command
(jsonargparse: ``--config``, ``--print_config``). Run it from Python with::

    from anomalib_apc.benchmark.report import write_report
    from anomalib_apc.benchmark.runner import run_benchmark
    from anomalib_apc.benchmark.settings import BenchmarkSettings

    result = run_benchmark(BenchmarkSettings(dataset="demo", output=Path("results/demo")))
    write_report(result)

With ``devices`` > 1, Lightning re-runs the calling script for the other ranks, which must call
``run_benchmark`` with the same settings: they join APC's fits and return a result without runs, so
write the report only where ``anomalib_apc.benchmark.engines.is_main_process()``.

Importing this package imports nothing heavy, because the console script builds its parser from ``cli``.
"""
