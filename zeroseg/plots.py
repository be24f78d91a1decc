"""Plots of evaluation results (matplotlib's Agg canvas: no display, no global backend change).

Per-class IoU of one run (seen and unseen classes coloured apart: evaluate's
``per_class_iou_<set>.png``), of a few runs side by side (``zeroseg compare``), and seen vs
unseen mIoU of many runs. Imports neither Ray nor the pipeline.
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


def _canvas(width: float, height: float):
    """A ``width`` x ``height`` inch figure at 100 dpi on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    """Lay ``fig`` out and write it to ``path`` as a PNG (parent directories created)."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


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
    fig = _canvas(8.0, 0.16 * c + 1.5) if horizontal else _canvas(max(6.0, 0.22 * c + 1.5), 4.5)
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
    return _save(fig, path)


def plot_seen_unseen(points: Sequence[tuple[str, float, float]], path: str | Path, title: str = "") -> Path:
    """Scatter of seen vs unseen mIoU (percent), one labelled point per run, with hIoU
    iso-lines (hIoU = 2 s u / (s + u); GZS3's headline).

    Args:
        points: ``(label, mIoU_seen, mIoU_unseen)`` per run; non-finite values are left out.
        path: output ``.png``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    fig = _canvas(6.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    pts = [(lab, s, u) for lab, s, u in points if math.isfinite(s) and math.isfinite(u)]
    top = max([10.0, *(max(s, u) * 1.1 for _, s, u in pts)])
    grid = np.linspace(1e-3, top, 200)
    for h in np.linspace(top / 5, top * 0.8, 4):
        u = h * grid / np.maximum(2 * grid - h, 1e-9)  # from h = 2su/(s+u)
        ok = (2 * grid > h) & (u <= top)
        ax.plot(grid[ok], u[ok], color=OTHER_COLOUR, linewidth=0.6, linestyle=":")
        if ok.any():
            ax.annotate(f"hIoU {h:.1f}", (grid[ok][-1], u[ok][-1]), fontsize=6, color=OTHER_COLOUR)
    for lab, s, u in pts:
        ax.scatter([s], [u], color=UNSEEN_COLOUR, s=25, zorder=3)
        ax.annotate(lab, (s, u), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mIoU seen (%)")
    ax.set_ylabel("mIoU unseen (%)")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_class_bars(
    runs: dict[str, dict[str, float]], path: str | Path, title: str = "", max_classes: int = 40
) -> tuple[Path, list[str]]:
    """Per-class IoU (percent) of a few runs as horizontal bars, classes sorted by the first
    run's IoU (best on top); readable for any vocabulary: with more than ``max_classes``
    classes only the top and bottom ``max_classes // 2`` are drawn (the title says so).

    Args:
        runs: ``{run label: {class name: IoU}}``; the first run orders the classes; a class a
            run lacks (or NaN) has no bar.
        path: output ``.png``.
        max_classes: most classes drawn.

    Returns:
        ``(path, the class names drawn, top to bottom)``.
    """
    from matplotlib.patches import Patch

    labels = list(runs)
    if not labels:
        raise ValueError("no runs to plot")
    first = runs[labels[0]]
    names = sorted(
        {n for r in runs.values() for n in r},
        key=lambda n: -first.get(n, -1.0) if math.isfinite(first.get(n, -1.0)) else 1.0,
    )
    cut = len(names) > max_classes
    if cut:
        half = max_classes // 2
        names = names[:half] + names[-half:]
    k = len(labels)
    fig = _canvas(8.0, max(3.0, 0.18 * len(names) * max(1, k) ** 0.5 + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))
    h = 0.8 / k
    colours = [UNSEEN_COLOUR, SEEN_COLOUR, OTHER_COLOUR, "#55A868", "#C44E52", "#8172B2"]
    for j, lab in enumerate(labels):
        vals = [runs[lab].get(n, math.nan) for n in names]
        vals = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
        ax.barh(y - 0.4 + h * (j + 0.5), vals, height=h, color=colours[j % len(colours)])
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    drawn = [v for r in runs.values() for n in names if (v := r.get(n)) is not None and math.isfinite(v)]
    ax.set_xlim(0, min(100.0, max([1.0, *drawn]) * 1.15))
    ax.set_xlabel("IoU (%)")
    if cut:
        ax.axhline(max_classes // 2 - 0.5, color="black", linewidth=0.8, linestyle="--")
    full = title + (
        f" (top and bottom {max_classes // 2} of {len(set().union(*map(set, runs.values())))})" if cut else ""
    )
    if full:
        ax.set_title(full, fontsize=10)
    ax.legend(
        handles=[Patch(color=colours[j % len(colours)], label=lab) for j, lab in enumerate(labels)],
        loc="lower right",
        fontsize=7,
    )
    return _save(fig, path), names


__all__ = ["plot_class_bars", "plot_per_class_iou", "plot_seen_unseen"]
