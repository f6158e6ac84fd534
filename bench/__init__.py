"""Benchmarks (`make bench`): figures for the README, written to bench/results.json."""
