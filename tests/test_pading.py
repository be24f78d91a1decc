"""PADing (extract_features + train_generator): the losses by hand on tiny tensors, the generator's
shapes and gradients, the head extension, query matching, the closed-vocabulary segmenter, the
classifier retraining on a synthetic two-cluster problem, bad inputs, the benchmark configs and
the sample DAG proposals -> features -> train_generator -> evaluate with a cached second run."""

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from zeroseg.config.pading import PAPER_BANDWIDTHS, GeneratorConfig
from zeroseg.models.pading import (
    FeatureGenerator,
    PADing,
    alignment_loss,
    extend_head,
    gaussian_kl,
    mmd_loss,
    primitives_of,
    query_labels,
    softmax_kl,
)

REPO = Path(__file__).resolve().parent.parent
RELEASED = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)


# ------------------------------------------------------------------ losses by hand
def _mmd_by_hand(s, bandwidths):
    """One synthetic feature at 0 (or several copies) and one real at s in 1-d: per variance v,
    MMD^2 = k(0,0) + k(s,s) - 2 k(0,s) = 2 - 2 exp(-s^2 / (2 v))."""
    return math.sqrt(sum(2 - 2 * math.exp(-(s**2) / (2 * v)) for v in bandwidths))


def test_mmd_is_zero_for_identical_samples_and_grows_with_a_shift():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    assert mmd_loss(x, x.clone(), RELEASED).item() == pytest.approx(0.0, abs=1e-5)
    shifts = [mmd_loss(x + s, x, RELEASED).item() for s in (0.5, 1.0, 2.0, 4.0)]
    assert shifts == sorted(shifts) and shifts[0] > 0.01
    # by hand: one point each, 1-d; two synthetic copies weigh 1/2 each (mean), still one "sample"
    for fake in (torch.zeros(1, 1), torch.zeros(2, 1)):
        got = mmd_loss(fake, torch.tensor([[2.0]]), RELEASED).item()
        assert got == pytest.approx(_mmd_by_hand(2.0, RELEASED), rel=1e-5)
    # the paper's option: Eq. 2's k = exp(-d^2 / (2 sigma^2)), sigma in {2, 5, 10, 20, 40, 60}; by
    # hand for d = 2: MMD^2_sigma = 2 - 2 exp(-4 / (2 sigma^2)) = 2 - 2 exp(-2 / sigma^2)
    want = math.sqrt(sum(2 - 2 * math.exp(-2.0 / sigma**2) for sigma in (2, 5, 10, 20, 40, 60)))
    paper = mmd_loss(torch.zeros(1, 1), torch.tensor([[2.0]]), PAPER_BANDWIDTHS).item()
    assert paper == pytest.approx(want, rel=1e-5)
    assert GeneratorConfig(bandwidths=PAPER_BANDWIDTHS).bandwidths == (4.0, 25.0, 100.0, 400.0, 1600.0, 3600.0)


def test_softmax_kl_by_hand():
    tau = 0.1
    # target softmax([tau ln 3, 0] / tau) = (3/4, 1/4); pred softmax(0, 0) = (1/2, 1/2)
    got = softmax_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[tau * math.log(3), 0.0]]), tau).item()
    want = (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)) / 2  # / numel
    assert got == pytest.approx(want, rel=1e-5)
    assert softmax_kl(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]), tau).item() == pytest.approx(0, abs=1e-7)


def test_alignment_loss_by_hand():
    feat_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cosines: identity
    sem_s = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # cosines: all 1 -> uniform target rows
    feat_u, sem_u = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # seen-seen: each row KL(uniform || softmax([10, 0])) = 5 - ln 2 + ln(1 + e^-10), two rows, / 4
    # unseen-unseen and seen-unseen: one column per row -> both softmaxes are 1 -> 0
    want = (2 * (5 - math.log(2) + math.log1p(math.exp(-10))) / 4) / 3
    assert alignment_loss(feat_s, feat_u, sem_s, sem_u, 0.1).item() == pytest.approx(want, rel=1e-5)
    # features whose relations equal the semantic ones: nothing to align
    assert alignment_loss(sem_s * 3, sem_u, sem_s, sem_u, 0.1).item() == pytest.approx(0.0, abs=1e-6)


def test_gaussian_kl_by_hand():
    # row [1, -1]: mean 0, variance 1 -> 0; row [3, 1]: mean 2, variance 1 -> (1 + 4 - 1 - 0) / 2 = 2
    assert gaussian_kl(torch.tensor([[1.0, -1.0], [3.0, 1.0]])).item() == pytest.approx(1.0, rel=1e-6)


