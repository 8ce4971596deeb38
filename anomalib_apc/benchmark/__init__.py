"""Side-by-side benchmark of anomalib's Patchcore and AnomalousPatchCore on one supervised split.

One job per module: ``settings`` declares every option and default (the command line is built from
it), ``data`` checks the dataset folders and builds the datamodules, ``models`` builds the compared
models on identical weights and coreset seeds, ``meter`` times them (a Lightning callback),
``results`` holds the records, ``runner`` orchestrates, ``report`` and ``figures`` write the tables
and figures, ``cli`` is the ``anomalib-apc benchmark`` command. Run it from Python with::

    from anomalib_apc.benchmark.report import write_report
    from anomalib_apc.benchmark.runner import run_benchmark
    from anomalib_apc.benchmark.settings import BenchmarkSettings

    result = run_benchmark(BenchmarkSettings(dataset="demo", output=Path("results/demo")))
    write_report(result)

Importing this package imports nothing heavy, because the console script builds its parser from ``cli``.
"""
