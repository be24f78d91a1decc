"""Training-feed throughput: Ray Data vs a PyTorch DataLoader, same loop, same cores; and the peak
memory of a 2-worker fit. In one run.

    .venv/bin/python benchmarks/bench_train_feed.py [--cpus N] [--steps 60] [--batch 8] [--crop 256]

(a) ``ray``: ``pipeline.training.fit`` in-process (``num_workers=0``) reading
    ``stages.feeds.train_dataset`` (manifest -> from_arrow -> map_batches decode/remap/augment) through
    ``Loop.batches`` (``iter_torch_batches``), Ray started with ``--cpus`` CPUs;
(b) ``dataloader``: the same model, optimiser and step over ``torch.utils.data.DataLoader`` with
    ``--cpus`` worker processes running the same ``zeroseg.data.transforms`` per sample.

Both use real CamVid frames from ``../shared/data/camvid-val`` (each listed ``--repeat`` times so an
epoch is as long as a real dataset's few hundred steps), random rescale (0.5-2.0) + ``--crop`` crops + flip, a small
conv net, ``torch.set_num_threads(--torch-threads)``. Throughput is images/s over the steps after
``--steps`` warm-up steps (worker start-up excluded), measured ``--rounds`` times alternately
(DataLoader, Ray, DataLoader, Ray, ...) so that load from other users hits both alike; the target is
mean(ray) / mean(dataloader) >= 0.9. ``Ray Data (preserve_order off)`` is one extra measurement.

(c) peak RSS of a 2-worker ``fit`` (``num_workers=2``, 0.5 CPU each, 2-CPU embedded cluster) run
    as a subprocess: the sum over the whole process tree (driver, raylet, GCS, train workers,
    Ray Data workers), sampled every 0.2 s with psutil. Shared pages are counted once per process,
    so this over-states the machine's use.

Prints a table and one JSON line. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = Path(os.environ.get("ZEROSEG_DATA", REPO.parent / "shared" / "data"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _measure import run_measured, tree_cpu_seconds  # noqa: E402

from pipeline.dag import Artifact  # noqa: E402
from stages.feeds import decode_train_batch, manifest_table  # noqa: E402
from stages.methods.zegclip import ZegCLIPMethod  # noqa: E402
from zeroseg.data.split_files import manifest_schema  # noqa: E402
from zeroseg.data.transforms import AugmentConfig, make_lut  # noqa: E402

LUT = make_lut(list(range(11)))  # CamVid: 11 classes, 11 = void -> 255


# -- shared pieces ---------------------------------------------------------------------------
def write_manifest(root: Path, repeat: int) -> Artifact:
    """A build_splits-style artifact at ``root`` whose train manifest lists every CamVid frame
    ``repeat`` times (ids ``stem#r``); its ``labels`` link to CamVid's label folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = sorted((DATA / "camvid-val" / "images").glob("*.png"))
    if not imgs:
        sys.exit(f"no CamVid images under {DATA}/camvid-val/images")
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    if not (root / "labels").exists():
        (root / "labels").symlink_to(DATA / "camvid-val" / "labels")
    rows = [
        {
            "image_id": f"{p.stem}#{r}",
            "image": p.name,
            "label": f"labels/{p.name}",
            "height": 360,
            "width": 480,
            "classes": list(range(11)),
            "dataset": "camvid",
        }
        for r in range(repeat)
        for p in imgs
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), root / "manifests" / "train.parquet")
    return Artifact(
        "build_splits",
        "b" * 64,
        root,
        str(root),
        {"files": []},
        runtime={"image_roots": {"train": str(DATA / "camvid-val" / "images")}},
    )


def make_model() -> torch.nn.Module:
    def block(i, o):
        return [torch.nn.Conv2d(i, o, 3, stride=2, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]

    return torch.nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), torch.nn.Conv2d(64, 11, 1))