def test_extend_head_released_and_mapped_by_hand():
    w = torch.tensor([[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]])  # seen classes 1, 3 then no-object
    b = torch.tensor([0.1, 0.2, 0.9])
    rw, rb = extend_head(w, b, seen=[1, 3], unseen=[0, 2], num_classes=4, mode="released")
    # released (seen-first order copy): class 1 <- row 0, class 3 <- row 1, the first unseen class (0)
    # <- the old no-object row, class 2 and the new no-object row zero
    assert rw.tolist() == [[9, 9], [1, 1], [0, 0], [2, 2], [0, 0]]
    assert rb.tolist() == pytest.approx([0.9, 0.1, 0.0, 0.2, 0.0])
    mw, mb = extend_head(w, b, seen=[1, 3], unseen=[0, 2], num_classes=4, mode="mapped")
    assert mw.tolist() == [[0, 0], [1, 1], [0, 0], [2, 2], [9, 9]]
    assert mb.tolist() == pytest.approx([0.0, 0.1, 0.0, 0.2, 0.9])


# ------------------------------------------------------------------ generator
GEN = {"text_dim": 4, "feature_dim": 8, "primitives": 6, "layers": 2, "heads": 2, "ffn": 16}


def _generator(**kw):
    torch.manual_seed(0)
    text = torch.eye(4)[:3]  # 3 classes
    return FeatureGenerator({**GEN, **kw}, 3, seen=[0, 2], unseen=[1], class_text=text)


def test_generator_shapes_and_the_primitives_receive_gradients():
    g = _generator()
    feats, vec = g.generate(torch.tensor([0, 2, 2, 1]))
    assert feats.shape == (4, 8) and vec.shape == (4, 8)
    real = torch.randn(5, 8)
    parts = g.generator_losses(real, torch.tensor([0, 0, 2, 2, 2]))
    assert set(parts) == {"loss", "mmd", "cls", "align", "relation", "unrelated", "recon"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in parts.values())
    assert all(parts[k].item() > 0 for k in ("mmd", "cls", "align", "relation", "unrelated", "recon"))
    parts["loss"].backward()
    prim = primitives_of(g)
    assert prim is not None and prim.shape == (6, 8)
    assert prim.grad is not None and prim.grad.abs().sum() > 0
    assert all(p.grad is not None for p in g.disentangler.parameters())
    # the ablations switch the parts off; the GMMN generator has no primitives
    p_only = _generator(align=False, disentangle=False).generator_losses(real, torch.tensor([0, 0, 2, 2, 2]))
    assert p_only["align"].item() == p_only["relation"].item() == p_only["recon"].item() == 0.0
    gmmn = _generator(generator="gmmn", align=False, disentangle=False)
    assert primitives_of(gmmn) is None and gmmn.generate(torch.tensor([1]))[0].shape == (1, 8)
    with pytest.raises(ValueError, match="non-seen"):
        g.generator_losses(real[:1], torch.tensor([1]))


def test_synthetic_check_leaves_the_global_rng_alone():
    from stages.jobs.train_generator import synthetic_check
    from zeroseg.config.pading import GeneratorConfig

    g = _generator()
    train = types.SimpleNamespace(names=("a", "b", "c"), seen=(0, 2), unseen=(1,))
    cfg = GeneratorConfig(**GEN)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = synthetic_check(cfg, g.state_dict(), torch.eye(4)[:3].numpy(), train)
    assert torch.equal(torch.get_rng_state(), before)  # the driver's RNG did not move
    again = synthetic_check(cfg, g.state_dict(), torch.eye(4)[:3].numpy(), train)
    assert first == again and 0.0 <= first["synthetic_unseen_acc"] <= 1.0  # seeded: reproducible


def test_text_embeddings_of_another_size_are_refused():
    from zeroseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.text_dim 4"):
        FeatureGenerator(GEN, 3, seen=[0], unseen=[1], class_text=torch.zeros(3, 512))


