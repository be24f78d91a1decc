"""Stage pretrain_proposals: the proposal-recall evaluator against hand counts, the stage's
config and plan-time errors, and the stage end to end on the sample data (a 2-worker Ray Train
fit, the recall pass through ``pipeline.inference``, the artifact, MLflow, a cached re-run)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from zeroseg.errors import DataError
from zeroseg.evaluation import ProposalRecallEvaluator, segment_best_iou

IN, OUT = 5.0, -5.0  # mask logits: sigmoid > 0.5 exactly where the logit is positive


def _logits(*masks: np.ndarray) -> torch.Tensor:
    """``[Q, h, w]`` logits, +5 inside each boolean mask, -5 outside."""
    return torch.tensor(np.stack([np.where(m, IN, OUT) for m in masks]), dtype=torch.float32)


# label of image A (4 x 4): classes 0 and 1 seen, 2 unseen, 255 ignored
LABEL_A = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 255, 255],
        [2, 2, 255, 255],
    ],
    dtype=np.uint8,
)
P0 = np.zeros((4, 4), bool)
P0[:2, :2] = True
P0[0, 2] = True  # class 0: 4 / 5 = 0.8; class 1: 1 / (4 + 5 - 1) = 0.125
P1 = np.zeros((4, 4), bool)
P1[3, :] = True  # class 2: 2 / 4 = 0.5 (the two ignored pixels of the row count for neither side)
SETS = {
    "a": {"num_classes": 4, "seen": [0, 1], "unseen": [2, 3], "ignore_index": 255},
    "b": {"num_classes": 4, "seen": [0, 1], "unseen": [2, 3], "ignore_index": 255},
}


def test_segment_best_iou_by_hand():
    ids, best = segment_best_iou(_logits(P0, P1), LABEL_A)
    assert ids.tolist() == [0, 1, 2]
    assert best.tolist() == pytest.approx([4 / 5, 1 / 8, 2 / 4])
    # logits at a quarter of the label's size: upsampled bilinearly before the threshold; a
    # 2 x 2 logit map [[+, -], [-, -]] gives exactly the top-left 2 x 2 block at 4 x 4
    small = torch.tensor([[[IN, OUT], [OUT, OUT]]])
    ids, best = segment_best_iou(small, LABEL_A)
    assert best.tolist() == pytest.approx([1.0, 0.0, 0.0])
    # no proposal at all, and an image without labelled pixels
    ids, best = segment_best_iou(torch.zeros(0, 4, 4), LABEL_A)
    assert ids.tolist() == [0, 1, 2] and best.tolist() == [0.0, 0.0, 0.0]
    ids, best = segment_best_iou(_logits(P0), np.full((4, 4), 255, np.uint8))
    assert ids.size == 0 and best.size == 0


def test_recall_evaluator_merges_partial_states_into_the_hand_count():
    # image B (set a): one unseen segment (class 3) that no proposal touches
    label_b = np.full((4, 4), 3, np.uint8)
    # image C (set b): class 0 covered exactly (IoU 1), class 3 at best IoU 4 / 10 = 0.4 (>= 0.3, < 0.5)
    label_c = np.zeros((4, 4), np.uint8)
    label_c[:, 2:] = 3
    pc0 = label_c == 0
    pc1 = np.zeros((4, 4), bool)
    pc1[:2, 2:] = True
    pc1[:2, 1] = True  # 6 pixels, 4 of class 3 (8 pixels): inter 4, union 8 + 6 - 4 = 10

    def batch(labels, sets, uris):
        return {"labels": labels, "sets": sets, "label_uris": uris}

    ev = ProposalRecallEvaluator(SETS, thresholds=(0.3, 0.5))
    parts = []
    for inputs, logits in [
        (
            batch([LABEL_A, label_b], ["a", "a"], ["A.png", "B.png"]),
            torch.stack([_logits(P0, P1), _logits(P0 & False, P1 & False)]),
        ),
        (batch([label_c], ["b"], ["C.png"]), _logits(pc0, pc1)[None]),
    ]:
        part = ProposalRecallEvaluator(SETS, thresholds=(0.3, 0.5))
        part.process(inputs, {"mask_logits": logits})
        parts.append(part)
    for p in parts:
        ev.merge(p)
    out = ev.finalize()
    # set a: seen segments {0: .8, 1: .125}, unseen {2: .5, 3: 0}
    a = out["a"]
    assert a["images"] == 2
    assert a["segments"] == {"seen": 2, "unseen": 2, "all": 4}
    assert a["recalled"] == {"seen": [1, 1], "unseen": [1, 1], "all": [2, 2]}
    assert a["recall"]["seen"] == {0.3: 0.5, 0.5: 0.5}
    assert a["recall"]["all"] == {0.3: 0.5, 0.5: 0.5}
    # set b: seen {0: 1.0}, unseen {3: 1/3}
    b = out["b"]
    assert b["segments"] == {"seen": 1, "unseen": 1, "all": 2}
    assert b["recall"]["seen"] == {0.3: 1.0, 0.5: 1.0}
    assert b["recall"]["unseen"] == {0.3: 1.0, 0.5: 0.0}
    assert b["recall"]["all"] == {0.3: 1.0, 0.5: 0.5}
    # a set without images: no segments, recall undefined
    empty = ProposalRecallEvaluator({"z": SETS["a"]}).finalize()["z"]
    assert empty["segments"]["all"] == 0 and np.isnan(empty["recall"]["seen"][0.5])


def test_recall_evaluator_errors():
    ev = ProposalRecallEvaluator(SETS)
    bad = LABEL_A.copy()
    bad[0, 0] = 7
    with pytest.raises(DataError, match=r"label bad\.png \(eval set 'a'\): class id\(s\) \[7\]"):
        ev.process({"labels": [bad], "sets": ["a"], "label_uris": ["bad.png"]}, {"mask_logits": _logits(P0)[None]})
    with pytest.raises(ValueError, match=r"thresholds must be in \(0, 1\]"):
        ProposalRecallEvaluator(SETS, thresholds=(0.0,))


# -- the solver: schedule and parameter groups ----------------------------------------------------
def test_poly_lr_factor_is_detectron2_warmup_poly_by_hand():
    from zeroseg.models.maskformer import poly_lr_factor

    f = functools.partial(poly_lr_factor, max_steps=10, power=0.9, warmup_steps=0, warmup_factor=1.0)
    assert f(0) == 1.0
    assert f(5) == pytest.approx(0.5**0.9)  # (1 - 5/10) ** 0.9
    assert f(10) == 0.0
    # linear warm-up over 4 steps from factor 0.1: at step 2, a = 0.5 -> 0.1 * 0.5 + 0.5 = 0.55
    g = functools.partial(poly_lr_factor, max_steps=10, power=0.9, warmup_steps=4, warmup_factor=0.1)
    assert g(0) == pytest.approx(0.1)
    assert g(2) == pytest.approx(0.55 * 0.8**0.9)
    assert g(4) == pytest.approx(0.6**0.9)


def test_param_groups_follow_the_released_optimizer():
    from torch import nn

    from zeroseg.optim import maskformer_param_groups as param_groups

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
            self.head = nn.Linear(4, 2)
            self.norm = nn.LayerNorm(4)
            self.query_embed = nn.Embedding(3, 4)
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    toy = Toy()
    groups = param_groups(toy, lr=1e-4, backbone_lr_mult=0.1, weight_decay=1e-4, weight_decay_norm=0.0)
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(by_id)  # each parameter once
    expected = {
        "backbone.0.weight": (1e-5, 1e-4),
        "backbone.0.bias": (1e-5, 1e-4),
        "backbone.1.weight": (1e-5, 0.0),
        "backbone.1.bias": (1e-5, 0.0),
        "head.weight": (1e-4, 1e-4),
        "head.bias": (1e-4, 1e-4),
        "norm.weight": (1e-4, 0.0),
        "norm.bias": (1e-4, 0.0),
        "query_embed.weight": (1e-4, 0.0),
    }
    got = {n: by_id[id(p)] for n, p in toy.named_parameters() if id(p) in by_id}
    assert got.keys() == expected.keys()  # the frozen layer is left out
    for n, (lr, wd) in expected.items():
        assert got[n] == (pytest.approx(lr), wd), n


# -- the config and plan-time errors ------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def _plan(overrides=(), config="configs/sample_proposals.yaml"):
    from pipeline.catalogue import load_catalogue
    from pipeline.config import load_config
    from pipeline.plan import plan

    cat = load_catalogue()
    return plan(load_config(REPO / config, list(overrides)), cat.stages, code_packages=cat.code_packages)


def test_config_defaults_are_the_released_solver_and_normalisation_follows_the_backbone():
    from stages.pretrain_proposals import IMAGENET_MEAN, IMAGENET_STD, PretrainProposalsConfig
    from zeroseg.config.clip import ClipSpec
    from zeroseg.data.transforms import CLIP_MEAN, CLIP_STD

    clip = ClipSpec(model="zeroseg-tiny-vit", random_init=True)
    c = PretrainProposalsConfig(clip=clip)
    t = c.train
    assert (t.max_steps, t.batch_size, t.lr, t.reference_batch_size, t.clip_grad_norm) == (60000, 32, 1e-4, 32, 0.01)
    assert (c.weight_decay, c.weight_decay_norm, c.backbone_lr_mult, c.poly_power) == (1e-4, 0.0, 0.1, 0.9)
    assert c.model.num_queries == 100 and c.model.class_head == "text" and c.recall_ious == [0.3, 0.5]
    assert (c.augment.mean, c.augment.std) == (IMAGENET_MEAN, IMAGENET_STD)  # ResNet-50
    c = PretrainProposalsConfig(clip=clip, model={"backbone": "clip"}, augment={"crop_size": [224, 224]})
    assert (c.augment.mean, c.augment.std) == (CLIP_MEAN, CLIP_STD)
    # a head that reads no text and a ResNet: the CLIP spec is not used and leaves the key
    assert PretrainProposalsConfig(clip=clip, model={"class_head": "linear"}).clip is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"model": {"class_head": "text"}}, r"model.class_head text .* needs a CLIP spec: add the top-level clip:"),
        ({"model": {"class_head": "linear", "backbone": "clip"}}, r"model.backbone clip needs a CLIP spec"),
        (
            {"model": {"class_head": "linear"}, "augment": {"crop_size": [100, 128]}},
            r"augment.crop_size \[100, 128\] must be a multiple of model.size_divisibility 32",
        ),
        (
            {"model": {"class_head": "linear"}, "augment": {"mean": [0.5, 0.5, 0.5]}},
            r"augment.mean/std .* differ from the resnet50 backbone's normalisation .* remove augment.mean",
        ),
        ({"model": {"class_head": "linear"}, "recall_ious": [0.3, 1.5]}, r"recall_ious must be distinct IoU"),
    ],
)
def test_config_errors(section, message):
    from pydantic import ValidationError

    from stages.pretrain_proposals import PretrainProposalsConfig

    with pytest.raises(ValidationError, match=message):
        PretrainProposalsConfig(**section)


def test_the_text_input_is_bound_for_the_text_head_only():
    base = _plan()
    node = base.nodes["pretrain_proposals"]
    assert node.bindings == {"splits": "build_splits", "text": "embed_text"}
    assert base.keys()["pretrain_proposals"] != _plan(["embed_text.templates=ensemble15"]).keys()["pretrain_proposals"]
    # a linear head reads no text embeddings and no CLIP model: neither enters its key
    lin = ["pretrain_proposals.model.class_head=linear"]
    p = _plan(lin)
    assert p.nodes["pretrain_proposals"].bindings == {"splits": "build_splits"}
    k = p.keys()["pretrain_proposals"]
    assert _plan([*lin, "embed_text.templates=ensemble15"]).keys()["pretrain_proposals"] == k
    other_clip = _plan([*lin, "clip.model=ViT-B-16"])
    assert other_clip.keys()["embed_text"] != p.keys()["embed_text"] and other_clip.keys()["pretrain_proposals"] == k
    # the shared sample settings: the same key however the runtime settings are spelled
    assert _plan(["pretrain_proposals.recall_batch_size=1", "pretrain_proposals.block_rows=8"]).keys() == base.keys()


def test_plan_time_errors(tmp_path):
    import yaml

    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from zeroseg.errors import ConfigError as ZerosegConfigError

    # the text head without an embed_text section
    raw = load_config(REPO / "configs/sample_proposals.yaml").raw  # merged: extends resolved
    prop = raw["pretrain_proposals"]
    cfg = tmp_path / "no_text.yaml"
    cfg.write_text(yaml.safe_dump({k: raw[k] for k in ("run", "clip", "build_splits")} | {"pretrain_proposals": prop}))
    with pytest.raises(
        ConfigError, match=r"pretrain_proposals needs its 'text' input .*model.class_head text.* embed_text"
    ):
        _plan(config=cfg)
    # a text binding the head does not read
    with pytest.raises(
        ConfigError, match=r"pretrain_proposals.text binds an input this pretrain_proposals config does not read"
    ):
        _plan(["pretrain_proposals.model.class_head=objectness", "pretrain_proposals.text=embed_text"])
    # a backbone weights file that does not exist, named
    with pytest.raises(ZerosegConfigError, match=r"model.backbone_weights file '/nonexistent/r18.pth' does not exist"):
        _plan(["pretrain_proposals.model.backbone_weights=/nonexistent/r18.pth"])
    # a typo in the section names the nearest key
    with pytest.raises(ConfigError, match=r"recall_set.*recall_sets"):
        _plan(["pretrain_proposals.recall_set=[val]"])


def _ctx(tmp_path, seen, config_overrides, evals=("val",)):
    """A StageContext over a hand-written classes.json (no manifests: the checks come first)."""
    from pipeline.dag import Artifact, StageContext
    from stages.pretrain_proposals import PretrainProposalsConfig
    from zeroseg.data.classes import Vocabulary
    from zeroseg.data.split_files import write_classes_json

    names = ("cat", "dog", "sky")
    unseen = tuple(i for i in range(3) if i not in seen)
    d = tmp_path / "splits"
    d.mkdir(parents=True)
    v = Vocabulary("toy", names, names, tuple(seen), unseen)
    write_classes_json(d / "classes.json", v, {e: v for e in evals})
    art = Artifact("build_splits", "0" * 64, d, str(d), {"files": [{"path": "classes.json"}]})
    cfg = PretrainProposalsConfig(**{"model": {"class_head": "objectness"}, **config_overrides})
    out = tmp_path / "out"
    out.mkdir()
    return StageContext("pretrain_proposals", "1" * 64, cfg, {"splits": art}, out, tmp_path, str(tmp_path), "t")


def test_run_refuses_no_seen_class_and_unknown_recall_sets_before_training(tmp_path):
    from stages.pretrain_proposals import PretrainProposals
    from zeroseg.errors import ConfigError

    with pytest.raises(
        DataError, match=r"classes.json: the training vocabulary .* has no seen class.*build_splits.split"
    ):
        PretrainProposals().run(_ctx(tmp_path / "a", [], {}))
    with pytest.raises(
        ConfigError, match=r"pretrain_proposals.recall_sets: unknown eval set 'vall'; did you mean 'val'"
    ):
        PretrainProposals().run(_ctx(tmp_path / "b", [0, 1], {"recall_sets": ["vall"]}))


def test_param_groups_of_the_proposal_model():
    from zeroseg.models.maskformer import MaskFormer
    from zeroseg.optim import maskformer_param_groups as param_groups

    cfg = {"backbone": "resnet18", "num_queries": 4, "hidden_dim": 16, "dec_layers": 1, "nheads": 2}
    model = MaskFormer({**cfg, "dim_feedforward": 16, "conv_dim": 16, "mask_dim": 16}, 3, text_dim=8)
    groups = param_groups(model, lr=1.0, backbone_lr_mult=0.1, weight_decay=1e-4, weight_decay_norm=0.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lr_of) == len(trainable) == sum(len(g["params"]) for g in groups)
    for n, p in trainable.items():
        assert lr_of[id(p)] == pytest.approx(0.1 if n.startswith("backbone.") else 1.0), n
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd_of[id(model.query_embed.weight)] == 0.0 and wd_of[id(model.bg_feature)] == 1e-4


def test_param_groups_give_the_clip_pyramids_new_layers_the_full_lr():
    """backbone clip: CLIP's own (pretrained) tower parameters, ``backbone.visual.*``, train at lr x
    0.1; the pyramid's randomly initialised per-level LayerNorms (``backbone.norms.*``) and
    resampling convs / GroupNorms (``backbone.resample.*``) at the full lr; ln_post / proj are
    frozen and left out. Expected values from the parameter names alone."""
    from zeroseg.models.clip import TINY_MODEL, ClipSpec, load_clip
    from zeroseg.models.maskformer import MaskFormer
    from zeroseg.optim import maskformer_param_groups as param_groups

    visual = load_clip(ClipSpec(model=TINY_MODEL, random_init=True)).visual
    cfg = {"backbone": "clip", "num_queries": 4, "hidden_dim": 16, "dec_layers": 1, "nheads": 2}
    model = MaskFormer({**cfg, "dim_feedforward": 16, "conv_dim": 16, "mask_dim": 16}, 3, 8, visual)
    groups = param_groups(model, lr=1.0, backbone_lr_mult=0.1, weight_decay=1e-4, weight_decay_norm=0.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(lr_of) == len(names)
    assert any(n.startswith("backbone.resample.") for n in names) and any(
        n.startswith("backbone.norms.") for n in names
    )
    assert not any(n.startswith(("backbone.visual.ln_post", "backbone.visual.proj")) for n in names)
    for n, p in model.named_parameters():
        if p.requires_grad:
            want = 0.1 if n.startswith("backbone.visual.") else 1.0
            assert lr_of[id(p)] == pytest.approx(want), n


def test_the_drivers_model_skips_the_backbone_weights(tmp_path):
    """The driver's MaskFormer (mean/std check, final state) is built without reading
    model.backbone_weights; the workers' (fresh run) read them: a missing file fails only there."""
    from stages.jobs.pretrain_proposals import build_model

    missing = str(tmp_path / "no_such_weights.pt")
    m = {"backbone": "resnet18", "backbone_weights": missing, "num_queries": 4, "hidden_dim": 16, "dec_layers": 1}
    cfg = {"model": {**m, "nheads": 2, "dim_feedforward": 16, "conv_dim": 16, "mask_dim": 16}, "num_classes": 1}
    cfg = {**cfg, "text_dim": None, "clip": None}
    cfg["model"]["class_head"] = "objectness"
    model = build_model(cfg, load_backbone_weights=False)
    assert model.num_queries == 4
    from zeroseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.backbone_weights file .*no_such_weights.pt' does not exist"):
        build_model(cfg)


