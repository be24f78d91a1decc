"""Transductive self-training (ZegCLIP+ST, ZegCLIP Sec. 4.3 and Table 2): online pseudo-labels
for the pixels without a seen label, and their agreement with the held-out unseen ground truth.

ZegCLIP's released code (ZiqinZhou66/ZegCLIP ``models/decode_heads/decode_seg.py``
``ATMSingleHeadSeg.forward_train`` with ``self_training``; released-code.md section 4) makes the
pseudo-labels every iteration from the same forward pass, detached: the mask logits upsampled to
the label size, ``sigmoid``, the seen channels excluded, ``argmax`` over the unseen channels; the
loss on them is the ground-truth loss (all class channels). No confidence threshold. Which pixels
(:data:`PIXEL_MODES`):

* ``unseen_only`` (released; the paper's dagger variant, "pseudo labels merely annotated on
  unseen pixels excluding the ignore part"): the pixels whose hidden label is an unseen class.
  This uses *where* the unseen pixels are (not which unseen class they hold): the training label
  carries them as the unlabelled-unseen value (``zeroseg.data.label_policy.unlabeled_index``);
* ``all_unlabeled`` (the paper's plain ZegCLIP+ST: "pseudo labels on all unlabeled pixels"):
  every pixel without a seen label, ignore included; padding added by the augmentation is not a
  pixel of the image and is left out.

An optional threshold (ours; default none, as released) keeps a pseudo-label only where the
winning unseen class's sigmoid score reaches it; the other eligible pixels become ignore.

Conventions: ``target`` ``[B, H, W]`` long in the *vocabulary's* ids (self-training scores every
class: seen ids are their vocabulary ids), ``unlabeled_index`` for unlabelled-unseen pixels,
``ignore_index`` for ignored ones; ``logits`` ``[B, C, H, W]`` mask logits at the label's size.
Imports torch only (no Ray, no pipeline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

PIXEL_MODES = ("unseen_only", "all_unlabeled")


def eligible_pixels(
    target: torch.Tensor,
    mode: str,
    *,
    unlabeled_index: int,
    ignore_index: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pixels that get a pseudo-label: ``bool [B, H, W]``.

    Args:
        target: ``[B, H, W]`` seen ids, ``unlabeled_index``, ``ignore_index``.
        mode: ``unseen_only`` (``target == unlabeled_index``) or ``all_unlabeled`` (``target`` is
            ``unlabeled_index`` or ``ignore_index``, within ``valid``).
        valid: ``bool [B, H, W]``, False on padding (``all_unlabeled`` only; None: every pixel).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in PIXEL_MODES:
        raise ValueError(f"self_train.pixels must be one of {', '.join(PIXEL_MODES)}, got {mode!r}")
    out = target == unlabeled_index
    if mode == "all_unlabeled":
        out = out | (target == ignore_index)
        if valid is not None:
            out = out & valid.bool()
    return out


def pseudo_label_targets(
    logits: torch.Tensor,
    target: torch.Tensor,
    unseen: Sequence[int],
    eligible: torch.Tensor,
    *,
    ignore_index: int,
    threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The self-training target: seen ground truth kept, pseudo-labels on the eligible pixels.

    Args:
        logits: ``[B, C, H, W]`` mask logits at the label's size (detached here).
        target: ``[B, H, W]`` long: seen ids, the unlabelled value, ``ignore_index``.
        unseen: the unseen class ids (channels of ``logits``), at least one.
        eligible: ``bool [B, H, W]`` (:func:`eligible_pixels`); never a seen pixel.
        threshold: keep a pseudo-label only where its class's ``sigmoid`` reaches it (None: all).

    Returns:
        ``(new_target [B, H, W] long, labelled bool [B, H, W])``: ``new_target`` is ``target`` on
        the seen pixels, the argmax over the unseen channels of ``sigmoid(logits)`` on the eligible
        pixels that pass the threshold (``labelled``), ``ignore_index`` everywhere else.

    Raises:
        ValueError: no unseen class, a seen pixel marked eligible, or shapes that do not match.
    """
    if not len(unseen):
        raise ValueError("self-training needs at least one unseen class")
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[-2:]) or eligible.shape != target.shape:
        raise ValueError(
            f"logits [B, C, H, W] {tuple(logits.shape)}, target and eligible [B, H, W] "
            f"{tuple(target.shape)} / {tuple(eligible.shape)} do not match"
        )
    num_classes = logits.shape[1]
    seen = (target >= 0) & (target < num_classes) & (target != ignore_index)
    if bool((eligible & seen).any()):
        raise ValueError("a pixel with a seen ground-truth label is marked eligible for a pseudo-label")
    idx = torch.as_tensor(list(unseen), dtype=torch.long, device=logits.device)
    with torch.no_grad():
        scores = torch.sigmoid(logits.detach().float().index_select(1, idx))  # [B, U, H, W]
        best, arg = scores.max(dim=1)
        cls = idx[arg]
        take = eligible.bool()
        if threshold is not None:
            take = take & (best >= threshold)
        out = torch.where(seen, target.long(), torch.full_like(target, ignore_index, dtype=torch.long))
        out = torch.where(take, cls, out)
    return out, take


