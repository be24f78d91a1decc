"""PADing's stage glue, in process: what extract_features' predictor writes (class ids, matching
costs) and what train_generator's step loop trains the queries as.

* ``stages.jobs.extract_features.FeaturePredictor`` with the proposal model replaced by a scripted
  one (exact mask logits, class logits chosen per query): the labels it writes are the
  *training-vocabulary* class ids of the matched segments (the head's seen index mapped back
  through ``proposals.json``'s ``seen``; not the head index, not shifted), ``NO_OBJECT`` (-1)
  for an unmatched query; the matching costs are extract_features' config (default: released
  PADing ``CLASS_WEIGHT`` / ``MASK_WEIGHT`` / ``DICE_WEIGHT`` 5 / 5 / 5, released-code.md 3.4).
* ``stages.jobs.train_generator._generator_steps`` with a stand-in loop: the head's step
  trains unmatched queries (-1) as class ``C`` (the extra no-object row of the ``C + 1`` head,
  released no-object = 171 of 171 COCO-Stuff classes), matched ones as their own class id; the
  generator's step sees only the matched queries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stages.jobs.extract_features as xf
from stages.extract_features import NO_OBJECT, ExtractFeaturesConfig

# training vocabulary: 6 classes, seen 0, 2, 3, 5 (head indices 0..3), unseen 1, 4
SEEN = [0, 2, 3, 5]
C = 6
H, W = 8, 12  # label size; the scripted model predicts at 4 x 6 (masks at half resolution)
h, w = 4, 6


def _label() -> np.ndarray:
    """Class 5 on the top-left 4 x 6, class 2 on the bottom-right 4 x 6, ignore (255) elsewhere
    (even-aligned: exact under nearest downsampling to the 4 x 6 prediction grid)."""
    lab = np.full((H, W), 255, np.uint8)
    lab[:4, :6] = 5
    lab[4:, 6:] = 2
    return lab


def _masks_at_prediction_size(lab: np.ndarray) -> dict[int, np.ndarray]:
    small = lab[::2, ::2]
    return {c: small == c for c in (2, 5)}


class ScriptedProposals(torch.nn.Module):
    """Q = 4 queries: query 0 = the class-5 segment (head index 3), query 2 = the class-2 segment
    (head index 1), queries 1 and 3 empty masks; class logits ``logits`` [Q, K + 1] as given."""

    def __init__(self, logits: torch.Tensor, masks: torch.Tensor, d: int = 3):
        super().__init__()
        self.logits, self.masks, self.d = logits, masks, d

    def forward(self, x):
        b = len(x)
        emb = torch.arange(b * len(self.logits) * self.d, dtype=torch.float32).view(b, len(self.logits), self.d)
        return {
            "pred_logits": self.logits[None].expand(b, -1, -1),
            "pred_masks": self.masks[None].expand(b, -1, -1, -1),
            "query_embed": emb,
        }


def _predictor(monkeypatch, tmp_path, model, cfg=None):
    doc = {"seen": SEEN, "input": {"size": [H, W], "mean": [0.0] * 3, "std": [1.0] * 3}}
    monkeypatch.setattr(xf, "read_proposals_json", lambda d: doc)
    monkeypatch.setattr(xf, "load_proposal_model", lambda d, device="cpu": model)
    return xf.FeaturePredictor(cfg or ExtractFeaturesConfig(), str(tmp_path), ignore_index=255, device="cpu")


def _exact_masks(lab):
    m = _masks_at_prediction_size(lab)
    masks = torch.full((4, h, w), -10.0)
    masks[0][torch.from_numpy(m[5])] = 10.0
    masks[2][torch.from_numpy(m[2])] = 10.0
    return masks


def test_the_default_matching_costs_are_the_released_padings():
    cfg = ExtractFeaturesConfig()
    assert (cfg.cost_class, cfg.cost_mask, cfg.cost_dice) == (5.0, 5.0, 5.0)  # released CLASS/MASK/DICE_WEIGHT
    assert NO_OBJECT == -1


def test_features_carry_training_class_ids_and_no_object(monkeypatch, tmp_path):
    lab = _label()
    logits = torch.zeros((4, len(SEEN) + 1))
    logits[0, 3] = logits[2, 1] = 4.0  # head index 3 = class 5, head index 1 = class 2
    logits[1, -1] = logits[3, -1] = 4.0  # no-object
    p = _predictor(monkeypatch, tmp_path, ScriptedProposals(logits, _exact_masks(lab)))
    # the matcher is built from the config's costs
    assert (p.matcher.cost_class, p.matcher.cost_mask, p.matcher.cost_dice) == (5.0, 5.0, 5.0)
    images = [np.zeros((H, W, 3), np.uint8)] * 2
    # image 1: the same segments plus class 3 (head index 2) nowhere a query matches well
    lab1 = lab.copy()
    lab1[4:, :2] = 3
    out = p({"images": images, "labels": [lab, lab1], "rows": [0, 1]})
    # by hand: image 0 has 2 targets (classes 5 and 2) for 4 queries: queries 0 and 2 take them,
    # labelled with the class ids 5 and 2 (head indices 3 and 1 would be a bug, so would eval ids)
    assert out["labels"].dtype == np.int32
    assert out["labels"][0].tolist() == [5, NO_OBJECT, 2, NO_OBJECT]
    # image 1: 3 targets, 4 queries: one of the empty-mask queries (1 or 3) takes class 3
    row = out["labels"][1].tolist()
    assert row[0] == 5 and row[2] == 2 and sorted([row[1], row[3]]) == [NO_OBJECT, 3]
    assert out["embeddings"].shape == (2, 4, 3)
    np.testing.assert_array_equal(out["embeddings"][1, 2], [18.0, 19.0, 20.0])  # (1 * 4 + 2) * 3: passed as is


def test_targets_are_the_seen_classes_present_as_head_indices(monkeypatch, tmp_path):
    """Unseen / out-of-vocabulary ids are no targets (ignore under PADing's semantic setting)."""
    p = _predictor(monkeypatch, tmp_path, ScriptedProposals(torch.zeros((4, 5)), torch.zeros((4, h, w))))
    lab = np.full((H, W), 255, np.uint8)
    lab[0, :3] = 0  # seen, head 0
    lab[1, :2] = 5  # seen, head 3
    lab[2, 0] = 4  # unseen
    lab[3, 0] = 1  # unseen
    lab[4, 0] = 9  # beyond the seen table (a stray id)
    t = p.targets(lab)
    assert t["labels"].tolist() == [0, 3]
    assert t["masks"].shape == (2, H, W)
    assert t["masks"][0].sum() == 3 and t["masks"][1].sum() == 2 and bool(t["masks"][1][1, :2].all())


def test_the_configured_costs_decide_the_matching(monkeypatch, tmp_path):
    """One target (class 5), two queries: query 0 has its exact mask but a weak class score
    (softmax over 5 zero logits: 0.2), query 1 an empty mask with a strong one (0.9).

    * class cost only (mask = dice = 0): query 1 wins (-0.9 < -0.2);
    * mask costs only (class 0): query 0 wins (its focal and dice costs are ~0, query 1's dice
      cost is 1 - 1 / (|G| + 1) = 1 - 1/13 with |G| = 12 pixels at 4 x 6);
    * the defaults 5 / 5 / 5: query 0 (class gap 5 * 0.7 = 3.5 < dice gap 5 * 12/13 = 4.6)."""
    lab = np.full((H, W), 255, np.uint8)
    lab[:4, :6] = 5
    m = torch.from_numpy(lab[::2, ::2] == 5)
    masks = torch.full((2, h, w), -10.0)
    masks[0][m] = 10.0
    logits = torch.zeros((2, len(SEEN) + 1))
    logits[0, 3] = 0.0  # softmax over 5 zeros: 0.2
    logits[1, 3] = float(np.log(0.9 * 4 / 0.1))  # e^l / (e^l + 4) = 0.9
    assert torch.softmax(logits, -1)[:, 3].tolist() == pytest.approx([0.2, 0.9])
    model = ScriptedProposals(logits, masks)

    def first_query_label(**costs):
        p = _predictor(monkeypatch, tmp_path, model, ExtractFeaturesConfig(**costs))
        return p({"images": [np.zeros((H, W, 3), np.uint8)], "labels": [lab], "rows": [0]})["labels"][0].tolist()

    # each configured cost reaches its own slot of the matcher
    p = _predictor(monkeypatch, tmp_path, model, ExtractFeaturesConfig(cost_class=1.0, cost_mask=20.0, cost_dice=2.0))
    assert (p.matcher.cost_class, p.matcher.cost_mask, p.matcher.cost_dice) == (1.0, 20.0, 2.0)
    assert first_query_label(cost_mask=0.0, cost_dice=0.0) == [NO_OBJECT, 5]
    assert first_query_label(cost_class=0.0) == [5, NO_OBJECT]
    assert first_query_label() == [5, NO_OBJECT]


# ---------------------------------------------------------------------------------------------
# train_generator: what the step loop trains each query as
# ---------------------------------------------------------------------------------------------
class StandInLoop:
    """The parts of ``pipeline.training``'s Loop that the generator loop uses: one batch of rows."""

    def __init__(self, config, rows):
        self.config, self.rows = config, rows
        self.device, self.lr, self.world_size, self.global_step = torch.device("cpu"), 0.01, 1, 0
        self.done = []

    def restore(self, *a, **k):
        pass

    def batches(self, name):
        assert name == "train"
        yield {"id": torch.tensor(self.rows)}

    def step_done(self, loss, images, **metrics):
        self.done.append((loss, images, metrics))
        self.global_step += 1


def test_the_generator_loop_trains_unmatched_queries_as_the_no_object_class(monkeypatch):
    from stages.jobs import train_generator as tg
    from zeroseg.config.pading import GeneratorConfig, RetrainConfig
    from zeroseg.models.pading import FeatureGenerator

    d, text_dim = 4, 8
    rng = np.random.default_rng(0)
    text = rng.standard_normal((C, text_dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    emb = rng.standard_normal((3, 3, d)).astype(np.float32)  # [N, Q, d]
    lab = np.array([[5, -1, 2], [-1, -1, 0], [3, 3, -1]], np.int32)
    calls = {}
    orig_gen, orig_cls = FeatureGenerator.generator_losses, FeatureGenerator.classifier_loss

    def gen_losses(self, real, labels):
        calls["gen"] = (real.clone(), labels.clone())
        return orig_gen(self, real, labels)

    def cls_loss(self, real, labels, retrain, generator=None):
        calls["cls"] = (real.clone(), labels.clone(), self.head.weight.shape)
        return orig_cls(self, real, labels, retrain, generator)

    monkeypatch.setattr(FeatureGenerator, "generator_losses", gen_losses)
    monkeypatch.setattr(FeatureGenerator, "classifier_loss", cls_loss)
    config = {
        "class_text": text.tolist(),
        "seen": SEEN,
        "unseen": [1, 4],
        "model": GeneratorConfig(text_dim=text_dim, feature_dim=d, primitives=4, layers=1, heads=2, ffn=8),
        "classifier": RetrainConfig(),
        "head_weight": np.zeros((C + 1, d)).tolist(),
        "head_bias": np.zeros(C + 1).tolist(),
        "generator_phase": 1,
        "schedule": "joint",
        "generator_lr_ratio": 0.5,
        "poly_power": 0.9,
        "warmup_steps": 0,
        "warmup_factor": 1.0,
    }
    rows = [2, 0]  # the batch's rows of the feature arrays, out of order
    loop = StandInLoop(config, rows)
    tg._generator_steps(loop, emb, lab)
    # the head's step: every query of the batch, -1 -> C = 6 (the extra no-object row), ids kept
    real, labels, head_shape = calls["cls"]
    assert head_shape == (C + 1, d)
    assert labels.tolist() == [3, 3, C, 5, C, 2]
    np.testing.assert_array_equal(real.numpy(), emb[rows].reshape(-1, d))
    # the generator's step: the matched queries only, with their class ids
    g_real, g_labels = calls["gen"]
    assert g_labels.tolist() == [3, 3, 5, 2]
    np.testing.assert_array_equal(g_real.numpy(), emb[rows][lab[rows] >= 0])
    ((loss, images, metrics),) = loop.done
    assert images == 2 and "cls_loss" in metrics and "gen_loss" in metrics
    assert loss == pytest.approx(metrics["cls_loss"] + metrics["gen_loss"])
