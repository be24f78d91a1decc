"""A DataError raised inside a Ray worker reaches the CLI as that DataError: one line naming the
file, exit status 1, no traceback."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def test_a_bad_label_found_by_a_ray_data_worker_is_reported_as_a_data_error(tmp_path, shared_data):
    cam = tmp_path / "camvid"
    (cam / "images").mkdir(parents=True)
    (cam / "labels").mkdir()
    names = sorted(p.name for p in (shared_data / "camvid-val" / "images").iterdir())[:3]
    for n in names:
        shutil.copy(shared_data / "camvid-val" / "images" / n, cam / "images" / n)
        shutil.copy(shared_data / "camvid-val" / "labels" / n, cam / "labels" / n)
    shutil.copy(shared_data / "camvid-val" / "classes.json", cam / "classes.json")
    bad = cam / "labels" / names[1]
    lab = np.asarray(Image.open(bad)).copy()
    lab[0, 0] = 200  # not a CamVid class (11 classes + void 11)
    Image.fromarray(lab).save(bad)
    n_classes = len(json.loads((cam / "classes.json").read_text())["classes"])
    cmd = [
        sys.executable,
        "pipeline/run.py",
        "--config",
        "configs/sample.yaml",
        "--work-dir",
        str(tmp_path / "w"),
        "--set",
        "build_splits.train.max_images=4",
        "--set",
        f"build_splits.eval.0.images={cam / 'images'}",
        "--set",
        f"build_splits.eval.0.labels={cam / 'labels'}",
        "--set",
        f"build_splits.eval.0.classes={cam / 'classes.json'}",
        "--stages",
        "build_splits",
    ]
    out = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "ZEROSEG_DATA": str(shared_data)},
    )
    assert out.returncode == 1, out.stdout + out.stderr
    failed = [x for x in out.stdout.splitlines() if x.startswith("✗ build_splits failed:")]
    assert len(failed) == 1, out.stdout
    assert str(bad) in failed[0] and "200" in failed[0] and str(n_classes) in failed[0]
    assert "Traceback" not in out.stdout and "RayTaskError" not in out.stdout and "UserCodeException" not in out.stdout
    assert "DataError" in out.stdout  # the stage table names the error class