class PseudoLabelStats:
    """The pseudo-labels' agreement with the held-out unseen ground truth (a diagnostic: nothing
    here feeds back into training).

    Counts, over the pixels whose held-out label is an unseen class, ``confusion[g, p]``: ground
    truth ``unseen[g]`` and pseudo-label ``unseen[p]``, or ``p = U`` (no pseudo-label: not
    eligible, or under the threshold). Pseudo-labels on pixels whose ground truth is unknown
    (ignore, under ``all_unlabeled``) are counted apart (``unknown_labelled``). Has
    ``state_dict`` / ``load_state_dict`` (a training checkpoint's extra object).
    """

    def __init__(self, unseen: Sequence[int]) -> None:
        self.unseen = [int(u) for u in unseen]
        u = len(self.unseen)
        self.confusion = np.zeros((u, u + 1), dtype=np.int64)
        self.unknown_labelled = 0

    def counts(
        self, pseudo: torch.Tensor, labelled: torch.Tensor, heldout: torch.Tensor, num_classes: int
    ) -> torch.Tensor:
        """One batch's counts, a flat int64 tensor (``confusion`` then ``unknown_labelled``) to
        sum over workers before :meth:`add`.

        Args:
            pseudo: ``[B, H, W]`` (:func:`pseudo_label_targets`'s target); labelled: its mask.
            heldout: ``[B, H, W]`` held-out labels: unseen ids, anything else = not unseen.
            num_classes: C, the vocabulary size (ids of ``heldout`` / ``pseudo`` below it).
        """
        u = len(self.unseen)
        lut = torch.full((num_classes + 1,), -1, dtype=torch.long, device=pseudo.device)
        lut[torch.as_tensor(self.unseen, device=pseudo.device)] = torch.arange(u, device=pseudo.device)
        h = heldout.long()
        g = lut[torch.where((h >= 0) & (h < num_classes), h, torch.full_like(h, num_classes))]
        p = lut[torch.where(labelled, pseudo.long(), torch.full_like(h, num_classes))]
        p = torch.where(p < 0, torch.full_like(p, u), p)
        gt = g >= 0
        cm = torch.bincount(g[gt] * (u + 1) + p[gt], minlength=u * (u + 1))
        unknown = (labelled & ~gt).sum().reshape(1)
        return torch.cat([cm, unknown]).to(torch.int64)

    def add(self, counts: torch.Tensor | np.ndarray) -> None:
        """Add :meth:`counts` (summed over workers)."""
        c = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.int64)
        u = len(self.unseen)
        self.confusion += c[:-1].reshape(u, u + 1)
        self.unknown_labelled += int(c[-1])

    def summary(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """``{"miou", "accuracy", "coverage", "pixels", "unknown_labelled", "per_class"}``:
        ``miou`` the mean IoU (percent) over the unseen classes with ground-truth or pseudo-label
        pixels (others NaN, left out), ``IoU_c = n_cc / (row_c + col_c - n_cc)`` (the column
        counts only the pixels whose ground truth is unseen); ``accuracy`` the percent of
        unseen-ground-truth pixels whose pseudo-label is right; ``coverage`` the percent that got a
        pseudo-label at all."""
        cm = self.confusion
        u = len(self.unseen)
        tp = np.diag(cm[:, :u]).astype(np.float64)
        rows = cm.sum(1).astype(np.float64)
        cols = cm[:, :u].sum(0).astype(np.float64)
        denom = rows + cols - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(denom > 0, 100.0 * tp / denom, np.nan)
        total = float(cm.sum())
        names = list(names) if names is not None else [str(c) for c in self.unseen]
        return {
            "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
            "accuracy": 100.0 * float(tp.sum()) / total if total else math.nan,
            "coverage": 100.0 * float(cm[:, :u].sum()) / total if total else math.nan,
            "pixels": int(total),
            "unknown_labelled": int(self.unknown_labelled),
            "per_class": [
                {"id": c, "name": n, "iou": None if not math.isfinite(v) else float(v), "pixels": int(r)}
                for c, n, v, r in zip(self.unseen, names, iou, rows)
            ],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"unseen": list(self.unseen), "confusion": self.confusion.tolist(), "unknown": self.unknown_labelled}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if [int(u) for u in state["unseen"]] != self.unseen:
            raise ValueError(f"pseudo-label statistics of unseen classes {state['unseen']}, not {self.unseen}")
        self.confusion = np.asarray(state["confusion"], dtype=np.int64).reshape(self.confusion.shape)
        self.unknown_labelled = int(state["unknown"])


__all__ = ["PIXEL_MODES", "PseudoLabelStats", "eligible_pixels", "pseudo_label_targets"]
