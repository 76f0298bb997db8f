"""Wall-clock time of the demo from nothing: the default (target < 10 min on 2 CPU cores) and --quick (< 2 min).

    python benchmarks/demo_time.py [--skip-default]

Each run starts in an empty temporary run folder, so every stage runs. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

TARGETS = {"quick": 120.0, "default": 600.0}


def timed_demo(quick: bool) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        args = [sys.executable, "-m", "pmrlhf", "demo", "--run-dir", run_dir, *(["--quick"] if quick else [])]
        start = time.perf_counter()
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-default", action="store_true", help="time only --quick")
    args = parser.parse_args()
    results = {}
    for name in ("quick",) if args.skip_default else ("quick", "default"):
        seconds = timed_demo(name == "quick")
        results[f"{name}_s"] = seconds
        print(f"demo {name}: {seconds:.0f} s (target < {TARGETS[name]:.0f} s)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
