"""Benchmarks of the pipeline on the local stack, each figure next to a ceiling measured in the same run."""
