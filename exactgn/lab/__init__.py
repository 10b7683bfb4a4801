"""The lab: the experiment harness built on the exactgn library (docs/design.md, §6).

Run configurations and their schema, datasets, the run-folder contract, checkpoints, the training loop,
comparisons, sweeps, studies, diagnostics, reports and the benchmark, i.e. everything the ``exactgn`` command
runs. The lab imports the library; the library never imports the lab. Its dependencies (numpy, tqdm,
matplotlib, pydantic) come with the ``lab`` extra.
"""