# -- end to end on the sample data ---------------------------------------------------------------
# The stage's run is the session fixture `sample_proposals` (tests/conftest.py): build_splits,
# embed_text and pretrain_proposals of configs/sample_proposals.yaml, in process, with the
# overrides the ZegFormer and DeOP sample tests share; those tests find this artifact cached.
PROPOSAL_STAGES = ("build_splits", "embed_text", "pretrain_proposals")


def test_the_sample_configs_plan_one_proposals_artifact(sample_proposals_overrides):
    """configs/sample_zegformer.yaml and sample_deop.yaml extend sample_proposals.yaml: the same
    build_splits, embed_text and pretrain_proposals keys, as shipped and with the tests' overrides;
    the train_classifier section is each method's own (no maskclip key left over)."""
    configs = ("configs/sample_proposals.yaml", "configs/sample_zegformer.yaml", "configs/sample_deop.yaml")
    for overrides in ((), sample_proposals_overrides):
        plans = [_plan(overrides, config=c) for c in configs]
        keys = [{s: p.keys()[s] for s in PROPOSAL_STAGES} for p in plans]
        assert keys[1] == keys[0] and keys[2] == keys[0], configs
    assert [p.nodes["train_classifier"].config.method for p in plans] == ["maskclip", "zegformer", "deop"]
    assert len({p.keys()["train_classifier"] for p in plans}) == 3


