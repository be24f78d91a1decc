"""Process-tree measurements shared by the benchmarks (psutil): peak RSS and CPU seconds.

A Ray job's memory and CPU are spread over the driver, GCS, raylet and worker processes, so both
measurements sum over a process and all its descendants. RSS counts shared pages once per
process, so the peak over-counts memory shared between Ray workers (an upper bound).
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss_bytes(root: psutil.Process) -> int:
    """Resident bytes of ``root`` and its descendants (processes that vanish count 0)."""
    total = 0
    for p in _tree(root):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def tree_cpu_seconds(root: psutil.Process | None = None) -> float:
    """User + system CPU seconds of ``root`` (default: this process) and its live descendants."""
    total = 0.0
    for p in _tree(root or psutil.Process()):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], cwd: Path, interval_s: float = 0.2) -> dict:
    """Run ``cmd`` to completion, sampling its process tree's RSS every ``interval_s`` seconds.

    Returns ``{"rc", "seconds" (wall), "peak_rss_mib", "log" (stdout + stderr)}``.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak, stop = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss_bytes(root))
            time.sleep(interval_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    return {"rc": proc.returncode, "seconds": time.perf_counter() - t0, "peak_rss_mib": peak / 2**20, "log": out}
