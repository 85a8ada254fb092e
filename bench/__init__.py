"""Benchmarks of the image-prompt engine, run on purpose (never by pytest).

``python -m bench.run --help`` lists the options; ``docs/performance.md`` has the commands, the
numbers and what they mean.
"""
