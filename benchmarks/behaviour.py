"""Behaviour record: the evaluation metrics and the sha256 of every trained weights file of the
sample configs, so that a refactor can show it changed nothing a researcher sees.

    python benchmarks/behaviour.py record [CONFIG ...]   # run the configs, write the record
    python benchmarks/behaviour.py check  [CONFIG ...]   # run them again, compare with the record

Each config runs with ``zeroseg run`` into one shared scratch work directory (so configs that
share upstream stages train them once, as the tests do), then its plan gives every stage's key;
per stage the record keeps the sha256 of each ``*.pt`` file of its artifact (trained weights,
the generator) and evaluate's metrics without timings (``fps``, ``seconds``: not a behaviour).
The record is ``benchmarks/behaviour_record.json``; keys themselves are not compared (a code
change re-keys on purpose), the values stored under them are.

Prints one line per config and value: ``same`` or what differs; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECORD = ROOT / "benchmarks" / "behaviour_record.json"
CONFIGS = (
    "sample",
    "sample_zegclip",
    "sample_zegclip_st",
    "sample_proposals",
    "sample_zegformer",
    "sample_deop",
    "sample_pading",
)
#: Metric names whose values measure the machine, not the model.
TIMING_WORDS = ("fps", "seconds", "wall", "time", "images_per_s", "throughput")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_timing(name: str) -> bool:
    low = name.lower()
    return any(w in low for w in TIMING_WORDS)


def observe(config: str, work: Path) -> dict:
    """Run ``configs/<config>.yaml`` into ``work`` and return ``{stage: {"weights": {file: sha},
    "metrics": {...}}}`` for its plan."""
    cfg_path = ROOT / "configs" / f"{config}.yaml"
    cmd = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--config", str(cfg_path), "--work-dir", str(work)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(
            f"{config}: zeroseg run failed (rc {res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
        )
    from pipeline.catalogue import load_catalogue
    from pipeline.config import load_config
    from pipeline.plan import plan
    from pipeline.store import ArtifactStore

    cfg = load_config(cfg_path, [f"run.work_dir={work}"])
    cat = load_catalogue()
    store = ArtifactStore(cfg.run.store_uri(), work / "cache", cfg.run.verify)
    p = plan(cfg, cat.stages, None, store, code_packages=cat.code_packages)
    out: dict = {}
    for n in p:
        adir = Path(cfg.run.store_uri()) / n.name / n.key
        manifest = json.loads((adir / "manifest.json").read_text())
        weights = {f.relative_to(adir).as_posix(): _sha(f) for f in sorted(adir.rglob("*.pt"))}
        metrics = {k: v for k, v in (manifest.get("metrics") or {}).items() if not _is_timing(k)}
        entry: dict = {}
        if weights:
            entry["weights"] = weights
        if n.name == "evaluate" or n.name.startswith("evaluate"):
            entry["metrics"] = metrics
        if entry:
            out[n.name] = entry
    return out


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)  # exact, NaN equal to NaN
    return a == b


def compare(config: str, want: dict, got: dict) -> list[str]:
    """Lines naming each differing value (empty: the same)."""
    diffs = []
    for stage in sorted(set(want) | set(got)):
        w, g = want.get(stage, {}), got.get(stage, {})
        for part in ("weights", "metrics"):
            wp, gp = w.get(part, {}), g.get(part, {})
            for k in sorted(set(wp) | set(gp)):
                if k not in wp or k not in gp or not _close(wp[k], gp[k]):
                    diffs.append(f"{config}: {stage} {part} {k}: recorded {wp.get(k)!r}, now {gp.get(k)!r}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("record", "check"))
    ap.add_argument("configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--work-dir", help="scratch work directory (default: a new temporary one)")
    args = ap.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="zeroseg-behaviour-")).resolve()
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    bad = 0
    for config in args.configs:
        got = observe(config, work)
        if args.mode == "record":
            record[config] = got
            n_w = sum(len(v.get("weights", {})) for v in got.values())
            print(f"{config}: recorded {n_w} weights file(s), metrics of {[s for s in got if 'metrics' in got[s]]}")
            RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        else:
            if config not in record:
                print(f"{config}: no record (run `record` first)")
                bad += 1
                continue
            diffs = compare(config, record[config], got)
            bad += bool(diffs)
            print("\n".join(diffs) if diffs else f"{config}: same")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