def test_retraining_teaches_the_head_the_unseen_class_on_two_clusters():
    """Two clusters: seen class 0 around +2 e0, unseen class 1 around +2 e1 (never in the real
    features), no-object queries around +2 e2. The generator is fixed to a known map (a GMMN whose
    weights send text e_c to 2 e_c whatever the noise: Algorithm 1's classifier step after the
    generator). The pretrained head knows class 0 and no-object only: before retraining it never
    predicts class 1; after, unseen-cluster points are class 1 and seen ones still class 0."""
    g = _fixed_gmmn(2, seen=[0], unseen=[1])  # [text (4) | noise (4)] -> text -> 2 x text in channels 0..3
    synth = g.generate(torch.ones(3, dtype=torch.long))[0]
    torch.testing.assert_close(synth, 2 * torch.eye(8)[1].expand(3, 8))
    w = torch.zeros(2, 8)
    w[0, 0] = 1.0  # the pretrained head: class 0 <- channel 0, no-object bias 0.5
    hw, hb = extend_head(w, torch.tensor([0.0, 0.5]), [0], [1], 2, "mapped")
    with torch.no_grad():
        g.head.weight.copy_(hw)
        g.head.bias.copy_(hb)
    seen_real = torch.randn(64, 8) * 0.2 + 2 * torch.eye(8)[0]
    unseen_real = torch.randn(64, 8) * 0.2 + 2 * torch.eye(8)[1]
    no_object = torch.randn(64, 8) * 0.2 + 2 * torch.eye(8)[2]

    def predicted(x):
        with torch.no_grad():
            return g.head(x).argmax(-1)

    anything = torch.cat([seen_real, unseen_real, no_object, torch.randn(512, 8) * 3])
    assert not bool((predicted(anything) == 1).any())
    opt = torch.optim.SGD(g.head.parameters(), lr=0.1, momentum=0.9)
    retrain = {"unseen_weight": 5.0, "no_object_weight": 0.1}
    for _ in range(60):
        idx = torch.randint(0, 64, (16,))
        opt.zero_grad()
        real = torch.cat([seen_real[idx], no_object[idx]])
        labels = torch.cat([torch.zeros(16, dtype=torch.long), torch.full((16,), 2)])
        g.classifier_loss(real, labels, retrain).backward()
        opt.step()
    assert (predicted(unseen_real) == 1).float().mean().item() > 0.95
    assert (predicted(seen_real) == 0).float().mean().item() > 0.95


def _fixed_gmmn(num_classes, seen, unseen, **kw):
    """A FeatureGenerator whose GMMN sends the text e_c to 2 e_c (channels 0..3) whatever the
    noise (the noise columns of the first layer are 0, no dropout)."""
    torch.manual_seed(0)
    g = FeatureGenerator(
        {**GEN, "generator": "gmmn", "gmmn_hidden": 4, "gmmn_dropout": 0.0, "align": False, "disentangle": False, **kw},
        num_classes,
        seen=seen,
        unseen=unseen,
        class_text=torch.eye(4)[:num_classes] if num_classes <= 4 else torch.eye(num_classes)[:, :4],
    )
    first, second = g.generator.net[0], g.generator.net[3]
    with torch.no_grad():
        first.weight.zero_()
        first.weight[:, :4] = torch.eye(4)
        first.bias.zero_()
        second.weight.zero_()
        second.weight[:4] = 2 * torch.eye(4)
        second.bias.zero_()
    return g


def test_retraining_loss_value_by_hand():
    """The head's retraining loss (released forward_train_classifier: weighted CE over real + the
    synthetic unseen embeddings) on 4 classes, seen {0, 2}, unseen {1, 3}, synthetic features 2 e_c.
    Head: W[0, 0] = W[1, 1] = 1, W[3, 3] = 3, no-object row W[4, 5] = 1, bias 0. Real: e_0 (class 0)
    -> logits (1, 0, 0, 0, 0) and e_5 (no-object) -> (0, 0, 0, 0, 1): each -log p = ln(1 + 4 / e);
    synthetic 2 e_1 -> (0, 2, 0, 0, 0): ln(1 + 4 e^-2); 2 e_3 -> (0, 0, 0, 6, 0): ln(1 + 4 e^-6).
    Weighted mean (torch's: divided by the summed weights), seen 1, no-object 0.1, unseen 5:
    (1 La + .1 La + 5 L1 + 5 L3) / 11.1."""
    g = _fixed_gmmn(4, [0, 2], [1, 3])
    with torch.no_grad():
        g.head.weight.zero_()
        g.head.bias.zero_()
        g.head.weight[0, 0] = g.head.weight[1, 1] = 1.0
        g.head.weight[3, 3] = 3.0
        g.head.weight[4, 5] = 1.0
    real = torch.stack([torch.eye(8)[0], torch.eye(8)[5]])
    labels = torch.tensor([0, 4])
    la, l1, l3 = math.log(1 + 4 / math.e), math.log(1 + 4 * math.exp(-2)), math.log(1 + 4 * math.exp(-6))
    loss = g.classifier_loss(real, labels, {})  # released: unseen_weight 5, no_object_weight 0.1, 17 per step
    assert loss.item() == pytest.approx((1.1 * la + 5 * l1 + 5 * l3) / 11.1, rel=1e-6)
    custom = g.classifier_loss(real, labels, {"unseen_weight": 2.0, "no_object_weight": 0.5})
    assert custom.item() == pytest.approx((1.5 * la + 2 * l1 + 2 * l3) / 5.5, rel=1e-6)
    # one synthetic feature per step: randperm(U)[:1] of the seeded generator picks class 1 or 3
    seen_values = set()
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        pick = [1, 3][int(torch.randperm(2, generator=torch.Generator().manual_seed(seed))[0])]
        lu = l1 if pick == 1 else l3
        one = g.classifier_loss(real, labels, {"unseen_per_step": 1}, generator=gen)
        assert one.item() == pytest.approx((1.1 * la + 5 * lu) / 6.1, rel=1e-6), seed
        seen_values.add(pick)
    assert seen_values == {1, 3}  # both picks occur over the seeds


