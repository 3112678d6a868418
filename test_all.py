"""
The test runner: finds every tests/test_*.py, runs its test_* functions, prints one line each.

Tests are plain `def test_<module>_<property>():` functions with bare asserts, one file per module
(tests/test_bpe.py, tests/test_gpt.py, ...), with what several files share in tests/fixtures.py.
They are hermetic: CPU only, no network, tiny data made inside the test, temp directories, fixed
seeds. Checks that read ../shared/mirror skip cleanly where it is absent.

Left out on purpose:
- test discovery beyond test_* functions in tests/test_*.py (no classes, fixtures by argument,
  or parallel workers): pytest does all that, and works on the same files

Usage:
    python test_all.py            # every test; the last line is "N passed, M failed"
    python test_all.py bpe        # only tests whose name contains "bpe"
    pytest tests/                 # also works; nothing requires it
"""
import importlib
import inspect
import os
import sys
import time
import unittest

import torch

TESTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")


def collect(pattern: str) -> list:
    """[(name, function)] of every test_* function in tests/test_*.py whose name contains pattern,
    in file order and, within a file, in the order they are written."""
    tests = []
    for file in sorted(f for f in os.listdir(TESTS_DIR)
                       if f.startswith("test_") and f.endswith(".py")):
        module = importlib.import_module(f"tests.{file[:-3]}")
        functions = [f for n, f in vars(module).items()
                     if n.startswith("test_") and inspect.isfunction(f)
                     and f.__module__ == module.__name__ and pattern in n]
        tests += [(f.__name__, f)
                  for f in sorted(functions, key=lambda f: f.__code__.co_firstlineno)]
    return tests


def main():
    """Run every test (filtered by argv[1]), print PASS/FAIL/SKIP with times, exit 1 on failure."""
    pattern = sys.argv[1] if len(sys.argv) > 1 else ""
    # One intra-op thread: the test models are tiny, so thread hand-offs cost more than they save
    # (measured: the sampler tests took 3.4 s with one thread, 26 s with two on a busy 2-core
    # machine).
    torch.set_num_threads(1)
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    t_start = time.time()
    for name, fn in collect(pattern):
        t0 = time.time()
        try:
            fn()
            status, note = "PASS", ""
        except unittest.SkipTest as e:
            status, note = "SKIP", f" ({e})"
        except Exception as e:  # the runner reports every failure and goes on
            status, note = "FAIL", f"\n    {type(e).__name__}: {e}"
        counts[status] += 1
        print(f"{status} {name} {time.time() - t0:.2f}s{note}", flush=True)
    print(f"total {time.time() - t_start:.1f}s")
    skipped = f", {counts['SKIP']} skipped" if counts["SKIP"] else ""
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed{skipped}")
    sys.exit(1 if counts["FAIL"] else 0)


if __name__ == "__main__":
    main()
