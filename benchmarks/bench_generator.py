"""PADing generator training throughput: from the feature artifact vs recomputing the features
from images every step (as the released code does), side by side in one run.

    .venv/bin/python benchmarks/bench_generator.py                       # the sample models, CPU
    .venv/bin/python benchmarks/bench_generator.py --size released       # released sizes (random weights)
    .venv/bin/python benchmarks/bench_generator.py --device cuda --size released

First runs ``pipeline/run.py --config configs/sample_pading.yaml`` up to extract_features in a
work directory (``--work``; cached on a second call): the training manifest, label PNGs, the
linear-head proposals and the feature artifact. Then, interleaved (``--rounds`` rounds of
``--steps`` steps each, median per path), one joint PADing training step (generator step +
classifier step, ``zeroseg.models.pading.FeatureGenerator``) on a batch of ``--batch`` images:

  (a) artifact: the batch's ``[B, Q, d]`` query embeddings and labels gathered from the artifact's
      arrays (what train_generator's loop does);
  (b) recompute: the batch's images and labels decoded, resized and run through the frozen
      proposal model, its queries Hungarian-matched to the seen segments
      (``stages.jobs.extract_features.FeaturePredictor``: the released ``forward_train_generator``'s
      ``no_grad`` part), then the same step.

``--size released`` replaces both models by the released sizes with random weights (MaskFormer
ResNet-50, 100 queries, hidden 256, 6 decoder layers at 512 x 512; the generator with 400
primitives, 3 layers, 256-d, 512-d text; 172 classes); the features of (a) then come from running
that model once over the batch images (timing only). Features/s = query embeddings consumed per
second (B x Q per step). Prints a table, the ratio (a)/(b) and one JSON line. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RELEASED_PROPOSALS = {
    "backbone": "resnet50",
    "num_queries": 100,
    "hidden_dim": 256,
    "dec_layers": 6,
    "nheads": 8,
    "dim_feedforward": 2048,
    "conv_dim": 256,
    "mask_dim": 256,
    "class_head": "linear",
}
RELEASED_GENERATOR = {"text_dim": 512, "feature_dim": 256, "primitives": 400, "layers": 3, "heads": 8, "ffn": 1024}


def prepare(work: Path, data: str) -> dict:
    """Run the sample PADing config up to extract_features (cached when already there)."""
    cmd = [sys.executable, "pipeline/run.py", "--config", "configs/sample_pading.yaml", "--work-dir", str(work)]
    cmd += ["--stages", "build_splits", "embed_text", "pretrain_proposals", "extract_features"]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "ZEROSEG_DATA": data}, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stdout[-3000:] + r.stderr[-3000:])
    store = work / "store"

    def only(stage: str) -> Path:
        ds = sorted(store.glob(f"{stage}/*/manifest.json"), key=lambda p: p.stat().st_mtime)
        return ds[-1].parent

    return {"splits": only("build_splits"), "text": only("embed_text"), "features": only("extract_features")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "zeroseg-bench-generator"))
    ap.add_argument("--data", default=os.environ.get("ZEROSEG_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--size", choices=["sample", "released"], default="sample")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4, help="images per step (released 12)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch
    import yaml

    from stages.extract_features import ROW_COLUMN, ExtractFeaturesConfig
    from stages.jobs.extract_features import FeaturePredictor
    from zeroseg.data.split_files import read_classes_json
    from zeroseg.models.maskformer import MaskFormer, save_proposals
    from zeroseg.models.pading import FeatureGenerator

    torch.manual_seed(0)
    paths = prepare(Path(args.work), args.data)
    train, _ = read_classes_json(paths["splits"] / "classes.json")
    c = len(train.names)
    manifest = pq.read_table(paths["splits"] / "manifests/train.parquet").to_pydict()
    n = len(manifest["image_id"])
    images_root = Path(args.data) / "coco128-seg/images/train2017"
    rows = {
        ROW_COLUMN: np.arange(n),
        "image_uri": np.array([str(images_root / i) for i in manifest["image"]], dtype=object),
        "label_uri": np.array([str(paths["splits"] / lbl) for lbl in manifest["label"]], dtype=object),
    }
    tmp = Path(tempfile.mkdtemp(prefix="zeroseg-bench-gen-"))
    if args.size == "released":
        mf = MaskFormer(RELEASED_PROPOSALS, len(train.seen), load_backbone_weights=False)
        save_proposals(tmp / "proposals", mf, seen=train.seen, input_size=[512, 512])
        proposals = tmp / "proposals"
        gen_cfg = RELEASED_GENERATOR
        text = torch.nn.functional.normalize(torch.randn(c, 512), dim=-1)
    else:
        proposals = sorted((Path(args.work) / "store/pretrain_proposals").glob("*/manifest.json"))[-1].parent
        gen_cfg = yaml.safe_load((REPO / "configs/sample_pading.yaml").read_text())["train_generator"]["model"]
        text = torch.from_numpy(np.load(paths["text"] / "embeddings/train.npy"))
    predictor = FeaturePredictor(ExtractFeaturesConfig(), str(proposals), train.ignore_index, device=args.device)
    if args.size == "released":  # (a)'s arrays: the released-size model over the images once (timing only)
        parts = [predictor(predictor.load({k: v[i : i + 4] for k, v in rows.items()})) for i in range(0, n, 4)]
        emb = np.concatenate([p["embeddings"] for p in parts])
        lab = np.concatenate([p["labels"] for p in parts])
    else:
        emb = np.load(paths["features"] / "features/embeddings.npy")
        lab = np.load(paths["features"] / "features/labels.npy")
    q = emb.shape[1]
    dev = torch.device(args.device)
    g = FeatureGenerator(gen_cfg, c, train.seen, train.unseen, text).to(dev)
    gen_opt = torch.optim.Adam(g.generator_parameters(), lr=5e-4)
    head_opt = torch.optim.SGD(g.head.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    retrain = {"unseen_weight": 5.0, "no_object_weight": 0.1}
    rng = np.random.default_rng(0)

    def train_step(e: torch.Tensor, y: torch.Tensor) -> None:
        matched = y >= 0
        gen_opt.zero_grad()
        if bool(matched.any()):
            g.generator_losses(e[matched], y[matched])["loss"].backward()
            gen_opt.step()
        head_opt.zero_grad()
        g.classifier_loss(e.flatten(0, 1), torch.where(y >= 0, y, torch.full_like(y, c)).flatten(), retrain).backward()
        head_opt.step()

    def from_artifact(idx: np.ndarray) -> None:
        train_step(torch.from_numpy(emb[idx]).to(dev), torch.from_numpy(lab[idx]).long().to(dev))

    def from_images(idx: np.ndarray) -> None:
        out = predictor(predictor.load({k: v[idx] for k, v in rows.items()}))
        train_step(torch.from_numpy(out["embeddings"]).to(dev), torch.from_numpy(out["labels"]).long().to(dev))

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn(np.sort(rng.choice(n, size=min(args.batch, n), replace=False)))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps

    timed(from_artifact)  # warm-up
    timed(from_images)
    per = {"artifact": [], "recompute": []}
    for _ in range(args.rounds):  # interleaved
        per["artifact"].append(timed(from_artifact))
        per["recompute"].append(timed(from_images))
    feats = min(args.batch, n) * q
    med = {k: statistics.median(v) for k, v in per.items()}
    fps = {k: feats / v for k, v in med.items()}
    print(
        f"PADing generator training, {args.size} sizes on {args.device}: batch {min(args.batch, n)} images x {q} queries"
    )
    print(f"{'path':<12}{'s/step':>10}{'features/s':>14}")
    for k in ("artifact", "recompute"):
        print(f"{k:<12}{med[k]:>10.4f}{fps[k]:>14.0f}")
    print(f"artifact / recompute throughput: {fps['artifact'] / fps['recompute']:.1f}x")
    print(
        json.dumps(
            {
                "bench": "generator",
                "size": args.size,
                "device": args.device,
                "batch_images": min(args.batch, n),
                "queries": q,
                "artifact_s_per_step": round(med["artifact"], 5),
                "recompute_s_per_step": round(med["recompute"], 5),
                "artifact_features_per_s": round(fps["artifact"]),
                "recompute_features_per_s": round(fps["recompute"]),
                "ratio": round(fps["artifact"] / fps["recompute"], 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
