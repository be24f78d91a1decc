"""Integration: the ZegCLIP sample DAG (2-worker Ray Train fit on real images) through evaluate."""

import json

import numpy as np
import pytest
import torch

from pipeline.run import parse_args, run_pipeline
from stages.train_zegclip import seen_text_embeddings
from zeroseg.errors import DataError
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
    seg = load_segmenter(art)
    assert set(weights) == set(seg.trainable_names())  # the trained parameters, nothing else
    assert "encoder.prompts" in weights  # deep prompts (dpt) live beside, not inside, the CLIP tower
    assert not any(k.startswith("encoder.visual.") for k in weights)  # CLIP stays frozen
    scores = seg(torch.zeros(1, 3, 128, 128), torch.nn.functional.normalize(torch.randn(7, 64), dim=-1))
    assert scores.shape[:2] == (1, 7)
    ev = st["evaluate"].metrics
    assert 0.0 <= ev["val/hIoU"] <= 100.0 and 0.0 <= ev["camvid/mIoU_unseen"] <= 100.0
    # the same command again: every stage cached, training not repeated
    code, plan = _run(tmp_path)
    assert code == 0 and {p.status for p in plan} == {"cached"}


def test_seen_text_embeddings_checks_before_training():
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    vocab = {"dataset": "toy", "names": ["a", "b", "c", "d"], "seen": [0, 2], "unseen": [1, 3]}
    assert np.array_equal(seen_text_embeddings(vocab, emb), emb[[0, 2]])
    with pytest.raises(DataError, match=r"classes.json.*'toy'.*no seen class.*build_splits.split"):
        seen_text_embeddings({**vocab, "seen": [], "unseen": [0, 1, 2, 3]}, emb)
    with pytest.raises(DataError, match=r"seen class ids \[7\].*outside \[0, 4\)"):
        seen_text_embeddings({**vocab, "seen": [0, 7]}, emb)
    with pytest.raises(DataError, match=r"embeddings/train.npy has shape \(3, 3\) for 4 training classes"):
        seen_text_embeddings(vocab, emb[:3])