@pytest.mark.parametrize("per_step", [1, 3, 5, 17])
def test_retraining_draws_per_seed_and_count(per_step):
    """The synthetic unseen classes of one retraining step: min(unseen_per_step, U) distinct
    unseen classes (U = 5 here), the same for the same seed, different across seeds when fewer
    than U are drawn, every unseen class when unseen_per_step >= U."""
    unseen = [3, 4, 5, 6, 7]
    g = _fixed_gmmn(8, [0, 1, 2], unseen)
    drawn = []
    orig = g.generate
    g.generate = lambda ids: (drawn.append(ids.tolist()), orig(ids))[1]
    real, labels = torch.eye(8)[:2], torch.tensor([0, 8])
    per_seed = {}
    for seed in range(6):
        for _ in range(2):
            drawn.clear()
            g.classifier_loss(
                real, labels, {"unseen_per_step": per_step}, generator=torch.Generator().manual_seed(seed)
            )
            (ids,) = drawn
            assert len(ids) == min(per_step, 5) and len(set(ids)) == len(ids) and set(ids) <= set(unseen)
            assert per_seed.setdefault(seed, ids) == ids  # reproducible per seed
    distinct = {tuple(sorted(v)) for v in per_seed.values()}
    if per_step < 5:
        assert len(distinct) > 1
    else:
        assert distinct == {tuple(unseen)}


@pytest.mark.parametrize("kind", ["primitive", "gmmn"])
@pytest.mark.parametrize("n", [1, 3])
def test_generator_noise_per_seed_and_count(kind, n):
    """Eq. 1's noise Z (primitive generator) and the GMMN's z: one draw per synthetic sample from
    the global RNG, in eval mode too: the same seed gives the same features, another seed others,
    and repeats of one class within a call differ."""
    g = _generator(generator=kind, dropout=0.0, gmmn_dropout=0.0).eval()
    ids = torch.full((n,), 1, dtype=torch.long)
    out = {}
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            out[seed] = g.generate(ids)[0]
        torch.manual_seed(seed)
        with torch.no_grad():
            torch.testing.assert_close(g.generate(ids)[0], out[seed], rtol=0, atol=0)
        assert out[seed].shape == (n, 8)
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[1] - out[2]).abs().max() > 1e-3
    if n > 1:
        assert (out[0][0] - out[0][1]).abs().max() > 1e-3


def test_class_map_just_inside_and_outside_the_cosine_threshold():
    """An evaluation class maps to the training class whose text it equals (cosine > 1 - 1e-4):
    at an angle of 0.01 (cosine 1 - 5e-5) it maps, at 0.02 (1 - 2e-4) it is -1; the row's
    length does not matter; the nearest training class wins."""
    class_text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    fake = types.SimpleNamespace(class_text=class_text)

    def at(theta, scale=1.0, axis=0):
        v = [0.0, 0.0, scale * math.sin(theta)]
        v[axis] = scale * math.cos(theta)
        return v

    text = torch.tensor([at(0.01), at(0.02), at(0.01, 4.0, axis=1), at(0.02, 0.3, axis=1), at(0.0, 1.0, axis=1)])
    assert PADing.class_map(fake, text).tolist() == [0, -1, 1, -1, 1]


