"""Benchmarks (not unit tests): training rounds, unlearning costs and memory, each beside its baselines.

Run from the repository root, e.g. `python -m benchmarks.training --clients 100 --examples 600`;
every command prints medians and writes JSON under `benchmarks/results/` (see BENCHMARKS.md).
"""
