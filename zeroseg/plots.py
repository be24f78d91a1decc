"""Plots of evaluation results (matplotlib's Agg canvas: no display, no global backend change).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SEEN_COLOUR = "#4C72B0"
UNSEEN_COLOUR = "#DD8452"
OTHER_COLOUR = "#8C8C8C"
#: Above this many classes the per-class chart is drawn as sorted horizontal bars.
VERTICAL_MAX = 60


def plot_per_class_iou(
    iou: Sequence[float] | np.ndarray,
    names: Sequence[str],
    seen_ids: Sequence[int],
    unseen_ids: Sequence[int],
    path: str | Path,
    title: str = "",
    summary: dict[str, float] | None = None,
) -> Path:
    """Bar chart of per-class IoU (percent), seen and unseen classes coloured apart, as a PNG.

    Up to :data:`VERTICAL_MAX` classes: vertical bars in class-id order. More (COCO-Stuff's 171,
    ADE20k-Full's 847): horizontal bars sorted by IoU (best on top, absent classes last), the
    figure as tall as the class count needs, so every name stays legible.

    Args:
        iou: ``[C]`` per-class IoU in percent; NaN (class absent from ground truth and
            prediction) is drawn as no bar with the tick label marked ``(absent)``.
        names: ``[C]`` class names (x tick labels, in class-id order).
        seen_ids, unseen_ids: class ids; a class in neither is grey.
        path: output ``.png`` path (parent directories created).
        title: figure title.
        summary: optional ``{"mIoU_seen": .., "mIoU_unseen": .., "hIoU": ..}``: drawn as dashed
            horizontal lines for the seen / unseen means and listed in the title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``iou`` and ``names`` differ in length.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    values = np.asarray(iou, dtype=np.float64)
    if values.ndim != 1 or len(values) != len(names):
        raise ValueError(f"{len(values)} IoU values for {len(names)} class names")
    c = len(values)
    seen, unseen = set(int(i) for i in seen_ids), set(int(i) for i in unseen_ids)
    colours = [SEEN_COLOUR if i in seen else UNSEEN_COLOUR if i in unseen else OTHER_COLOUR for i in range(c)]
    heights = np.where(np.isfinite(values), values, 0.0)
    labels = [f"{n} (absent)" if not math.isfinite(v) else str(n) for n, v in zip(names, values)]

    horizontal = c > VERTICAL_MAX
    if horizontal:
        fig = Figure(figsize=(8.0, 0.16 * c + 1.5), dpi=100)
    else:
        fig = Figure(figsize=(max(6.0, 0.22 * c + 1.5), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if horizontal:
        order = sorted(range(c), key=lambda i: (not math.isfinite(values[i]), -heights[i]))
        y = np.arange(c)
        ax.barh(y, heights[order], color=[colours[i] for i in order], height=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([labels[i] for i in order], fontsize=6)
        ax.set_ylim(c - 0.4, -0.6)
        ax.set_xlim(0, 100)
        ax.set_xlabel("IoU (%)")
    else:
        x = np.arange(c)
        ax.bar(x, heights, color=colours, width=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=90, fontsize=8)
        ax.set_xlim(-0.6, c - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("IoU (%)")
    handles = [
        Patch(color=SEEN_COLOUR, label=f"seen ({len(seen)})"),
        Patch(color=UNSEEN_COLOUR, label=f"unseen ({len(unseen)})"),
    ]
    if len(seen | unseen) < c:
        handles.append(Patch(color=OTHER_COLOUR, label="other"))
    full_title = title
    if summary:
        for key, colour in (("mIoU_seen", SEEN_COLOUR), ("mIoU_unseen", UNSEEN_COLOUR)):
            v = summary.get(key)
            if v is not None and math.isfinite(v):
                (ax.axvline if horizontal else ax.axhline)(v, color=colour, linestyle="--", linewidth=1)
        parts = [
            f"{k} {summary[k]:.1f}"
            for k in ("mIoU_seen", "mIoU_unseen", "hIoU")
            if summary.get(k) is not None and math.isfinite(summary[k])
        ]
        if parts:
            full_title = f"{title}  ({', '.join(parts)})" if title else ", ".join(parts)
    if full_title:
        ax.set_title(full_title, fontsize=10)
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


__all__ = ["plot_per_class_iou"]
