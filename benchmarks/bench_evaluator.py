"""Confusion-matrix throughput of the evaluator against the textbook per-image NumPy loop.

Real label maps: ``../shared/data/camvid-val/labels/*.png`` (101 CamVid frames, 360 x 480,
11 classes, void 11 -> ignore 255). Predictions: uniformly random class ids, fixed seed, int64
(the dtype of an argmax). Every implementation must produce the same ``[C, C]`` matrix.

Implementations timed:

- ``textbook``: per image, ``m = gt != 255; np.bincount(C * gt[m] + pred[m], minlength=C*C)``;
- ``zeroseg.confusion.confusion_matrix`` (NumPy): one bincount per batch, ignore routed to a dropped
  extra row through a lookup table (no masked copies);
- ``zeroseg.confusion.confusion_matrix_torch`` on CPU (and CUDA when present): what evaluate's
  workers run, ``torch.bincount`` per batch on the scores' device.

Each implementation runs over the whole label set ``--repeats`` times, interleaved (so machine
load hits them alike); the median pass is reported in megapixels/s (label pixels, ignored ones
included) and the ratio to ``textbook``. Prints a table, then one JSON line. Never asserted.

    python benchmarks/bench_evaluator.py [--labels DIR] [--batch-size 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from zeroseg.confusion import confusion_matrix, confusion_matrix_torch  # noqa: E402

DEFAULT_LABELS = REPO.parent / "shared" / "data" / "camvid-val" / "labels"
NUM_CLASSES, VOID, IGNORE = 11, 11, 255


def load_labels(folder: Path) -> list[np.ndarray]:
    files = sorted(folder.glob("*.png"))
    if not files:
        raise SystemExit(f"no label PNGs in {folder}")
    out = []
    for f in files:
        lab = np.array(Image.open(f), dtype=np.uint8)
        lab[lab == VOID] = IGNORE
        out.append(lab)
    return out


def textbook(preds: list[np.ndarray], gts: list[np.ndarray], c: int) -> np.ndarray:
    cm = np.zeros(c * c, np.int64)
    for p, g in zip(preds, gts):
        m = g != IGNORE
        cm += np.bincount(c * g[m].astype(np.int64) + p[m], minlength=c * c)
    return cm.reshape(c, c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    ap.add_argument("--batch-size", type=int, default=8, help="images per evaluator call (evaluate.batch_size)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    gts = load_labels(args.labels)
    if len({g.shape for g in gts}) != 1:
        raise SystemExit("the batched implementations need equally sized label maps")
    rng = np.random.default_rng(args.seed)
    preds = [rng.integers(0, NUM_CLASSES, size=g.shape, dtype=np.int64) for g in gts]
    c, bs = NUM_CLASSES, args.batch_size
    mpix = sum(g.size for g in gts) / 1e6

    # batches prepared once (stacking is the data loader's job, not the evaluator's)
    np_batches = [(np.stack(preds[i : i + bs]), np.stack(gts[i : i + bs])) for i in range(0, len(gts), bs)]
    t_batches = [(torch.from_numpy(p), torch.from_numpy(g)) for p, g in np_batches]

    impls = {
        "textbook (per-image np.bincount, masked)": lambda: textbook(preds, gts, c),
        "zeroseg.confusion.confusion_matrix (numpy, batched)": lambda: sum(
            confusion_matrix(p, g, c) for p, g in np_batches
        ),
        "zeroseg.confusion.confusion_matrix_torch (cpu, batched)": lambda: sum(
            confusion_matrix_torch(p, g, c) for p, g in t_batches
        ).numpy(),
    }
    if torch.cuda.is_available():
        cuda_batches = [(p.cuda(), g.cuda()) for p, g in t_batches]

        def on_cuda():
            out = sum(confusion_matrix_torch(p, g, c) for p, g in cuda_batches)
            torch.cuda.synchronize()
            return out.cpu().numpy()

        impls["zeroseg.confusion.confusion_matrix_torch (cuda, batched)"] = on_cuda

    ref = textbook(preds, gts, c)
    for name, fn in impls.items():  # correctness + warm-up
        got = fn()
        if not np.array_equal(np.asarray(got), ref):
            raise SystemExit(f"{name} disagrees with the textbook confusion matrix")

    times: dict[str, list[float]] = {n: [] for n in impls}
    for _ in range(args.repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    base = statistics.median(times[next(iter(impls))])
    rows = []
    for name in impls:
        med = statistics.median(times[name])
        rows.append(
            {
                "impl": name,
                "median_s": med,
                "min_s": min(times[name]),
                "megapixels_per_s": mpix / med,
                "ratio_vs_textbook": base / med,
            }
        )
    print(
        f"confusion matrix throughput: {len(gts)} CamVid label maps {gts[0].shape[1]}x{gts[0].shape[0]} "
        f"({mpix:.2f} MP, {100 * np.mean([np.mean(g == IGNORE) for g in gts]):.1f}% ignore), C={c}, "
        f"batch {bs}, {args.repeats} interleaved repeats, median"
    )
    w = max(len(r["impl"]) for r in rows)
    print(f"{'implementation':<{w}}  {'MP/s':>9}  {'x textbook':>10}")
    for r in rows:
        print(f"{r['impl']:<{w}}  {r['megapixels_per_s']:>9.1f}  {r['ratio_vs_textbook']:>10.2f}")
    print(
        json.dumps(
            {
                "benchmark": "confusion_matrix_throughput",
                "labels": str(args.labels),
                "images": len(gts),
                "megapixels": mpix,
                "num_classes": c,
                "batch_size": bs,
                "repeats": args.repeats,
                "results": rows,
                "machine": {
                    "python": platform.python_version(),
                    "numpy": np.__version__,
                    "torch": torch.__version__,
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
