"""Integration: the ZegCLIP sample DAG (2-worker Ray Train fit on real images) through evaluate."""

import json

import pytest
import torch

from pipeline.run import parse_args, run_pipeline
from zeroseg.models import load_segmenter

SMALL = ["build_splits.train.max_images=16", "build_splits.eval.0.max_images=2", "evaluate.batch_size=2",
         "train_classifier.zegclip.train.max_steps=6", "train_classifier.zegclip.train.checkpoint_every=3"]


def _run(work, *overrides):
    argv = ["--config", "configs/sample_zegclip.yaml", "--work-dir", str(work)]
    for o in [*SMALL, *overrides]:
        argv += ["--set", o]
    return run_pipeline(parse_args(argv))


@pytest.mark.slow
def test_zegclip_sample_dag_trains_and_evaluates(tmp_path, ray_local, shared_data):
    code, plan = _run(tmp_path)
    assert code == 0, [p.error for p in plan]
    st = {p.name: p for p in plan}
    assert all(p.status == "ran" for p in plan)
    tc = st["train_classifier"]
    assert tc.metrics["steps"] == 6 and tc.metrics["global_batch_size"] == 4
    # lr scaled linearly from the paper's batch 16 to the global batch 4
    assert tc.metrics["effective_lr"] == pytest.approx(2e-5 * 4 / 16)
    art = tmp_path / "store" / "train_classifier" / tc.key
    seg_json = json.loads((art / "segmenter.json").read_text())
    assert seg_json["method"] == "zegclip"
    weights = torch.load(art / "weights.pt", map_location="cpu")
    assert weights and all(k.startswith(("backbone.prompts", "decoder", "rd", "prompt", "proj", "head"))
                           or "prompt" in k or "decoder" in k for k in weights)
    assert not any(k.startswith("backbone.visual.transformer") for k in weights)  # CLIP stays frozen
    seg = load_segmenter(art)
    scores = seg(torch.zeros(1, 3, 128, 128), torch.nn.functional.normalize(torch.randn(7, 64), dim=-1))
    assert scores.shape[:2] == (1, 7)
    ev = st["evaluate"].metrics
    assert 0.0 <= ev["val/hIoU"] <= 100.0 and 0.0 <= ev["camvid/mIoU_unseen"] <= 100.0
    # the same command again: every stage cached, training not repeated
    code, plan = _run(tmp_path)
    assert code == 0 and {p.status for p in plan} == {"cached"}
