"""The reproduction study behind docs/RESULTS.md (driven by ``bench/study.py``).

``data`` (Omniglot in memory, the pair protocol, evaluation), ``runs`` (warm start and arms),
``costs`` (step-time overhead, memory), ``report`` / ``markdown`` (tables, plots, RESULTS.md).
"""