def _run(work, *args, overrides, data):
    """The user's command, in a subprocess (its own interpreter: no Ray unless a stage runs)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "pipeline/run.py", "--config", "configs/sample_proposals.yaml", "--work-dir", str(work)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "ZEROSEG_DATA": str(data)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_sample_stage_trains_writes_a_loadable_artifact_measures_recall_and_caches(
    tmp_path, sample_proposals, sample_proposals_overrides, shared_data
):
    import json

    import mlflow

    from zeroseg.data.split_files import read_classes_json
    from zeroseg.models.maskformer import load_proposal_model, read_proposals_json

    first = sample_proposals.first
    # `--stages` the three: the rest of the sample's DAG (maskclip, evaluate) is left out
    assert {n.name: n.status for n in first.plan} == {s: "ran" for s in PROPOSAL_STAGES} | {
        "train_classifier": "skipped",
        "evaluate": "skipped",
    }
    assert "recall pass: 4 images of val" in first.output and "proposal recall" in first.output
    sample_proposals.copy_to(tmp_path)  # the checks below read the copy; the re-run writes there
    [man] = (tmp_path / "store" / "pretrain_proposals").glob("*/manifest.json")
    manifest = json.loads(man.read_text())
    art = man.parent
    metrics = manifest["metrics"]
    assert metrics["steps"] == 4 and metrics["global_batch_size"] == 4
    assert metrics["base_lr"] == pytest.approx(1e-4 * 4 / 32) and metrics["backbone_lr"] == pytest.approx(1e-5 * 4 / 32)

    # the artifact: loads strictly, holds the whole model, knows its seen classes and input
    [splits] = (tmp_path / "store" / "build_splits").glob("*/classes.json")
    train_vocab, _ = read_classes_json(splits)
    doc = read_proposals_json(art)
    assert doc["seen"] == list(train_vocab.seen) and doc["num_classes"] == len(train_vocab.seen)
    assert doc["class_head"] == "text" and doc["text_dim"] == 64 and doc["num_queries"] == 16
    assert doc["input"] == {"size": [128, 128], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    model = load_proposal_model(art)
    weights = torch.load(art / "weights.pt", map_location="cpu", weights_only=True)
    assert set(weights) == set(model.state_dict())
    text = torch.nn.functional.normalize(torch.randn(len(train_vocab.seen), 64), dim=-1)
    out = model(torch.zeros(1, 3, 128, 128), text)
    assert out["pred_logits"].shape == (1, 16, len(train_vocab.seen) + 1) and out["pred_masks"].shape == (1, 16, 32, 32)
    # the artifact's weights are the final checkpoint's; at most keep_checkpoints (2) were kept
    ckpts = sorted(p for p in (tmp_path / "store" / "_train").glob("pretrain_proposals-*/checkpoint_*") if p.is_dir())
    assert 1 <= len(ckpts) <= 2
    final = torch.load(ckpts[-1] / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(final[k], weights[k]) for k in weights)

    # recall: fractions, and the counts in metrics.json agree with them
    rec = json.loads((art / "metrics.json").read_text())["recall"]["val"]
    assert rec["images"] == 4 and rec["segments"]["all"] == rec["segments"]["seen"] + rec["segments"]["unseen"] > 0
    keys = [f"val/recall{t}_{g}" for t in (30, 50) for g in ("seen", "unseen", "all")]
    present = [k for k in keys if k in metrics]
    assert {k for k in keys if not k.endswith("_unseen")} <= set(present)  # seen / all segments exist in val
    for k in present:
        t, g = k.removeprefix("val/recall").split("_")
        assert 0.0 <= metrics[k] <= 1.0
        assert metrics[k] == pytest.approx(rec["recalled"][g][str(int(t) / 100)] / rec["segments"][g])
    assert metrics["val/recall50_all"] <= metrics["val/recall30_all"]  # a stricter threshold recalls less

    # the Ray pass equals a plain loop over the same 4 val images, with the predictor built from the
    # published artifact (the stage built it from proposals.json + the final checkpoint)
    import pyarrow.parquet as pq

    from stages.jobs.pretrain_proposals import ProposalPredictor

    sp = splits.parent
    rows = pq.read_table(sp / "manifests" / "val.parquet").slice(0, 4).to_pylist()
    [text_npy] = (tmp_path / "store" / "embed_text").glob("*/embeddings/train.npy")
    pred = ProposalPredictor(artifact_uri=str(art), text_uri=str(text_npy), device="cpu")
    images = shared_data / "coco128-seg" / "images" / "train2017"
    batch = {
        "eval_set": np.array(["val"] * 4, dtype=object),
        "image_uri": np.array([str(images / r["image"]) for r in rows], dtype=object),
        "label_uri": np.array([str(sp / r["label"]) for r in rows], dtype=object),
    }
    inputs = pred.load(batch)
    v = read_classes_json(splits)[1]["val"]
    ev = ProposalRecallEvaluator({"val": {"num_classes": len(v.names), "seen": v.seen, "unseen": v.unseen}})
    ev.process(inputs, pred(inputs))
    loop = ev.finalize()["val"]
    assert loop["segments"] == rec["segments"]
    assert {g: [int(x) for x in loop["recalled"][g]] for g in loop["recalled"]} == {
        g: [rec["recalled"][g]["0.3"], rec["recalled"][g]["0.5"]] for g in rec["recalled"]
    }

    # MLflow: the stage's run has the recall metrics and the training curves
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("zeroseg-sample")
    [run] = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.artifact_key = '{manifest['key']}' and tags.status = 'ran'"
    )
    assert run.data.tags["stage"] == "pretrain_proposals"
    assert all(run.data.metrics[k] == pytest.approx(metrics[k]) for k in present)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 2  # log_every 2 over 4 steps

    # the same command again, as a user types it: every stage cached, nothing trained, no Ray started
    again = _run(tmp_path, "--stages", *PROPOSAL_STAGES, overrides=sample_proposals_overrides, data=shared_data)
    assert again.returncode == 0 and again.stderr == "", again.stdout[-3000:] + again.stderr[-3000:]
    why = [x for x in again.stdout.splitlines() if " runs: " in x or " run: " in x]
    assert again.stdout.count(" cached (") == 3 and "running" not in again.stdout, why
    assert "ray:" not in again.stdout