def step(model, opt, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(images)
    target = labels[:, ::8, ::8].long()  # the net predicts at 1/8 resolution
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


class Meter:
    """images/s and images per CPU-second (whole process tree) over the steps after the warm-up.

    The CPU-second figure is far less sensitive to other users' load than images/s."""

    def __init__(self, warmup: int):
        self.warmup, self.n, self.images, self.t0, self.c0 = warmup, 0, 0, None, None

    def tick(self, images: int) -> None:
        self.n += 1
        if self.n == self.warmup:
            self.t0, self.c0 = time.perf_counter(), tree_cpu_seconds()
        elif self.n > self.warmup:
            self.images += images

    def rate(self) -> float:
        return self.images / (time.perf_counter() - self.t0)

    def per_cpu_s(self) -> float:
        return self.images / max(tree_cpu_seconds() - self.c0, 1e-9)


# -- (a) Ray Data via the real training wrapper ------------------------------------------------
def ray_loop(loop) -> None:
    cfg = loop.config
    torch.set_num_threads(cfg["torch_threads"])
    model = loop.prepare(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=loop.lr, momentum=0.9)
    loop.restore(model, opt)
    meter = Meter(cfg["warmup"])
    for batch in loop.batches("train"):
        loss = step(model, opt, batch["image"], batch["label"])
        loop.step_done(loss, images=len(batch["image"]))
        meter.tick(len(batch["image"]))
    Path(cfg["out"]).write_text(json.dumps({"img_s": meter.rate(), "img_cpu_s": meter.per_cpu_s()}))


def bench_ray(manifest: Artifact, args, work: Path, deterministic: bool, tag: str = "") -> tuple[float, float]:
    from pipeline.training import ScalingSection, TrainSection, fit
    from stages.feeds import train_dataset

    aug = AugmentConfig(crop_size=(args.crop, args.crop))
    ds = train_dataset(manifest, LUT, aug, seed=0, block_rows=args.block_rows)
    out = work / f"ray-{deterministic}-{tag}.json"
    fit(
        ray_loop,
        {"torch_threads": args.torch_threads, "warmup": args.steps, "out": str(out)},
        {"train": ds},
        ScalingSection(num_workers=0),
        TrainSection(
            max_steps=2 * args.steps,
            batch_size=args.batch,
            lr=0.01,
            checkpoint_every=10**6,
            log_every=args.steps,
            deterministic_data=deterministic,
            prefetch_batches=args.prefetch,
        ),
        str(work / "store"),
        f"feed-{deterministic}-{tag}",
        log=lambda m: None,
    )
    r = json.loads(out.read_text())
    return r["img_s"], r["img_cpu_s"]


# -- (b) PyTorch DataLoader over the same transforms --------------------------------------------
class ManifestDataset(torch.utils.data.Dataset):
    def __init__(self, manifest: Artifact, aug: AugmentConfig, seed: int):
        t = manifest_table(manifest, "train").select(["image_id", "image_uri", "label_uri"]).to_pydict()
        self.rows = list(zip(t["image_id"], t["image_uri"], t["label_uri"]))
        self.aug, self.seed = aug, seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        # the Ray Data feed's own per-sample code, on a one-row batch
        image_id, img_uri, lbl_uri = self.rows[i]
        row = {"image_id": np.array([image_id]), "image_uri": np.array([img_uri]), "label_uri": np.array([lbl_uri])}
        # epoch 0: persistent DataLoader workers cannot see the pass index
        out = decode_train_batch(row, lut=LUT, augment=self.aug, seed=self.seed, epoch=0)
        return torch.from_numpy(out["image"][0]), torch.from_numpy(out["label"][0])


def bench_dataloader(manifest: Artifact, args) -> tuple[float, float]:
    torch.set_num_threads(args.torch_threads)
    ds = ManifestDataset(manifest, AugmentConfig(crop_size=(args.crop, args.crop)), seed=0)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.cpus,
        persistent_workers=True,
        prefetch_factor=args.prefetch,
        generator=torch.Generator().manual_seed(0),
    )
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    meter, done = Meter(args.steps), 0
    while done < 2 * args.steps:
        for images, labels in dl:
            step(model, opt, images, labels)
            meter.tick(len(images))
            done += 1
            if done >= 2 * args.steps:
                break
    return meter.rate(), meter.per_cpu_s()


