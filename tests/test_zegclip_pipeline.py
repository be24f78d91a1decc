"""Integration: the ZegCLIP sample DAG (a 2-worker Ray Train fit on real images) through evaluate,
run as a user runs it (a subprocess), with what it prints checked line by line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zeroseg.data.classes import Vocabulary
from zeroseg.errors import DataError
from zeroseg.models import load_segmenter

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "build_splits.train.max_images=16",
    "build_splits.eval.0.max_images=2",
    "evaluate.batch_size=2",
    "train_classifier.train.max_steps=6",
    "train_classifier.train.checkpoint_every=3",
    "train_classifier.train.log_every=2",
]


def _run(work, *overrides, config="configs/sample_zegclip.yaml", shared_data=None):
    cmd = [sys.executable, "pipeline/run.py", "--config", config, "--work-dir", str(work)]
    for o in [*SMALL, *overrides]:
        cmd += ["--set", o]
    env = {**os.environ, "ZEROSEG_DATA": str(shared_data)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _manifest(work, stage):
    [m] = (work / "store" / stage).glob("*/manifest.json")
    return json.loads(m.read_text())


def _printed_lines(out: str) -> list[str]:
    """The lines a user reads: table borders and blank lines left out."""
    return [x for x in out.splitlines() if x.strip() and not set(x.strip()) <= set("┏┓┗┛┡┩└┘━─│┃╇╋┼┳┻┯┷ ")]


@pytest.mark.slow
def test_zegclip_sample_dag_trains_and_evaluates(tmp_path, shared_data):
    first = _run(tmp_path, shared_data=shared_data)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    # output a user can read: no warning or error line but the one random-weights notice, no line
    # twice, nothing on stderr (library output is in the run's log file)
    lines = _printed_lines(first.stdout)
    flagged = [x for x in lines if any(w in x for w in ("WARNING", "ERROR", "Warning", "Error", "error"))]
    assert flagged == [], flagged
    assert sum("RANDOM WEIGHTS" in x for x in lines) == 1
    dup = {x for x in lines if lines.count(x) > 1}
    assert not dup, dup
    assert first.stderr == ""
    assert any(x.startswith("  train_classifier: 6/6 steps") for x in lines)  # its progress display, final state

    tc = _manifest(tmp_path, "train_classifier")
    m = tc["metrics"]
    assert m["steps"] == 6 and m["global_batch_size"] == 4
    # lr scaled linearly from the paper's batch 16 to the global batch 4; prompts and head get x10
    assert m["base_lr"] == pytest.approx(2e-5 * 4 / 16) and m["head_lr"] == pytest.approx(2e-5 * 4 / 16 * 10)
    art = tmp_path / "store" / "train_classifier" / tc["key"]
    seg_json = json.loads((art / "segmenter.json").read_text())
    assert seg_json["method"] == "zegclip" and seg_json["class"] == "zeroseg.models.zegclip:ZegCLIP"
    weights = torch.load(art / "weights.pt", map_location="cpu")
    seg = load_segmenter(art)
    assert set(weights) == set(seg.trainable_names())  # the trained parameters, nothing else
    assert "encoder.prompts" in weights  # deep prompts (dpt) live beside, not inside, the CLIP tower
    assert not any(k.startswith("encoder.visual.") for k in weights)  # CLIP stays frozen
    # the training checkpoints hold the trainable weights only, and at most keep_checkpoints of them
    ckpts = sorted(p for p in (tmp_path / "store" / "_train").glob("train_classifier-*/checkpoint_*") if p.is_dir())
    assert 1 <= len(ckpts) <= 2
    ck = torch.load(ckpts[-1] / "model.pt", map_location="cpu")
    assert set(ck) == set(weights)
    scores = seg(torch.zeros(1, 3, 128, 128), torch.nn.functional.normalize(torch.randn(7, 64), dim=-1))
    assert scores.shape[:2] == (1, 7) and bool(((scores > 0) & (scores < 1)).all())  # sigmoid probabilities
    ev = _manifest(tmp_path, "evaluate")
    metrics = json.loads((tmp_path / "store" / "evaluate" / ev["key"] / "metrics.json").read_text())
    for s in ("val", "camvid"):
        cm = np.array(metrics[s]["gzs3"]["confusion_matrix"])
        assert ev["metrics"][f"{s}/pAcc"] == pytest.approx(100 * np.trace(cm) / cm.sum())
    # the same command again: every stage cached, training not repeated, no Ray
    again = _run(tmp_path, shared_data=shared_data)
    assert again.returncode == 0 and again.stdout.count(" cached (") == 4 and "running" not in again.stdout
    assert "ray:" not in again.stdout


def test_seen_rows_checks_before_training():
    from stages.common import seen_rows

    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    vocab = Vocabulary("toy", ("a", "b", "c", "d"), ("a", "b", "c", "d"), (0, 2), (1, 3))
    assert np.array_equal(seen_rows(vocab, emb), emb[[0, 2]])
    with pytest.raises(DataError, match=r"classes.json.*'toy'.*no seen class.*build_splits.split"):
        seen_rows(Vocabulary("toy", vocab.names, vocab.names, (), (0, 1, 2, 3)), emb)