# ------------------------------------------------------------------ matching and the segmenter
def test_query_labels_take_the_matched_segment_or_no_object():
    from zeroseg.models.maskformer import HungarianMatcher

    masks = torch.full((1, 2, 4, 4), -8.0)
    masks[0, 0, :, 2:] = 8.0  # query 0: the right half
    masks[0, 1, :, :2] = 8.0  # query 1: the left half
    target = {"labels": torch.tensor([1]), "masks": torch.zeros(1, 4, 4, dtype=torch.bool)}
    target["masks"][0, :, :2] = True  # the segment of head class 1: the left half
    got = query_labels(torch.zeros(1, 2, 3), masks, [target], HungarianMatcher(5, 5, 5))
    assert got.tolist() == [[-1, 1]]


def test_feature_writer_puts_each_batch_at_its_rows_whatever_the_order(tmp_path):
    """The driver-side merge of extract_features: partial states arriving out of order land at their
    manifest rows; the counts are those of the labels written (-1 = no-object)."""
    from stages.extract_features import EMBEDDINGS, LABELS
    from stages.jobs.extract_features import FeatureWriter

    w = FeatureWriter(str(tmp_path), rows=3, queries=2, dim=1)
    parts = []
    for rows, emb, lab in (
        ([2], [[[2.0], [2.5]]], [[7, -1]]),
        ([0, 1], [[[0.0], [0.5]], [[1.0], [1.5]]], [[-1, -1], [3, 7]]),
    ):
        p = FeatureWriter(str(tmp_path), 3, 2, 1)
        p.reset()
        p.process({"rows": rows}, {"embeddings": np.array(emb, np.float32), "labels": np.array(lab, np.int32)})
        parts.append(p)
    w.reset()
    for p in parts:
        w.merge(p)
    res = w.finalize()
    assert np.load(tmp_path / EMBEDDINGS)[:, :, 0].tolist() == [[0.0, 0.5], [1.0, 1.5], [2.0, 2.5]]
    assert np.load(tmp_path / LABELS).tolist() == [[-1, -1], [3, 7], [7, -1]]
    assert res == {
        "images": 3,
        "written": 3,
        "matched": 3,
        "matched_per_class": {3: 1, 7: 2},
        "images_without_match": 1,
    }


PROPOSAL_MODEL = {
    "backbone": "resnet18",
    "num_queries": 4,
    "hidden_dim": 8,
    "dec_layers": 1,
    "nheads": 2,
    "dim_feedforward": 16,
    "conv_dim": 16,
    "mask_dim": 16,
    "class_head": "linear",
}


