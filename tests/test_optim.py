"""``zeroseg.optim``: the groups and schedules of every recipe, against values computed by hand
from the formulas in its docstrings (detectron2's WarmupPolyLR, mmcv's poly with min_lr and linear
warm-up)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zeroseg.optim import (
    deop_optimizer,
    deop_param_groups,
    maskformer_optimizer,
    maskformer_param_groups,
    pading_optimizers,
    poly_lr_factor,
    zegclip_lr_factor,
    zegclip_optimizer,
    zegclip_param_groups,
)


def lrs_at(opt, sched, steps):
    """``{step: [lr of each group]}`` after stepping the schedule ``step`` times (steps ascending)."""
    out, done = {}, 0
    for s in steps:
        while done < s:
            opt.step()
            sched.step()
            done += 1
        out[s] = [g["lr"] for g in opt.param_groups]
    return out


def test_poly_lr_factor_by_hand():
    # (1 - s / T) ** p, no warm-up
    assert poly_lr_factor(0, 10) == 1.0
    assert poly_lr_factor(5, 10, power=0.9) == pytest.approx(0.5358867312681466)  # 0.5 ** 0.9
    assert poly_lr_factor(10, 10) == 0.0 and poly_lr_factor(12, 10) == 0.0
    # warm-up: w = f (1 - a) + a with a = s / W; s = 2, W = 4, f = 0.1: 0.55 * 0.8 ** 0.9
    assert poly_lr_factor(2, 10, 0.9, warmup_steps=4, warmup_factor=0.1) == pytest.approx(0.4499286803279722)
    assert poly_lr_factor(4, 10, 0.9, warmup_steps=4, warmup_factor=0.1) == pytest.approx(0.6**0.9)


def test_zegclip_lr_factor_by_hand():
    # released: base 2e-4 (2e-5 x lr_mult 10), min_lr 1e-6, 20k steps, power 0.9, 1500 warm-up from 1e-6
    kw = dict(max_steps=20000, base_lr=2e-4, min_lr=1e-6, power=0.9, warmup_steps=1500, warmup_ratio=1e-6)
    lr = {s: 2e-4 * zegclip_lr_factor(s, **kw) for s in (0, 750, 1500, 10000, 20000, 25000)}
    assert lr[0] == pytest.approx(2e-10)  # poly 2e-4 x warm 1e-6
    assert lr[750] == pytest.approx(9.663558682930389e-05)  # (1.99e-4 x 0.9625 ** 0.9 + 1e-6) x 0.5000005
    assert lr[1500] == pytest.approx(1.8651568568136043e-04)  # warm-up over: 1.99e-4 x 0.925 ** 0.9 + 1e-6
    assert lr[10000] == pytest.approx(1.0764145952236117e-04)  # 1.99e-4 x 0.5 ** 0.9 + 1e-6
    assert lr[20000] == pytest.approx(1e-6) and lr[25000] == pytest.approx(1e-6)  # min_lr, clamped


class ToyZegCLIP(nn.Module):
    """The names ZegCLIP's rule reads: a frozen ``encoder.visual``, a head with a norm layer."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.visual = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)
        self.norm1 = nn.LayerNorm(2)
        self.proj = nn.Linear(2, 2)

    def trainable_names(self):
        return [k for k in self.state_dict() if not k.startswith("encoder.visual.")]


def test_zegclip_groups_and_schedule():
    seg = ToyZegCLIP()
    groups = zegclip_param_groups(seg, 0.01, lr=0.5)
    assert [len(g["params"]) for g in groups] == [4, 2]  # head + proj weights/biases; norm1's two
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and [g["lr"] for g in groups] == [0.5, 0.5]
    assert groups[0]["params"][0] is seg.head.weight and groups[1]["params"][0] is seg.norm1.weight
    # base lr 1e-3 x head_lr_mult 10, 10 steps, min_lr 1e-4, power 1, 4 warm-up steps from 0.1
    opt, sched = zegclip_optimizer(
        seg, 1e-3, head_lr_mult=10.0, weight_decay=0.01, max_steps=10, min_lr=1e-4, power=1.0,
        warmup_steps=4, warmup_ratio=0.1,
    )  # fmt: skip
    got = lrs_at(opt, sched, [0, 2, 4, 5, 10])
    # poly(s) = (1e-2 - 1e-4) (1 - s / 10) + 1e-4; warm(s) = 1 - (1 - s / 4) 0.9
    assert got[0] == pytest.approx([1e-2 * 0.1] * 2)
    assert got[2] == pytest.approx([(9.9e-3 * 0.8 + 1e-4) * 0.55] * 2)
    assert got[4] == pytest.approx([9.9e-3 * 0.6 + 1e-4] * 2)
    assert got[5] == pytest.approx([9.9e-3 * 0.5 + 1e-4] * 2)
    assert got[10] == pytest.approx([1e-4] * 2)
    assert opt.defaults["weight_decay"] == 0.01


