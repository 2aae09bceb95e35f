"""Benchmarks for fusedemb: the ``python -m fusedemb.bench`` command line and the pieces it is made of.

    configs.py         model presets and the problems a sweep is made of
    ids.py             token-id distributions: uniform, Zipf, one id everywhere, tokenized text
    implementations.py what is compared: fusedemb's kernels, PyTorch eager, torch.compile, the reference
    gate.py            the correctness gate every implementation passes before it is timed
    passes.py          inputs and the timed callables for forward, backward and forward+backward
    bytes_model.py     the bytes each pass must move, the basis of GB/s
    timing.py          CPU (perf_counter) and CUDA (events) timers, caches flushed; copy bandwidth
    memory.py          peak memory a pass allocates on top of what it starts with
    runner.py          runs a sweep: gate, time, measure, compare
    environment.py     device name, versions and threads recorded with every run
    report.py          the table and the JSON file
    plot.py            the GB/s figure (matplotlib, imported only when a plot is asked for)
    cli.py             argument parsing and main()

Importing it imports fusedemb (its package, the kernels included) and torch, nothing more: tiktoken
only when text ids are asked for, matplotlib only when a plot is, and tqdm (the bench extra's
progress bar) only when a sweep runs: the demo imports the CLI's argument helpers without it.
"""