def test_segmenter_scores_training_classes_and_maps_eval_classes_by_their_embedding(tmp_path):
    from zeroseg.models import load_segmenter, save_segmenter
    from zeroseg.models.clip import TINY_MODEL, ClipSpec
    from zeroseg.models.maskformer import MaskFormer, read_proposals_json, save_proposals

    torch.manual_seed(0)
    mf = MaskFormer(PROPOSAL_MODEL, 2, load_backbone_weights=False).eval()
    save_proposals(tmp_path / "p", mf, seen=[0, 2], input_size=[64, 64])
    doc = read_proposals_json(tmp_path / "p")
    seg = PADing(None, {"proposals": doc, "classes": 3, "text_dim": 4}).eval()
    seg.proposals.load_state_dict(mf.state_dict())
    text = torch.eye(4)[:3]
    seg.class_text.copy_(text)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        scores = seg(images, text)
        out = mf(images)
        # by hand: softmax of the new head over the query embeddings, no-object dropped, times the
        # sigmoid of the mask logits upsampled to the input
        up = torch.nn.functional.interpolate(out["pred_masks"], size=(64, 64), mode="bilinear", align_corners=False)
        p = seg.head(out["query_embed"]).softmax(-1)[..., :3]
        want = (p[0, :, :, None, None] * up[0, :, None].sigmoid()).sum(0)
    assert scores.shape == (1, 3, 64, 64)
    torch.testing.assert_close(scores[0], want, rtol=1e-4, atol=1e-5)
    # an eval vocabulary: class 2, an unknown class, class 0 -> scored as 2, zeros, 0
    ev = torch.stack([text[2], torch.tensor([0.0, 0.0, 0.0, 1.0]), text[0]])
    with torch.no_grad():
        mapped = seg(images, ev)
    torch.testing.assert_close(mapped[0, 0], scores[0, 2])
    assert mapped[0, 1].abs().max() == 0
    torch.testing.assert_close(mapped[0, 2], scores[0, 0])
    save_segmenter(
        tmp_path / "s", seg, ClipSpec(model=TINY_MODEL, random_init=True), "pading", seg.trainable_state_dict()
    )
    back = load_segmenter(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(back(images, text), scores)


# ------------------------------------------------------------------ configs
class EverythingCached:
    def exists(self, stage, key):
        return True

    def latest(self, stage):
        return None


def test_the_four_ablations_share_every_upstream_artifact(monkeypatch, tmp_path):
    """PADing Tables 1-2: GMMN; primitives only; + alignment; + disentanglement (PADing). Only
    train_generator (and evaluate, which reads it) changes key; the last is coco_stuff_pading.yaml's."""
    from pipeline.config import load_config
    from pipeline.plan import plan
    from stages.catalog import STAGES

    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    keys = {
        n: plan(load_config(REPO / "configs" / f"coco_stuff_pading{n}.yaml"), STAGES, store=EverythingCached()).keys()
        for n in ("", "_gmmn", "_p", "_pa", "_pad")
    }
    upstream = ("build_splits", "embed_text", "pretrain_proposals", "extract_features")
    for s in upstream:
        assert len({k[s] for k in keys.values()}) == 1, s
    ablations = [keys[n]["train_generator"] for n in ("_gmmn", "_p", "_pa", "_pad")]
    assert len(set(ablations)) == 4 and keys["_pad"]["train_generator"] == keys[""]["train_generator"]
    p = plan(load_config(REPO / "configs" / "coco_stuff_pading_pa.yaml"), STAGES, store=EverythingCached())
    m = p.nodes["train_generator"].config.model
    assert (m.generator, m.align, m.disentangle) == ("primitive", True, False)


def test_coco_stuff_config_is_the_released_setting(monkeypatch, tmp_path):
    """released-code.md 3.1-3.5 and configs/semantic-segmentation/PADing.yaml."""
    from pipeline.config import load_config
    from pipeline.plan import plan
    from stages.catalog import STAGES

    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    p = plan(load_config(REPO / "configs/coco_stuff_pading.yaml"), STAGES, store=EverythingCached())
    assert p.nodes["build_splits"].config.split.builtin == "coco_stuff171"
    pm = p.nodes["pretrain_proposals"].config.model
    assert (pm.class_head, pm.backbone, pm.num_queries, pm.hidden_dim) == ("linear", "resnet50", 100, 256)
    assert (pm.class_weight, pm.mask_weight, pm.dice_weight, pm.no_object_weight) == (2.0, 5.0, 5.0, 0.1)
    ef = p.nodes["extract_features"].config
    assert (ef.cost_class, ef.cost_mask, ef.cost_dice) == (5.0, 5.0, 5.0)
    tg = p.nodes["train_generator"].config
    m, c = tg.model, tg.classifier
    assert (m.primitives, m.feature_dim, m.text_dim, m.layers, m.heads, m.ffn, m.dropout) == (
        400,
        256,
        512,
        3,
        8,
        1024,
        0.3,
    )
    assert tuple(m.bandwidths) == RELEASED and (m.tau, m.structure_weight) == (0.1, 0.001)
    assert (m.weight_align, m.weight_relation, m.weight_recon, m.cls_weight) == (1.0, 1.0, 0.5, 0.001)
    assert (c.unseen_weight, c.no_object_weight, c.momentum, c.weight_decay) == (5.0, 0.1, 0.9, 5e-4)
    assert (tg.schedule, tg.generator_lr, tg.train.lr, tg.train.batch_size, tg.train.max_steps) == (
        "joint",
        5e-4,
        1e-3,
        12,
        2000,
    )
    assert p.nodes["evaluate"].bindings["model"] == "train_generator" and p.nodes["evaluate"].config.gamma is None
    assert "train_classifier" not in p.nodes  # no MaskCLIP classifier that nothing reads


def test_text_of_another_size_fails_at_plan_time(shared_data, monkeypatch):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.plan import plan
    from stages.catalog import STAGES

    monkeypatch.setenv("ZEROSEG_DATA", str(shared_data))
    cfg = load_config(REPO / "configs/sample_pading.yaml", ["train_generator.model.text_dim=512"])
    with pytest.raises(ConfigError, match=r"train_generator.model.text_dim is 512 but CLIP model 'zeroseg-tiny-vit'"):
        plan(cfg, STAGES)


def test_sequential_schedule_settings_are_checked():
    from stages.train_generator import TrainGeneratorConfig

    clip = {"model": "zeroseg-tiny-vit", "random_init": True}
    train = {"max_steps": 10, "batch_size": 2, "lr": 1e-3}
    assert TrainGeneratorConfig(clip=clip, schedule="sequential", train=train).generator_phase() == 5
    assert TrainGeneratorConfig(clip=clip, train=train).generator_phase() == 10
    with pytest.raises(ValueError, match="leaves no classifier step"):
        TrainGeneratorConfig(clip=clip, schedule="sequential", generator_steps=10, train=train)
    with pytest.raises(ValueError, match="not supported"):
        TrainGeneratorConfig(clip=clip, train={**train, "clip_grad_norm": 0.01})


# ------------------------------------------------------------------ the sample DAG
# build_splits and embed_text come from the session fixture `sample_proposals` (tests/conftest.py);
# pretrain_proposals (class head linear, in process), extract_features, train_generator and
# evaluate run here, in process; the cached re-run is the user's command in a subprocess.
DAG = (
    "build_splits",
    "embed_text",
    "pretrain_proposals",
    "extract_features",
    "train_generator",
    "evaluate",
)


def _artifact(run, stage):
    """``(manifest, directory)`` of ``stage``'s artifact of ``run`` (the copied store also holds the
    session's text-head proposals)."""
    d = run.work / "store" / stage / run.plan.keys()[stage]
    return json.loads((d / "manifest.json").read_text()), d


@pytest.fixture(scope="module")
def pading_run(tmp_path_factory, sample_proposals):
    work = sample_proposals.copy_to(tmp_path_factory.mktemp("pading"))
    r = sample_proposals.run("configs/sample_pading.yaml", work)
    assert r.code == 0, ([n.error for n in r.plan], r.output[-3000:])
    return r


@pytest.mark.slow
def test_sample_dag_extracts_matched_features_trains_the_generator_and_evaluates(pading_run, shared_data):
    from PIL import Image

    from zeroseg.models import load_segmenter

    work = pading_run
    assert {n.name: n.status for n in pading_run.plan} == dict(
        zip(DAG, ["cached", "cached", "ran", "ran", "ran", "ran"], strict=True)
    )
    _, splits = _artifact(work, "build_splits")
    classes = json.loads((splits / "classes.json").read_text())["train"]
    prop_manifest, prop_dir = _artifact(work, "pretrain_proposals")
    assert json.loads((prop_dir / "proposals.json").read_text())["class_head"] == "linear"
    # the feature artifact: every query of every training image, matched queries = one per seen
    # class present in the image's label PNG (16 queries >= segments), read here with PIL
    feat_manifest, feat_dir = _artifact(work, "extract_features")
    doc = json.loads((feat_dir / "features.json").read_text())
    assert doc["proposals_key"] == prop_manifest["key"] and (doc["num_queries"], doc["hidden_dim"]) == (16, 32)
    emb = np.load(feat_dir / "features/embeddings.npy")
    lab = np.load(feat_dir / "features/labels.npy")
    import pyarrow.parquet as pq

    images = pq.read_table(feat_dir / "features/images.parquet").to_pydict()
    manifest = pq.read_table(splits / "manifests/train.parquet").to_pydict()
    assert images["image_id"] == manifest["image_id"] and emb.shape == (len(manifest["image_id"]), 16, 32)
    assert np.isfinite(emb).all() and lab.shape == emb.shape[:2]
    seen = set(classes["seen"])
    for i, rel in enumerate(manifest["label"]):
        present = set(np.unique(np.asarray(Image.open(splits / rel))).tolist()) & seen
        assert sorted(lab[i][lab[i] >= 0].tolist()) == sorted(present), manifest["image_id"][i]
    assert doc["matched"] == int((lab >= 0).sum()) > 0
    # the segmenter: the proposals' weights unchanged, the new head over all 80 training classes
    tg_manifest, tg_dir = _artifact(work, "train_generator")
    seg = load_segmenter(tg_dir)
    assert type(seg).__name__ == "PADing" and seg.head.weight.shape == (len(classes["names"]) + 1, 32)
    proposal_weights = torch.load(prop_dir / "weights.pt", weights_only=True)
    assert all(torch.equal(seg.proposals.state_dict()[k], v) for k, v in proposal_weights.items())
    assert (tg_dir / "generator.pt").is_file() and tg_manifest["metrics"]["steps"] == 4
    ev_manifest, _ = _artifact(work, "evaluate")
    assert all(f"{s}/pAcc" in ev_manifest["metrics"] for s in ("val", "camvid"))
    # ---- value checks (glue; tests/test_glue_reference.py): every metric from its matrix, the
    # pixel counts from the label PNGs, and each matrix equal to a per-image reference forward of
    # the saved PADing segmenter (the retrained head), gamma 0 (PADing applies no calibration)
    from test_glue_reference import check_sample_evaluate

    ref = check_sample_evaluate(pading_run.work, pading_run.plan, shared_data, {"": "train_generator"}, {"": 0.0})
    assert set(ref) == {"val", "camvid"}


@pytest.mark.slow
def test_sample_dag_second_run_is_fully_cached(pading_run, sample_proposals_overrides, shared_data):
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "pipeline/run.py",
        "--config",
        "configs/sample_pading.yaml",
        "--work-dir",
        str(pading_run.work),
    ]
    for o in sample_proposals_overrides:
        cmd += ["--set", o]
    env = {**os.environ, "ZEROSEG_DATA": str(shared_data)}
    env.pop("RAY_ADDRESS", None)
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert again.stdout.count(" cached (") == len(DAG) and "running" not in again.stdout and "ray:" not in again.stdout


