"""Speed and memory benchmarks (run as scripts: ``python benchmarks/NAME.py``); shared helpers."""
