"""Benchmarks behind ``slidessl bench attention`` and ``slidessl bench encoder``: the
harness (``harness``: timing, the measured matmul peak, memory), the benchmarks
(``attention``, ``encoder``) and their sub-command (``commands``).

A layer above ``eval`` and below the command line: it imports the models it times, and
nothing in ``slidessl`` but ``cli`` imports it. Every number is a ratio measured in the
same run: dilated vs dense time, and achieved FLOP/s as a fraction of a square-matmul peak
measured first on the same device and dtype.
"""
