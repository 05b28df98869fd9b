"""`python -m bench [--smoke]`: the benchmark harness (see bench/harness.py)."""

from bench.harness import app

if __name__ == "__main__":
    app()
