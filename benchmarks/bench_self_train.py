"""Self-training step time against the inductive step time on the same data, as a ratio.

    .venv/bin/python benchmarks/bench_self_train.py                         # tiny CLIP, CPU (the sample's model)
    .venv/bin/python benchmarks/bench_self_train.py --clip ViT-B-16 --size 512 --device cuda --batch-size 4

The same ZegCLIP (the model section of ``configs/sample_zegclip.yaml``, or ViT-B/16 with the VOC
benchmark's: 10 prompt tokens, 512-wide decoder; random weights: speed does not depend on the values)
and the same batches (real coco128 photographs and their labels through build_splits' transductive
policy and the training augmentation, decoded beforehand), one optimisation step each
(forward, loss, backward, AdamW step):

- ``inductive``: train_classifier's step: the seen-class text embeddings as queries, the label
  remapped to seen training ids (unlabelled-unseen pixels ignored), ``ZegCLIP.loss``;
- ``self_train``: self_train's step: every class's text embedding as a query, the pseudo-labels
  from the same forward (``zeroseg.self_training``: eligible pixels, argmax over the unseen
  channels of the detached logits, ``pixels: unseen_only``), the loss on all classes;
- ``pseudo_labels``: the pseudo-labelling alone (eligibility + ``pseudo_label_targets``) on the
  logits of one forward, what self-training adds besides the larger query set.

Steps are interleaved ``--repeats`` times (machine load hits both alike), ``--warmup`` untimed
steps first; the median is reported, and the ratios ``self_train / inductive`` and
``pseudo_labels / inductive``. Prints a table and one JSON line. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from stages.build_splits import list_dataset, named_split  # noqa: E402
from stages.jobs.methods.zegclip import build_model  # noqa: E402
from zeroseg.data.label_policy import UNLABELED_POLICY, unlabeled_index  # noqa: E402
from zeroseg.data.splits import make_records, process_record  # noqa: E402
from zeroseg.data.transforms import (  # noqa: E402
    AugmentConfig,
    decode_image,
    decode_label,
    make_lut,
    remap_label,
    sample_rng,
    train_transform,
)
from zeroseg.self_training import eligible_pixels, pseudo_label_targets  # noqa: E402

VOC_MODEL = {"prompt_tokens": 10, "decoder_width": 512, "decoder_heads": 8, "decoder_layers": 3}


def batches(n_images: int, size: int, batch_size: int):
    """``[(images [B,3,S,S], label [B,S,S] vocabulary ids / 254 / 255)]`` of coco128 and the vocabulary."""
    cfg = load_config(REPO / "configs" / "sample_zegclip_st.yaml")
    bs = cfg.sections["build_splits"]
    from stages.build_splits import BuildSplitsConfig

    bcfg = BuildSplitsConfig.model_validate({k: v for k, v in bs.items()})
    listing = list_dataset(bcfg.train)
    vocab = named_split(bcfg, listing.names)
    recs = make_records(
        sorted(listing.records, key=lambda r: r["image_id"])[: n_images * 3],
        split="train",
        dataset="coco128",
        policy=UNLABELED_POLICY,
        unseen=vocab.unseen,
        num_classes=len(vocab.names),
    )
    aug = AugmentConfig(crop_size=(size, size), scale=(2 * size, size))
    imgs, labels = [], []
    for r in recs:
        res, png = process_record(r)
        if png is None:
            continue
        image = decode_image(r["image_path"])
        label = decode_label(png)
        x, y = train_transform(image, label, aug, sample_rng(0, r["image_id"], 0))
        imgs.append(x)
        labels.append(y)
        if len(imgs) == n_images:
            break
    out = []
    for i in range(0, len(imgs) - batch_size + 1, batch_size):
        out.append((torch.from_numpy(np.stack(imgs[i : i + batch_size])), np.stack(labels[i : i + batch_size])))
    return out, vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", default="zeroseg-tiny-vit")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)

    data, vocab = batches(args.images, args.size, args.batch_size)
    C = len(vocab.names)
    U = unlabeled_index(255)
    sample = load_config(REPO / "configs" / "sample_zegclip.yaml").sections["train_classifier"]["model"]
    model_cfg = {**sample, "input_size": [args.size, args.size]}
    if args.clip != "zeroseg-tiny-vit":
        model_cfg.update(VOC_MODEL)
    spec = {"model": args.clip, "random_init": True}
    seg = build_model(spec, model_cfg).to(dev).train()
    D = seg.embed_dim
    text = torch.nn.functional.normalize(torch.randn(C, D), dim=-1).to(dev)
    seen_text = text[list(vocab.seen)]
    lut_ind = make_lut({int(c): i for i, c in enumerate(vocab.seen)}, source_classes=C)
    lut_st = make_lut({**{int(c): int(c) for c in vocab.seen}, U: U}, ignore_index=255, source_classes=C)
    opt = torch.optim.AdamW(seg.trainable_parameters(), lr=1e-6)  # tiny lr: the model barely moves
    unseen = list(vocab.unseen)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def inductive(images, label):
        target = torch.from_numpy(remap_label(label, lut_ind)).long().to(dev)
        loss = seg.loss(images.to(dev), target, seen_text)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def self_train(images, label):
        target = torch.from_numpy(remap_label(label, lut_st)).long().to(dev)
        eligible = eligible_pixels(target, "unseen_only", unlabeled_index=U, ignore_index=255)
        logits = seg.label_logits(images.to(dev), text, tuple(target.shape[-2:]))
        pseudo, _ = pseudo_label_targets(logits, target, unseen, eligible, ignore_index=255)
        loss = seg.loss_terms(logits, pseudo)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.no_grad():
        images0, label0 = data[0]
        t0 = torch.from_numpy(remap_label(label0, lut_st)).long().to(dev)
        logits0 = seg.label_logits(images0.to(dev), text, tuple(t0.shape[-2:]))

    def pseudo_only(images, label):
        e = eligible_pixels(t0, "unseen_only", unlabeled_index=U, ignore_index=255)
        pseudo_label_targets(logits0, t0, unseen, e, ignore_index=255)

    runs = {"inductive": inductive, "self_train": self_train, "pseudo_labels": pseudo_only}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.warmup + args.repeats):
        for name, fn in runs.items():
            for images, label in data:
                sync()
                t = time.perf_counter()
                fn(images, label)
                sync()
                if rep >= args.warmup:
                    times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"ZegCLIP step on {len(data)} batches x {args.batch_size} coco128 crops of {args.size} px, {args.clip} "
        f"(random), {C} classes ({len(unseen)} unseen), {args.device}; median of {args.repeats} interleaved passes"
    )
    print(f"{'step':<15}{'ms/step':>10}{'ratio to inductive':>22}")
    for k, v in med.items():
        print(f"{k:<15}{1000 * v:>10.1f}{v / med['inductive']:>22.3f}")
    print(
        json.dumps(
            {
                "clip": args.clip,
                "size": args.size,
                "batch_size": args.batch_size,
                "device": args.device,
                "classes": C,
                "unseen": len(unseen),
                "ms_per_step": {k: 1000 * v for k, v in med.items()},
                "self_train_over_inductive": med["self_train"] / med["inductive"],
                "pseudo_labels_over_inductive": med["pseudo_labels"] / med["inductive"],
            }
        )
    )


if __name__ == "__main__":
    main()
