"""The behaviour record (``benchmarks/behaviour.py``): the sample config, run from scratch, gives
exactly the evaluation metrics recorded before the structural refactor of issue 18 (ceaf4b1).

The slower sample configs (every trained method: their weights' sha256 and metrics) are checked
by ``python benchmarks/behaviour.py check`` (about 10 minutes here); this one is fast enough for
the suite. An intended change of behaviour re-records (``benchmarks/behaviour.py record``) and
says why in its commit.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _behaviour():
    spec = importlib.util.spec_from_file_location("behaviour", ROOT / "benchmarks" / "behaviour.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_record_holds_every_sample_config_with_weights_and_metrics():
    record = json.loads((ROOT / "benchmarks" / "behaviour_record.json").read_text())
    assert set(record) == set(_behaviour().CONFIGS)
    for config, stages in record.items():
        metrics = stages["evaluate"]["metrics"]
        assert "val/hIoU" in metrics and all(math.isfinite(v) for v in metrics.values()), config
        assert not [k for k in metrics if "fps" in k.lower() or "seconds" in k.lower()], config
    trained = {c: sorted(s for s, e in v.items() if e.get("weights")) for c, v in record.items()}
    assert trained["sample"] == [] and trained["sample_zegclip"] == ["train_classifier"]
    assert trained["sample_pading"] == ["pretrain_proposals", "train_generator"]
    assert trained["sample_zegclip_st"] == ["self_train", "train_classifier"]


def test_the_compare_names_every_differing_value():
    b = _behaviour()
    want = {"evaluate": {"metrics": {"val/hIoU": 1.0, "val/pAcc": 2.0}}, "train_classifier": {"weights": {"w.pt": "a"}}}
    same = json.loads(json.dumps(want))
    assert b.compare("c", want, same) == []
    got = json.loads(json.dumps(want))
    got["evaluate"]["metrics"]["val/hIoU"] = 1.0000000001
    got["train_classifier"]["weights"]["w.pt"] = "b"
    del got["evaluate"]["metrics"]["val/pAcc"]
    diffs = b.compare("c", want, got)
    assert len(diffs) == 3 and any("val/hIoU" in d for d in diffs) and any("w.pt" in d for d in diffs)
    assert any("val/pAcc" in d and "now None" in d for d in diffs)


def test_the_sample_config_reproduces_its_recorded_metrics(tmp_path, shared_data):
    b = _behaviour()
    record = json.loads((ROOT / "benchmarks" / "behaviour_record.json").read_text())
    got = b.observe("sample", tmp_path / "work")
    assert b.compare("sample", record["sample"], got) == []
