"""Evaluators: metrics accumulated batch by batch and merged (detectron2's ``DatasetEvaluator``
shape, with partial states).

An evaluator has ``reset()``, ``process(inputs, outputs)`` (one batch), ``merge(other)`` (add
another partial state) and ``finalize()`` (the result). The pipeline's batch-inference component
(``pipeline.inference``) runs ``reset`` + ``process`` next to the model in each actor and merges
the partial states on the driver; the same objects work in a plain loop (tests, notebooks).

:class:`GZS3Evaluator` holds, per evaluation set, the GZS3 ``[C, C]`` and ZS3 ``[U, U]``
confusion matrices (SPNet / ZS3Net protocol, ``zeroseg.metrics``): scores are upsampled
bilinearly to each label's size, seen-class calibration (ZegFormer Eq. 2) is applied, pixels are
counted. Only the matrices travel between processes.

Batch contract (what a predictor hands an evaluator):
    inputs: ``{"labels": [uint8 [H_i, W_i]], "label_uris": [str], "sets": [str]}`` per image;
    outputs: ``{"groups": [{"set": name, "index": [row, ...], "scores": float [b, C, h, w]}],
    "probabilities": bool}`` (one group per evaluation set present in the batch; ``scores`` on
    the model's device; ``probabilities``: per-class probabilities rather than logits).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from zeroseg.errors import DataError


class GZS3Evaluator:
    """GZS3 and ZS3 confusion matrices per evaluation set.

    Args:
        sets: ``{name: {"num_classes": C, "seen": [...], "unseen": [...], "ignore_index": 255}}``.
        gamma: seen-class calibration (ZegFormer Eq. 2), in probability units.

    ``finalize()`` returns ``{name: {"gzs3": int64 [C, C], "zs3": int64 [U, U], "images": n,
    "pixels": labelled + ignored pixels}}``; ``zeroseg.metrics.segmentation_metrics`` /
    ``zs3_metrics`` turn them into mIoU(S/U), hIoU, pAcc, ...

    Raises (from ``process``):
        DataError: a label value outside the set's class ids (naming the label file), or scores
            with another class count than the set's.
    """

    def __init__(self, sets: Mapping[str, Mapping[str, Any]], gamma: float = 0.0):
        self.sets = {
            n: {
                "num_classes": int(s["num_classes"]),
                "seen": [int(i) for i in s["seen"]],
                "unseen": [int(i) for i in s["unseen"]],
                "ignore_index": int(s.get("ignore_index", 255)),
            }
            for n, s in sets.items()
        }
        self.gamma = float(gamma)
        self.reset()

    def reset(self) -> None:
        """Empty partial state (matrices are allocated per set on first use: a batch's partial
        state holds only the sets it has)."""
        self.gzs3: dict[str, np.ndarray] = {}
        self.zs3: dict[str, np.ndarray] = {}
        self.images: dict[str, int] = {}
        self.pixels: dict[str, int] = {}

    def _ensure(self, name: str) -> None:
        if name not in self.gzs3:
            s = self.sets[name]
            self.gzs3[name] = np.zeros((s["num_classes"],) * 2, np.int64)
            self.zs3[name] = np.zeros((len(s["unseen"]),) * 2, np.int64)
            self.images[name] = self.pixels[name] = 0

    def process(self, inputs: Mapping[str, Sequence[Any]], outputs: Mapping[str, Any]) -> None:
        import torch
        import torch.nn.functional as F

        from zeroseg.metrics import gzs3_zs3_confusion

        probabilities = bool(outputs.get("probabilities", False))
        for group in outputs["groups"]:
            name, s = group["set"], self.sets[group["set"]]
            scores = group["scores"]
            c = s["num_classes"]
            if scores.ndim != 4 or scores.shape[1] != c:
                raise DataError(
                    f"the segmenter returned scores {tuple(scores.shape)} for eval set {name!r} with {c} "
                    "classes; expected [B, C, h, w]"
                )
            self._ensure(name)
            gz = torch.zeros((c, c), dtype=torch.int64, device=scores.device)
            zs = torch.zeros((len(s["unseen"]),) * 2, dtype=torch.int64, device=scores.device)
            for j, row in enumerate(group["index"]):
                lab = np.asarray(inputs["labels"][row])
                lab_t = torch.from_numpy(
                    lab if lab.flags.writeable and lab.flags.c_contiguous else np.array(lab, order="C")
                ).to(scores.device)
                sc = scores[j : j + 1].float()
                if tuple(sc.shape[-2:]) != lab.shape:
                    sc = F.interpolate(sc, size=lab.shape, mode="bilinear", align_corners=False)
                try:
                    g, z = gzs3_zs3_confusion(
                        sc,
                        lab_t[None],
                        s["seen"],
                        s["unseen"],
                        self.gamma,
                        s["ignore_index"],
                        probabilities=probabilities,
                    )
                except ValueError as e:
                    raise DataError(
                        f"label {inputs['label_uris'][row]} (eval set {name!r}, {c} classes): {e}"
                    ) from None
                gz += g
                zs += z
                self.images[name] += 1
                self.pixels[name] += int(lab.size)
            self.gzs3[name] += gz.cpu().numpy()  # synchronises CUDA
            self.zs3[name] += zs.cpu().numpy()

    def merge(self, other: GZS3Evaluator) -> None:
        """Add another partial state (the sets it has)."""
        for n in other.gzs3:
            self._ensure(n)
            self.gzs3[n] += other.gzs3[n]
            self.zs3[n] += other.zs3[n]
            self.images[n] += other.images[n]
            self.pixels[n] += other.pixels[n]

    def finalize(self) -> dict[str, dict[str, Any]]:
        """``{set: {"gzs3", "zs3", "images", "pixels"}}`` for every configured set."""
        for n in self.sets:
            self._ensure(n)
        return {
            n: {"gzs3": self.gzs3[n], "zs3": self.zs3[n], "images": self.images[n], "pixels": self.pixels[n]}
            for n in self.sets
        }


__all__ = ["GZS3Evaluator"]