# -- (c) peak memory of a 2-worker fit -----------------------------------------------------------
def fit_child(work: Path, steps: int) -> None:
    """Runs in a subprocess: an embedded 2-CPU cluster and a 2-worker fit on the real feed."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    from pipeline.training import ScalingSection, TrainSection, fit
    from stages.feeds import train_dataset

    manifest = write_manifest(work / "child", repeat=1)
    ds = train_dataset(manifest, LUT, AugmentConfig(crop_size=(256, 256)), seed=0, block_rows=4)
    t0 = time.perf_counter()
    res = fit(
        ray_loop,
        {"torch_threads": 1, "warmup": 2, "out": str(work / "child.json")},
        {"train": ds},
        ScalingSection(num_workers=2, resources_per_worker={"CPU": 0.5}),
        TrainSection(max_steps=steps, batch_size=4, lr=0.01, checkpoint_every=steps // 2, log_every=5),
        str(work / "child-store"),
        "mem",
        log=lambda m: None,
    )
    print(json.dumps({"steps": res.steps, "fit_s": time.perf_counter() - t0}), flush=True)


def peak_rss_of(cmd: list[str]) -> dict:
    res = run_measured(cmd, REPO)
    last = [ln for ln in res["log"].splitlines() if ln.startswith("{")]
    return {**res, "child": json.loads(last[-1]) if last else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray CPUs = DataLoader workers")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40, help="warm-up steps, then as many measured steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10, help="list each CamVid frame this many times")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved DataLoader/Ray Data measurements")
    ap.add_argument(
        "--block-rows",
        type=int,
        default=ZegCLIPMethod.model_fields["block_rows"].default,
        help="images per Ray Data decode task (default: the train stage's)",
    )
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--fit-child", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fit_child:
        fit_child(Path(args.fit_child), steps=12)
        return 0

    import ray

    with tempfile.TemporaryDirectory(prefix="zeroseg-feed-") as tmp:
        work = Path(tmp)
        manifest = write_manifest(work / "feed", args.repeat)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        dls, rds = [], []
        for r in range(args.rounds):  # interleaved, so that drifting machine load hits both alike
            dls.append(bench_dataloader(manifest, args))
            rds.append(bench_ray(manifest, args, work, deterministic=True, tag=str(r)))
            print(
                f"round {r}: DataLoader {dls[-1][0]:.1f} img/s ({dls[-1][1]:.1f} img/CPU-s), "
                f"Ray Data {rds[-1][0]:.1f} img/s ({rds[-1][1]:.1f} img/CPU-s)",
                flush=True,
            )
        rf, rf_cpu = bench_ray(manifest, args, work, deterministic=False, tag="nd")
        ray.shutdown()
        dl, rd = float(np.mean([x[0] for x in dls])), float(np.mean([x[0] for x in rds]))
        dl_cpu, rd_cpu = float(np.mean([x[1] for x in dls])), float(np.mean([x[1] for x in rds]))
        mem = None if args.skip_memory else peak_rss_of([sys.executable, __file__, "--fit-child", str(work)])
    if mem is not None and mem["rc"] != 0:
        print(mem["log"][-3000:])
        return 1
    print(f"{'feed':<34}{'images/s':>10}{'ratio':>8}{'img/CPU-s':>11}{'ratio':>8}")
    print(f"{'torch DataLoader (mean of rounds)':<34}{dl:>10.1f}{1.0:>8.3f}{dl_cpu:>11.2f}{1.0:>8.3f}")
    print(f"{'Ray Data (mean of rounds)':<34}{rd:>10.1f}{rd / dl:>8.3f}{rd_cpu:>11.2f}{rd_cpu / dl_cpu:>8.3f}")
    print(f"{'Ray Data (preserve_order off)':<34}{rf:>10.1f}{rf / dl:>8.3f}{rf_cpu:>11.2f}{rf_cpu / dl_cpu:>8.3f}")
    print(
        f"(cpus {args.cpus}, torch threads {args.torch_threads}, batch {args.batch}, crop {args.crop}, "
        f"{args.block_rows} rows per decode task, "
        f"{args.steps} measured steps after {args.steps} warm-up; target ratio >= 0.9)"
    )
    if mem is not None:
        print(
            f"2-worker fit: peak RSS of the process tree {mem['peak_rss_mib']:.0f} MiB, "
            f"wall {mem['seconds']:.1f} s (fit {mem['child']['fit_s']:.1f} s, {mem['child']['steps']} steps)"
        )
    print(
        json.dumps(
            {
                "bench": "train_feed",
                "cpus": args.cpus,
                "torch_threads": args.torch_threads,
                "batch": args.batch,
                "block_rows": args.block_rows,
                "crop": args.crop,
                "measured_steps": args.steps,
                "dataloader_img_s": round(dl, 2),
                "ray_img_s": round(rd, 2),
                "ray_nondeterministic_img_s": round(rf, 2),
                "rounds": [{"dataloader": round(a[0], 2), "ray": round(b[0], 2)} for a, b in zip(dls, rds)],
                "ratio": round(rd / dl, 4),
                "ratio_nondeterministic": round(rf / dl, 4),
                "dataloader_img_per_cpu_s": round(dl_cpu, 3),
                "ray_img_per_cpu_s": round(rd_cpu, 3),
                "cpu_efficiency_ratio": round(rd_cpu / dl_cpu, 4),
                "fit2_peak_rss_mib": round(mem["peak_rss_mib"]) if mem else None,
                "fit2_wall_s": round(mem["seconds"], 1) if mem else None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
