"""Side-by-side benchmark of anomalib's Patchcore and AnomalousPatchCore on one supervised split.

``runner`` trains and measures the models, ``report`` writes the tables and figures, ``cli`` is the
``anomalib-apc benchmark`` command. Run it from Python with::

    from anomalib_apc.benchmark.report import write_report
    from anomalib_apc.benchmark.runner import BenchmarkSettings, run_benchmark

    result = run_benchmark(BenchmarkSettings(dataset="demo", output=Path("results/demo")))
    write_report(result)

Importing this package imports nothing heavy, because the console script builds its parser from ``cli``.
"""
