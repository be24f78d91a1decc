"""The comparison report of segmentation runs (``zeroseg compare``), exported by the catalogue
(``stages.catalog.REPORT``, read by ``pipeline.catalogue``).

Columns: evaluate's metrics on one set (``evaluate/<set>/<metric>`` on the parent runs): mIoU
seen/unseen, hIoU, pAcc, and FPS (``evaluate/fps``, over all sets); ranked by hIoU unless
``--metric`` says otherwise; the set ``val`` unless ``--eval-set`` says otherwise (else the first
set the runs report).

Plots (``zeroseg.plots``): seen vs unseen mIoU of every configuration, and the per-class unseen
IoU of the best ``--top`` runs (read from their evaluate artifacts: ``metrics.json`` at the
evaluate run's ``artifact_uri``), drawn as sorted horizontal bars (the top and bottom classes for
large vocabularies such as COCO-Stuff's 171).

``pipeline.compare`` does the rest (finding and grouping the runs, the table, the HTML page,
logging it to MLflow) without knowing any of this.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.compare import Column

#: evaluate's metrics per set, as the table shows them (then FPS).
COLUMNS = ("mIoU_seen", "mIoU_unseen", "hIoU", "pAcc")


def per_class_unseen(all_runs: Any, parent_id: str, eval_set: str, stage: str = "evaluate") -> dict[str, float] | None:
    """Per-class IoU of the unseen classes of ``eval_set`` for an invocation: from the
    ``metrics.json`` of its evaluate artifact (the evaluate run's ``artifact_uri`` tag); None
    when it cannot be read."""
    from pipeline import uri as uri_

    ev = all_runs[(all_runs["tags.mlflow.parentRunId"] == parent_id) & (all_runs["tags.stage"] == stage)]
    for _, r in ev.iterrows():
        art = r.get("tags.artifact_uri")
        if not isinstance(art, str) or not art:
            continue
        try:
            if uri_.is_local(art):
                doc = json.loads(Path(uri_.local_path(art), "metrics.json").read_text())
            else:
                fs, base = uri_.filesystem(art)
                with fs.open_input_stream(f"{base}/metrics.json") as f:
                    doc = json.loads(f.read())
        except (OSError, ValueError):
            continue
        entry = doc.get(eval_set) or {}
        rows = (entry.get("gzs3") or {}).get("per_class") or []
        return {x["name"]: x["iou"] for x in rows if x.get("split") == "unseen" and x.get("iou") is not None}
    return None


class SegmentationReport:
    """GZS3 comparison of evaluate's metrics (see the module docstring); the
    ``pipeline.compare.Report`` of the project's catalogue."""

    stage = "evaluate"
    columns = (*(Column(c, c) for c in COLUMNS), Column("fps", "FPS", 1))
    default_metric = "hIoU"
    help = (
        "Compare invocations (parent runs) of an MLflow experiment: method, key params, "
        "mIoU seen/unseen, hIoU, pAcc, FPS, mean +- std over seeds; writes an HTML report with PNG "
        "plots and logs it as an artifact."
    )
    eval_set_help = "the evaluate set (default: val, else the first set the runs report)"
    top_help = "runs whose per-class unseen IoU is plotted (default 3)"

    def metric_key(self, eval_set: str, name: str) -> str:
        """``evaluate/<set>/<name>``; FPS is over all sets: ``evaluate/fps``."""
        return f"{self.stage}/fps" if name == "fps" else f"{self.stage}/{eval_set}/{name}"

    def eval_sets(self, runs: Any) -> list[str]:
        """The evaluate sets the runs report (``metrics.evaluate/<set>/hIoU``), in column order."""
        out = []
        for c in runs.columns:
            if c.startswith(f"metrics.{self.stage}/") and c.endswith("/hIoU") and c.count("/") == 2:
                out.append(c.split("/")[1])
        return out

    def default_eval_set(self, sets: Sequence[str]) -> str:
        """``val`` when the runs report it, else their first set."""
        return "val" if "val" in sets else sets[0]

    def plots(
        self, rows: list[dict[str, Any]], all_runs: Any, eval_set: str, out: Path, top: int
    ) -> list[tuple[str, str]]:
        """``seen_unseen.png`` and (when the best runs' artifacts are readable)
        ``unseen_per_class.png`` in ``out``."""
        from zeroseg.plots import plot_class_bars, plot_seen_unseen

        plots = []
        pts = [(r["label"], r["mIoU_seen"][0], r["mIoU_unseen"][0]) for r in rows]
        plot_seen_unseen(pts, out / "seen_unseen.png", f"{eval_set}: seen vs unseen mIoU")
        plots.append(("seen_unseen.png", "Seen vs unseen mIoU per configuration (dotted: hIoU iso-lines)"))
        best: dict[str, dict[str, float]] = {}
        for r in rows[:top]:
            pc = per_class_unseen(all_runs, r["runs"][0], eval_set, self.stage)
            if pc:
                best[r["label"]] = pc
        if best:
            plot_class_bars(best, out / "unseen_per_class.png", f"{eval_set}: unseen IoU per class, best runs")
            plots.append(("unseen_per_class.png", f"Per-class unseen IoU of the best {len(best)} run(s), sorted"))
        return plots


#: The project's report.
REPORT = SegmentationReport()

__all__ = ["COLUMNS", "REPORT", "SegmentationReport", "per_class_unseen"]