class ToyDeOP(nn.Module):
    def __init__(self):
        super().__init__()
        self.clip = nn.Linear(2, 2)
        self.decoder = nn.Linear(2, 2)
        self.ln = nn.LayerNorm(2)
        self.emb = nn.Embedding(3, 2)

    def learned_names(self):
        return [k for k in self.state_dict() if not k.startswith("clip.")]


def test_deop_groups_and_schedule():
    seg = ToyDeOP()
    groups = deop_param_groups(seg, 1e-4, lr=2e-4)
    assert [len(g["params"]) for g in groups] == [2, 3]  # decoder; ln weight/bias + the embedding
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0] and all(g["lr"] == 2e-4 for g in groups)
    opt, sched = deop_optimizer(seg, 2e-4, weight_decay=1e-4, max_steps=100, power=0.9)
    got = lrs_at(opt, sched, [0, 50, 100])
    assert got[0] == pytest.approx([2e-4, 2e-4])
    assert got[50] == pytest.approx([2e-4 * 0.5358867312681466] * 2)  # 2e-4 x 0.5 ** 0.9
    assert got[100] == [0.0, 0.0]


class ToyMaskFormer(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
        self.backbone.RANDOM_INIT = ("2",)
        self.backbone.add_module("2", nn.Linear(2, 2))
        self.head = nn.Linear(2, 2)
        self.query = nn.Embedding(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_maskformer_groups_and_schedule():
    model = ToyMaskFormer()
    groups = maskformer_param_groups(model, 1e-4, backbone_lr_mult=0.1, weight_decay=1e-4, weight_decay_norm=0.0)
    # first appearance: backbone conv (lr x 0.1, decay), backbone BN (x 0.1, no decay), the backbone's
    # RANDOM_INIT layer (full lr, decay: with the head), the query embedding (full lr, no decay)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (pytest.approx(1e-5), 1e-4, 2),
        (pytest.approx(1e-5), 0.0, 2),
        (1e-4, 1e-4, 4),
        (1e-4, 0.0, 1),
    ]
    assert groups[2]["params"][0] is model.backbone[2].weight and groups[2]["params"][2] is model.head.weight
    opt, sched = maskformer_optimizer(
        model, 1e-4, backbone_lr_mult=0.1, weight_decay=1e-4, weight_decay_norm=0.0, max_steps=10, power=0.9,
        warmup_steps=4, warmup_factor=0.1,
    )  # fmt: skip
    got = lrs_at(opt, sched, [0, 2, 10])
    assert got[0] == pytest.approx([1e-6, 1e-6, 1e-5, 1e-5])  # warm-up factor 0.1 at step 0
    assert got[2] == pytest.approx([g * 0.4499286803279722 for g in (1e-5, 1e-5, 1e-4, 1e-4)])  # 0.55 x 0.8 ** 0.9
    assert got[10] == [0.0] * 4


def test_pading_optimizers():
    gen, head = nn.Linear(2, 2), nn.Linear(2, 3)
    gen_opt, sched, head_opt = pading_optimizers(
        list(gen.parameters()), head.parameters(), 1e-3, generator_lr=5e-4, generator_steps=100, power=0.9,
        warmup_steps=10, warmup_factor=0.1,  momentum=0.9, weight_decay=5e-4,
    )  # fmt: skip
    assert isinstance(gen_opt, torch.optim.Adam) and isinstance(head_opt, torch.optim.SGD)
    assert head_opt.param_groups[0]["lr"] == 1e-3 and head_opt.param_groups[0]["momentum"] == 0.9
    assert head_opt.param_groups[0]["weight_decay"] == 5e-4
    got = lrs_at(gen_opt, sched, [0, 5, 100])
    assert got[0] == pytest.approx([5e-5])  # 5e-4 x warm-up factor 0.1
    assert got[5] == pytest.approx([5.251869598918248e-04 / 2])  # 5e-4 x (0.1 x 0.5 + 0.5) x 0.95 ** 0.9
    assert got[100] == [0.0]
