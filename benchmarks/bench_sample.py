"""Sample job: wall time and peak memory of a full run, and of a fully cached re-run, in one run.

    .venv/bin/python benchmarks/bench_sample.py [--config configs/sample.yaml] [--set k=v ...]

Runs ``pipeline/run.py`` twice in a fresh work directory as subprocesses, sampling the
resident memory of the whole process tree (driver + Ray workers) every 0.2 s with psutil.
Prints a table, the cached/full wall-time ratio, and one JSON line. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from _measure import run_measured  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/sample.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zeroseg-bench-") as work:
        cmd = [sys.executable, "pipeline/run.py", "--config", args.config, "--work-dir", work]
        for o in args.overrides:
            cmd += ["--set", o]
        full = run_measured(cmd, REPO)
        if full["rc"] != 0:
            print(full["log"][-3000:])
            return 1
        cached = run_measured(cmd, REPO)
        if cached["rc"] != 0 or "ran" in _statuses(cached["log"]):
            print(cached["log"][-3000:])
            return 1
    print(f"{'run':<14}{'wall s':>10}{'peak RSS MiB':>16}")
    print(f"{'full':<14}{full['seconds']:>10.1f}{full['peak_rss_mib']:>16.0f}")
    print(f"{'cached re-run':<14}{cached['seconds']:>10.1f}{cached['peak_rss_mib']:>16.0f}")
    print(f"cached/full wall-time ratio: {cached['seconds'] / full['seconds']:.3f}")
    print(f"cached re-run: {cached['seconds']:.2f} s (target: under 3 s; it imports neither torch nor Ray)")
    print(
        json.dumps(
            {
                "bench": "sample_job",
                "config": args.config,
                "full_s": round(full["seconds"], 2),
                "full_peak_rss_mib": round(full["peak_rss_mib"]),
                "cached_s": round(cached["seconds"], 2),
                "cached_peak_rss_mib": round(cached["peak_rss_mib"]),
                "cached_over_full": round(cached["seconds"] / full["seconds"], 4),
            }
        )
    )
    return 0


def _statuses(log: str) -> set[str]:
    words = set()
    for line in log.splitlines():
        for w in ("ran", "cached", "failed"):
            if f" {w} " in f" {line} " and "│" in line:
                words.add(w)
    return words


if __name__ == "__main__":
    sys.exit(main())