def _ctx(work, tmp_path, **swap):
    """train_generator's context on the sample run's artifacts, with some inputs swapped."""
    from pipeline.config import load_config
    from pipeline.dag import Artifact
    from pipeline.plan import plan
    from stages.catalog import STAGES

    p = plan(load_config(REPO / "configs/sample_pading.yaml"), STAGES, store=EverythingCached())
    roles = {
        "splits": "build_splits",
        "text": "embed_text",
        "features": "extract_features",
        "proposals": "pretrain_proposals",
    }
    inputs = {}
    for role, stage in roles.items():
        manifest, d = _artifact(work, stage)
        inputs[role] = Artifact(stage, manifest["key"], d, str(d), manifest)
    inputs.update(swap)
    return types.SimpleNamespace(
        config=p.nodes["train_generator"].config, inputs=inputs, log=lambda s: None, output_dir=str(tmp_path / "out")
    )


@pytest.mark.slow
def test_bad_inputs_are_refused_before_training_naming_the_artifact(pading_run, tmp_path):
    import shutil

    from pipeline.dag import Artifact
    from stages.train_generator import TrainGenerator
    from zeroseg.errors import DataError

    work = pading_run
    stage = TrainGenerator()
    # a feature artifact of another backbone: its proposals key differs from the bound proposals'
    pm, pd = _artifact(work, "pretrain_proposals")
    other = Artifact("pretrain_proposals", "ab" * 32, pd, str(pd), pm)
    with pytest.raises(DataError, match=r"feature artifact extract_features/\w{12} was extracted with proposals"):
        stage.run(_ctx(work, tmp_path, proposals=other))
    # an empty real-feature set
    fm, fd = _artifact(work, "extract_features")
    empty = tmp_path / "features"
    shutil.copytree(fd, empty)
    doc = json.loads((empty / "features.json").read_text())
    (empty / "features.json").write_text(json.dumps({**doc, "matched": 0}))
    with pytest.raises(DataError, match=r"feature artifact extract_features/\w{12} has no matched seen feature"):
        stage.run(_ctx(work, tmp_path, features=Artifact("extract_features", fm["key"], empty, str(empty), fm)))
    # an unseen class without an embedding (a zero row)
    tm, td = _artifact(work, "embed_text")
    text = tmp_path / "text"
    shutil.copytree(td, text)
    classes = json.loads((_artifact(work, "build_splits")[1] / "classes.json").read_text())["train"]
    emb = np.load(text / "embeddings/train.npy")
    emb[classes["unseen"][0]] = 0
    np.save(text / "embeddings/train.npy", emb)
    name = classes["names"][classes["unseen"][0]]
    with pytest.raises(
        DataError, match=rf"text artifact embed_text/\w{{12}}: unseen classes \['{name}'\] have no embedding"
    ):
        stage.run(_ctx(work, tmp_path, text=Artifact("embed_text", tm["key"], text, str(text), tm)))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sequential_schedule_trains_the_classifier_alone_after_the_generator(pading_run, sample_proposals):
    """Algorithm 1: 2 generator steps, then 2 classifier steps (the joint run logs both in its last
    logging interval, steps 3-4; the sequential run only the classifier's)."""
    joint = _artifact(pading_run, "train_generator")[0]["metrics"]
    assert "final_gen_mmd" in joint and "final_cls_loss" in joint and joint["generator_steps"] == 4
    r = sample_proposals.run(
        "configs/sample_pading.yaml",
        pading_run.work,
        "--stages",
        "train_generator",
        overrides=["train_generator.schedule=sequential", "train_generator.generator_steps=2"],
    )
    assert r.code == 0 and r.plan.nodes["train_generator"].status == "ran"
    seq = _artifact(r, "train_generator")[0]["metrics"]
    assert seq["generator_steps"] == 2 and seq["steps"] == 4
    assert "final_cls_loss" in seq and not any(k.startswith("final_gen_") for k in seq)
