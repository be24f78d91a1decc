"""DeOP (zeroseg/models/deop/, stages/methods/deop.py) on the tiny random-weight CLIP.

Every expected value comes from outside the code under test: open_clip's own forward, a copy of a
block with the query weights zeroed (uniform attention), hand computation on tiny tensors, or the
pipeline's own plan."""

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from zeroseg.config import validated
from zeroseg.config.deop import DeOPConfig
from zeroseg.errors import ConfigError, DataError
from zeroseg.models.clip import TINY_MODEL, ClipSpec, get_tokenizer, load_clip
from zeroseg.models.deop import (
    TextPrompt,
    check_proposals_fit,
    deop_pixel_loss,
    deop_semantic_scores,
    heatmap_pool,
    mask_guided_attention,
    proposal_patch_weights,
    proposal_token_masks,
    severance_hook,
)
from zeroseg.models.maskformer import poly_lr_factor
from zeroseg.models.position import sine_position_encoding
from zeroseg.models.trunk import forward_trunk, project, standard_attention

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip(ClipSpec(model=TINY_MODEL, random_init=True))


def pixels(b, h, w, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def cfg(**kw) -> DeOPConfig:
    return validated(DeOPConfig, kw, "model")


# ============================================================================ patch severance


def test_alpha_zero_leaves_the_encoder_unchanged(tiny):
    """Eq. 2 with alpha = 0 is the plain self-attention: the trunk's output equals the unhooked
    forward on every block, and the [CLS] embedding equals open_clip's encode_image."""
    v = tiny.visual
    x = pixels(2, 224, 224)
    n = len(v.transformer.resblocks)
    hook = severance_hook(cfg(severance="alpha", alpha=0.0), None)
    with torch.no_grad():
        plain = forward_trunk(v, x)
        hooked = forward_trunk(v, x, attention={i: hook for i in range(n)})
        torch.testing.assert_close(hooked.tokens, plain.tokens, rtol=0, atol=0)
        torch.testing.assert_close(project(v, hooked.tokens[:, 0]), tiny.encode_image(x), **TOL)


def _perturb_patch(x, row, col, p=16):
    y = x.clone()
    y[:, :, row * p : (row + 1) * p, col * p : (col + 1) * p] += 3.0
    return y


@pytest.mark.parametrize("h,w", [(64, 96), (224, 224)])
def test_identity_severance_makes_every_patch_independent(tiny, h, w):
    """Identity severance on every block: perturbing one patch's pixels changes that patch's
    output and no other token's (not even [CLS]); without severance every patch changes."""
    v = tiny.visual
    n = len(v.transformer.resblocks)
    hook = severance_hook(cfg(severance="identity"), None)
    x = pixels(1, h, w, seed=3)
    gh, gw = h // 16, w // 16
    r, c = gh // 2, gw - 1
    k = 1 + r * gw + c  # token index of the perturbed patch
    y = _perturb_patch(x, r, c)
    with torch.no_grad():
        a = forward_trunk(v, x, attention={i: hook for i in range(n)}).tokens
        b = forward_trunk(v, y, attention={i: hook for i in range(n)}).tokens
        others = [i for i in range(a.shape[1]) if i != k]
        torch.testing.assert_close(b[:, others], a[:, others], rtol=0, atol=0)
        assert (b[:, k] - a[:, k]).abs().max() > 1e-3
        # the same perturbation through the unsevered encoder reaches every token
        pa, pb = forward_trunk(v, x).tokens, forward_trunk(v, y).tokens
        assert bool(((pb - pa).abs().amax(-1) > 1e-6).all())


def test_partial_severance_by_hand():
    """Eq. 2 with alpha = 0.5 on one 1-head block whose projections are identities and two tokens
    e1, e2 (width 2): Q = K = V = I, so Attn = softmax(I / sqrt 2) row-wise = [[p, 1-p], [1-p, p]]
    with p = sigmoid(1 / sqrt 2) = 0.66976, and F_out = (0.5 I + 0.5 Attn) V
    = [[0.83488, 0.16512], [0.16512, 0.83488]] (worked by hand)."""
    attn = torch.nn.MultiheadAttention(2, 1)
    with torch.no_grad():
        attn.in_proj_weight.copy_(torch.cat([torch.eye(2)] * 3))
        attn.in_proj_bias.zero_()
        attn.out_proj.weight.copy_(torch.eye(2))
        attn.out_proj.bias.zero_()
    block = torch.nn.Module()
    block.attn = attn
    hook = severance_hook(cfg(severance="alpha", alpha=0.5), None)
    with torch.no_grad():
        out = hook(block, torch.eye(2).unsqueeze(0))
    expected = torch.tensor([[[0.83488, 0.16512], [0.16512, 0.83488]]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_mask_weighted_severance_with_unit_weights_is_identity(tiny):
    """The released mask-weighted GPS scales each value by sum_n sigmoid(m_n) ([CLS]: Q). With one
    proposal whose sigmoid is 1 everywhere every weight is 1: identity severance exactly. With two
    proposals at logit 0 (0.5 + 0.5 = 1 per patch, [CLS] weight 2) on the last block only, the
    patch outputs still equal identity severance's (identity attention: [CLS] does not reach them)
    while [CLS] differs."""
    v = tiny.visual
    x = pixels(2, 64, 64, seed=5)
    ident = severance_hook(cfg(severance="identity"), None)
    one = torch.full((2, 1, 16, 16), 60.0)  # sigmoid(60) == 1.0 in float32
    two = torch.zeros(2, 2, 16, 16)
    with torch.no_grad():
        ref_all = forward_trunk(v, x, attention={0: ident, 1: ident}).tokens
        got_all = forward_trunk(v, x, attention={i: severance_hook(cfg(), one) for i in (0, 1)}).tokens
        torch.testing.assert_close(got_all, ref_all, **TOL)
        ref_last = forward_trunk(v, x, attention={-1: ident}).tokens
        got_last = forward_trunk(v, x, attention={-1: severance_hook(cfg(), two)}).tokens
        torch.testing.assert_close(got_last[:, 1:], ref_last[:, 1:], **TOL)
        assert (got_last[:, 0] - ref_last[:, 0]).abs().max() > 1e-4


def test_proposal_weights_by_hand():
    """Mask logits on a 2x2 grid (no resize): weights = [Q, sum_n sigmoid(m_n[p])] per token."""
    s = math.log(3.0)  # sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4, sigmoid(0) = 1/2
    m = torch.tensor([[[[s, -s], [0.0, 0.0]], [[0.0, s], [-s, s]]]])  # [1, 2, 2, 2]
    w = proposal_patch_weights(m, (2, 2))
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.75 + 0.5, 0.25 + 0.75, 0.5 + 0.25, 0.5 + 0.75]]))
    t = proposal_token_masks(m, (2, 2))
    torch.testing.assert_close(t, torch.tensor([[[1.0, 0.75, 0.25, 0.5, 0.5], [1.0, 0.5, 0.75, 0.25, 0.75]]]))


def test_mask_guided_severance_with_full_masks_is_uniform_attention(tiny):
    """Eq. 1 with every mask 1 on every token gives equal logits, so a uniform softmax: the same as
    the block's own attention with its query weights zeroed (an independent uniform attention)."""
    blk = tiny.visual.transformer.resblocks[-1]
    uniform = copy.deepcopy(blk)
    e = uniform.attn.embed_dim
    with torch.no_grad():
        uniform.attn.in_proj_weight[:e].zero_()
        uniform.attn.in_proj_bias[:e].zero_()
    y = torch.randn(2, 1 + 4 * 4, e, generator=torch.Generator().manual_seed(2))
    from zeroseg.models.trunk import BlockContext

    ctx = BlockContext(1, 2, 0, (4, 4))
    with torch.no_grad():
        got = mask_guided_attention(torch.ones(2, 3, 17))(blk, y, ctx)
        want = standard_attention(uniform, y)
    torch.testing.assert_close(got, want, **TOL)


# ============================================================================ heatmap pooling


def test_heatmap_pooling_by_hand():
    """Two heads of one channel each (d = 1, scale 1). Head 0: q = 1, keys 0 and ln 3 ->
    softmax [1/4, 3/4]; head 1: q = 0 -> [1/2, 1/2]. Masks [1, 1/2]. Each head pools its own
    channel of the features [[2, 4], [6, 8]]:
    channel 0 = 1/4 * 2 + 3/4 * 1/2 * 6 = 2.75; channel 1 = 1/2 * 4 + 1/2 * 1/2 * 8 = 4."""
    q = torch.tensor([[[1.0, 0.0]]])  # [B=1, Q=1, C=2]
    k = torch.tensor([[[0.0, 5.0], [math.log(3.0), -7.0]]])  # [1, N=2, 2]; head 1's keys do not matter (q=0)
    f = torch.tensor([[[2.0, 4.0], [6.0, 8.0]]])
    masks = torch.tensor([[[1.0, 0.5]]])
    out = heatmap_pool(q, k, f, masks, heads=2)
    torch.testing.assert_close(out, torch.tensor([[[2.75, 4.0]]]))
    # one head over both channels: scale 1/sqrt(2), logits [0, ln3/sqrt2], shared weights
    w0 = 1 / (1 + math.exp(math.log(3.0) / math.sqrt(2)))
    w = torch.tensor([w0, 1 - w0]) * torch.tensor([1.0, 0.5])
    torch.testing.assert_close(heatmap_pool(q, k, f, masks, heads=1), (w @ f[0]).view(1, 1, 2))


def test_heatmap_pooling_refuses_bad_shapes():
    with pytest.raises(ValueError, match="masks"):
        heatmap_pool(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), torch.zeros(1, 2, 2), heads=2)


def test_sine_position_encoding_by_hand():
    """4 channels: per axis 2 features with dim_t = [1, 1]: [sin, cos] of the position scaled to
    (0, 2 pi]; y first. Grid 1 x 2: y = 2 pi; x = pi, 2 pi."""
    pe = sine_position_encoding(1, 2, 4)
    two_pi = 2 * math.pi / (1 + 1e-6)
    x1, x2 = 1 / (2 + 1e-6) * 2 * math.pi, 2 / (2 + 1e-6) * 2 * math.pi
    want = torch.tensor(
        [
            [math.sin(two_pi), math.cos(two_pi), math.sin(x1), math.cos(x1)],
            [math.sin(two_pi), math.cos(two_pi), math.sin(x2), math.cos(x2)],
        ]
    )
    torch.testing.assert_close(pe, want, **TOL)


# ============================================================================ loss


def test_loss_by_hand_on_a_2x2_example():
    """C = 1 class + no-object, Q = 2 proposals, a 2x2 label [[0, 255], [0, 0]] (255 -> no-object).

    Proposal 1: mask sigmoid 1/2 everywhere, class probs [3/4, 1/4]; proposal 2: mask sigmoid 3/4
    at (0,0) and 1/4 elsewhere, class probs [1/2, 1/2]. So S (class, no-object) =
    (0.75, 0.5) at (0,0) and (0.5, 0.25) elsewhere; S' = sigmoid(3 S - 3)."""
    s = math.log(3.0)
    class_logits = torch.tensor([[[s, 0.0], [0.0, 0.0]]])
    mask_logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[s, -s], [-s, -s]]]])
    target = torch.tensor([[[0, 255], [0, 0]]])

    def sig(z):
        return 1 / (1 + math.exp(-z))

    sp = {  # pixel -> (class channel, no-object channel) after sigmoid(3S - 3)
        (0, 0): (sig(3 * 0.75 - 3), sig(3 * 0.5 - 3)),
        (0, 1): (sig(3 * 0.5 - 3), sig(3 * 0.25 - 3)),
        (1, 0): (sig(3 * 0.5 - 3), sig(3 * 0.25 - 3)),
        (1, 1): (sig(3 * 0.5 - 3), sig(3 * 0.25 - 3)),
    }
    onehot = {(0, 0): (1, 0), (0, 1): (0, 1), (1, 0): (1, 0), (1, 1): (1, 0)}

    def focal(p, y):
        pt = p if y else 1 - p
        a = 0.25 if y else 0.75
        return -a * (1 - pt) ** 2 * math.log(min(max(pt, 1e-4), 1 - 1e-4))

    want_focal = sum(focal(sp[k][c], onehot[k][c]) for k in sp for c in (0, 1)) / 8
    inter = sum(sp[k][0] * onehot[k][0] for k in sp)
    want_dice = 1 - (2 * inter + 1) / (sum(sp[k][0] for k in sp) + 3 + 1)
    out = deop_pixel_loss(class_logits, mask_logits, target)
    assert float(out["focal"]) == pytest.approx(want_focal, rel=1e-5)
    assert float(out["dice"]) == pytest.approx(want_dice, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(2.0 * want_focal + 0.8 * want_dice, rel=1e-5)
    with pytest.raises(ValueError, match=r"class ids \[1\] outside 0..0"):
        deop_pixel_loss(class_logits, mask_logits, torch.tensor([[[0, 1], [0, 0]]]))


def test_inference_upsamples_the_mask_logits_before_the_sigmoid_by_hand():
    """Released order (released-code.md 2.6): bilinear upsampling of the mask *logits* to the input
    size, then sigmoid, then the einsum. One proposal, mask logits [0, 4] on a 1x2 grid -> 1x4:
    align_corners=False samples x = -0.25, 0.25, 0.75, 1.25 (clamped), so the logits are
    [0, 1, 3, 4]; class probs softmax([ln 2, 0, 0]) = [1/2, 1/4, 1/4] (last = no-object, dropped).
    Upsampling sigmoid(m) instead would give 3/4 * 1/2 + 1/4 * sigmoid(4) at x = 1, not sigmoid(1)."""

    def sig(z):
        return 1 / (1 + math.exp(-z))

    class_logits = torch.tensor([[[math.log(2.0), 0.0, 0.0]]])
    mask_logits = torch.tensor([[[[0.0, 4.0]]]])
    got = deop_semantic_scores(class_logits, mask_logits, (1, 4))
    up = [sig(0.0), sig(1.0), sig(3.0), sig(4.0)]
    want = torch.tensor([[[[0.5 * u for u in up]], [[0.25 * u for u in up]]]])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    other_order = 0.5 * (0.75 * sig(0.0) + 0.25 * sig(4.0))  # sigmoid first, then upsampling
    assert abs(float(got[0, 0, 0, 1]) - other_order) > 0.05


def test_poly_schedule_by_hand():
    assert poly_lr_factor(0, 100) == 1.0
    assert poly_lr_factor(50, 100, power=0.9) == pytest.approx(0.5**0.9)
    assert poly_lr_factor(100, 100) == 0.0 and poly_lr_factor(150, 100) == 0.0


# ============================================================================ text prompts


def test_text_prompt_without_context_is_clips_own_sentence_embedding(tiny):
    """No learned tokens: [SOS] name . [EOS] through the text tower equals open_clip's
    encode_text of "name." (normalised)."""
    names = ["cat", "dining table", "traffic light"]
    got = TextPrompt(tiny, 0)(tiny, names)
    tok = get_tokenizer(ClipSpec(model=TINY_MODEL, random_init=True))
    with torch.no_grad():
        want = F.normalize(tiny.encode_text(tok([f"{n}." for n in names])), dim=-1)
    torch.testing.assert_close(got, want, **TOL)


def test_text_prompt_context_trains_and_is_placed_after_sos(tiny):
    """With n context vectors set to the token embeddings of "a photo of a", the learnable prompt
    gives open_clip's embedding of "a photo of a <name>."; the context gets gradients."""
    tok = get_tokenizer(ClipSpec(model=TINY_MODEL, random_init=True))
    words = tok(["a photo of a"])[0]
    ids = words[1 : int((words != 0).sum()) - 1]  # between [SOS] and [EOS]
    tp = TextPrompt(tiny, len(ids))
    with torch.no_grad():
        tp.ctx.copy_(tiny.token_embedding(ids))
    got = tp(tiny, ["dog", "sky"])
    with torch.no_grad():
        want = F.normalize(tiny.encode_text(tok(["a photo of a dog.", "a photo of a sky."])), dim=-1)
    torch.testing.assert_close(got, want, **TOL)
    got.sum().backward()
    assert tp.ctx.grad is not None and tp.ctx.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)


# ============================================================================ the model


@pytest.fixture(scope="module")
def proposal_model():
    from zeroseg.models.maskformer import MaskFormer

    cfg = dict(backbone="resnet18", num_queries=6, hidden_dim=32, dec_layers=2, nheads=2, dim_feedforward=64)
    torch.manual_seed(0)
    return MaskFormer({**cfg, "conv_dim": 32, "mask_dim": 32, "class_head": "text"}, 3, text_dim=64)


def _deop(tiny, pm, **kw):
    from zeroseg.models.deop import DeOP

    doc = {
        **_doc(q=pm.num_queries, text_dim=64),
        "model": pm.cfg.model_dump(mode="json"),
        "input": {"size": [64, 64], "mean": list(pm.mean), "std": list(pm.std)},
    }
    base = dict(width=64, heads=2, ffn=64, input_size=[64, 64], size_divisibility=32, visual_prompt_layers=[0, 1])
    seg = DeOP(tiny, {**base, "text_prompt_tokens": 4, **kw, "proposals": doc})
    seg.load_proposal_weights(pm.state_dict())
    return seg


@pytest.mark.parametrize(
    "kw",
    [{}, {"decoder": "conv"}, {"mask_guided": True}, {"severance": "alpha", "alpha": 0.5, "severance_layers": [0, 1]}],
)
def test_deop_trains_only_its_own_tensors_and_scores_as_maskformer(tiny, proposal_model, kw):
    """One loss step: gradients reach the learned tensors (decoder, no-object, visual prompts, text
    context) and nothing of CLIP or the proposals, which stay in eval mode; bf16 autocast leaves
    the logits and the loss in float32; the scores are MaskFormer's semantic inference
    (zeroseg.models.maskformer.semantic_scores: softmax without no-object, sigmoid masks, einsum) of
    the segment logits and the proposals' mask logits upsampled to the input size."""
    from zeroseg.models.maskformer import semantic_scores

    seg = _deop(tiny, proposal_model, **kw)
    seg.train()
    assert not seg.clip.training and not seg.proposals.training
    x = pixels(2, 64, 96, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = seg.loss(x, torch.tensor([0, 1, 255]).repeat(2, 64, 32), ["cat", "dog", "car"])
    assert all(v.dtype == torch.float32 for v in out.values())
    out["loss"].backward()
    learned = set(seg.learned_names())
    assert {n.split(".")[0] for n in learned} == {"decoder", "no_object", "visual_prompts", "text_prompt"}
    grads = {n: p.grad for n, p in seg.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith(("clip.", "proposals.")))
    for n in ("no_object", "visual_prompts", "text_prompt.ctx"):
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
    seg.eval()
    text = seg.encode_text(["cat", "dog"])
    with torch.no_grad():
        logits, masks = seg.segment(x, text)
        scores = seg(x, text)
    assert logits.shape == (2, 6, 3) and masks.shape == (2, 6, 16, 24)
    # released order: mask logits upsampled to the input size before the sigmoid
    up = F.interpolate(masks, size=(64, 96), mode="bilinear", align_corners=False)
    assert scores.shape == (2, 2, 64, 96)
    torch.testing.assert_close(scores, semantic_scores(logits, up), **TOL)
    seg.zero_grad(set_to_none=True)
    tiny.zero_grad(set_to_none=True)


def test_deop_refuses_images_off_the_divisibility_and_a_wrong_width(tiny, proposal_model):
    seg = _deop(tiny, proposal_model)
    with pytest.raises(ValueError, match=r"multiple of 32"):
        seg(pixels(1, 48, 64), seg.encode_text(["a"]))
    with pytest.raises(ConfigError, match=r"model.width 32 must equal the CLIP embedding size 64"):
        _deop(tiny, proposal_model, width=32)
    with pytest.raises(ConfigError, match=r"visual_prompt_layers \[2\] outside 0..1"):
        _deop(tiny, proposal_model, visual_prompt_layers=[0, 2])


# ============================================================================ values against a reference


def _bilinear_ref(m, h, w):
    """torch's bilinear resize (align_corners=False) in plain loops: source (i + .5) * in / out - .5,
    clamped at 0, the upper neighbour clamped to the last row / column. ``m``: [..., hi, wi]."""
    import numpy as np

    m = np.asarray(m, dtype=np.float64)
    hi, wi = m.shape[-2:]

    def src(i, n_in, n_out):
        s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(s))
        return i0, min(i0 + 1, n_in - 1), s - i0

    out = np.zeros(m.shape[:-2] + (h, w))
    for i in range(h):
        y0, y1, ly = src(i, hi, h)
        for j in range(w):
            x0, x1, lx = src(j, wi, w)
            out[..., i, j] = (1 - ly) * ((1 - lx) * m[..., y0, x0] + lx * m[..., y0, x1]) + ly * (
                (1 - lx) * m[..., y1, x0] + lx * m[..., y1, x1]
            )
    return out


def _sigmoid_np(x):
    import numpy as np

    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


@pytest.mark.parametrize("size,grid", [((5, 7), (3, 2)), ((7, 3), (2, 5)), ((6, 6), (4, 4))])
def test_severance_masks_resize_the_logits_then_sigmoid_off_the_grid_size(size, grid):
    """Masks of a size unlike the patch grid (non-square, not a multiple): the released GPS weights
    and MPS token masks are sigmoid(bilinear(logits)) (released-code.md 2.2), which differs from
    bilinear(sigmoid(logits)) by more than the tolerance on these inputs."""
    import numpy as np

    g = torch.Generator().manual_seed(sum(size) + grid[0])
    m = 3 * torch.randn(2, 3, *size, generator=g)
    want = _sigmoid_np(_bilinear_ref(m.numpy(), *grid))  # [2, 3, h, w]
    other = _bilinear_ref(_sigmoid_np(m.numpy()), *grid)
    assert np.abs(want - other).max() > 1e-2  # the order shows on these inputs
    w = proposal_patch_weights(m, grid)
    assert w.shape == (2, 1 + grid[0] * grid[1])
    torch.testing.assert_close(w[:, 0], torch.full((2,), 3.0))  # [CLS]: Q
    np.testing.assert_allclose(w[:, 1:].numpy(), want.sum(1).reshape(2, -1), rtol=1e-5, atol=1e-6)
    t = proposal_token_masks(m, grid)
    assert t.shape == (2, 3, 1 + grid[0] * grid[1])
    torch.testing.assert_close(t[:, :, 0], torch.ones(2, 3))
    np.testing.assert_allclose(t[:, :, 1:].numpy(), want.reshape(2, 3, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(5, 7), (3, 10)])
def test_semantic_scores_against_a_reference_off_the_grid_size(size):
    """deop_semantic_scores on non-square masks upsampled to a non-multiple size: einsum of
    softmax(class logits) without the no-object column and sigmoid(bilinear(mask logits))
    (released-code.md 2.6), recomputed with plain loops."""
    import numpy as np

    g = torch.Generator().manual_seed(size[1])
    cl = 2 * torch.randn(2, 3, 4, generator=g)  # B 2, Q 3, C 3 + no-object
    ml = 3 * torch.randn(2, 3, 2, 3, generator=g)
    got = deop_semantic_scores(cl, ml, size)
    p = np.exp(cl.double().numpy())
    p = p / p.sum(-1, keepdims=True)
    m = _sigmoid_np(_bilinear_ref(ml.numpy(), *size))  # [2, 3, H, W]
    want = np.zeros((2, 3, *size))
    for b in range(2):
        for c in range(3):
            for q in range(3):
                want[b, c] += p[b, q, c] * m[b, q]
    assert got.shape == (2, 3, *size) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [{}, {"focal_weight": 1.5, "dice_weight": 0.3, "focal_alpha": 0.6, "focal_gamma": 1.0, "output_sig": 2.0}],
)
def test_loss_against_a_reference_on_two_images_off_the_grid_size(kw):
    """deop_pixel_loss (released criterion_decoder.loss_labels_bce, released-code.md 2.4) on 2
    images, 4 proposals, 3 classes, mask logits 3 x 2 upsampled to a 5 x 7 label with ignored
    pixels, recomputed with plain loops: S = sum_n sigmoid(up(m_n)) softmax(l_n) over C + 1
    channels, S' = sigmoid(k S - k), ignore -> the no-object channel, focal mean over every element,
    dice per image over the class channels, mean over the images; defaults 2.0 / 0.8 / 0.25 / 2 / 3."""
    import numpy as np

    g = torch.Generator().manual_seed(4)
    cl = 2 * torch.randn(2, 4, 4, generator=g)
    ml = 3 * torch.randn(2, 4, 3, 2, generator=g)
    target = torch.randint(0, 3, (2, 5, 7), generator=g)
    target[0, 0, :3] = 255
    target[1, 4, 4:] = 255
    a = {"focal_weight": 2.0, "dice_weight": 0.8, "focal_alpha": 0.25, "focal_gamma": 2.0, "output_sig": 3.0, **kw}
    got = deop_pixel_loss(cl, ml, target, **kw)
    k = a["output_sig"]
    m = _sigmoid_np(_bilinear_ref(ml.numpy(), 5, 7))  # [2, 4, 5, 7]
    p = np.exp(cl.double().numpy())
    p = p / p.sum(-1, keepdims=True)
    focal_terms, dices = [], []
    for b in range(2):
        num = den_s = den_y = 0.0
        for c in range(4):
            for i in range(5):
                for j in range(7):
                    s = sum(m[b, n, i, j] * p[b, n, c] for n in range(4))
                    s = 1 / (1 + math.exp(-(k * s - k)))
                    lab = int(target[b, i, j])
                    y = 1.0 if (lab == c or (lab == 255 and c == 3)) else 0.0
                    pt = s if y else 1 - s
                    at = a["focal_alpha"] if y else 1 - a["focal_alpha"]
                    focal_terms.append(-at * (1 - pt) ** a["focal_gamma"] * math.log(min(max(pt, 1e-4), 1 - 1e-4)))
                    if c < 3:
                        num += s * y
                        den_s += s
                        den_y += y
        dices.append(1 - (2 * num + 1) / (den_s + den_y + 1))
    focal, dice = sum(focal_terms) / len(focal_terms), sum(dices) / 2
    assert float(got["focal"]) == pytest.approx(focal, rel=1e-5)
    assert float(got["dice"]) == pytest.approx(dice, rel=1e-5)
    assert float(got["loss"]) == pytest.approx(a["focal_weight"] * focal + a["dice_weight"] * dice, rel=1e-5)


def test_loss_takes_a_target_with_a_channel_axis_and_a_one_row_label():
    """[B, 1, H, W] targets are the [B, H, W] ones with a channel axis (same loss); a one-row
    [B, 1, W] label is a 3-d target, not a channel axis."""
    g = torch.Generator().manual_seed(6)
    cl = torch.randn(2, 3, 3, generator=g)
    ml = torch.randn(2, 3, 2, 2, generator=g)
    target = torch.randint(0, 2, (2, 4, 5), generator=g)
    plain = deop_pixel_loss(cl, ml, target)
    chan = deop_pixel_loss(cl, ml, target[:, None])
    assert [float(chan[k]) for k in ("loss", "focal", "dice")] == [float(plain[k]) for k in ("loss", "focal", "dice")]
    row = target[:, :1]  # [2, 1, 5]
    one = deop_pixel_loss(cl, ml, row)
    again = deop_pixel_loss(cl, ml, row[:, None])
    assert float(one["loss"]) == float(again["loss"]) and float(one["loss"]) != float(plain["loss"])
    with pytest.raises(ValueError, match="deop loss"):
        deop_pixel_loss(cl, ml, target[:1])  # one label for two images
    with pytest.raises(ValueError, match="deop loss"):
        deop_pixel_loss(cl, ml[:, :2], target)  # two masks for three proposals


def test_segment_logits_against_a_reference_forward(tiny, proposal_model):
    """DeOP's segment logits for a tiny model (one decoder-free heatmap layer, K = 0), recomputed
    from the model's own tensors by the paper's / released formulas written out here
    (released-code.md 2.3): tgt starts at 0, so the output layer's self-attention returns
    out_proj(b_v) for every query (the values are all b_v); tgt = LayerNorm(that); per head
    H_h = softmax(q_h k_h^T / sqrt(d)) * M with q = W_q (tgt + qpos), k = W_k (F_V + pos),
    M = bilinear(sigmoid(mask logits)) at the CLIP grid (sigmoid first: the released
    semseg_mask_downsample); F_I = concat_h H_h F_V[h-slice], L2-normalised; logits =
    100 * cos against [text; no-object] (temperature 100). Image 64 x 96: masks 16 x 24, grid 4 x 6."""
    import numpy as np

    seg = _deop(tiny, proposal_model, decoder_layers=0, dropout=0.0)
    seg.eval()
    assert seg.cfg.logit_scale == 100.0  # released get_sim_logits(temperature=100)
    x = pixels(2, 64, 96, seed=11)
    text = F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(5)), dim=-1) * 2.5
    with torch.no_grad():
        logits, mask_logits = seg.segment(x, text)
        fv, grid = seg.clip_features(x, mask_logits)
    assert grid == (4, 6) and mask_logits.shape == (2, 6, 16, 24) and logits.shape == (2, 6, 4)

    def t(a):
        return a.detach().double().numpy()

    dec = seg.decoder
    Wd, heads = 64, 2
    d = Wd // heads
    mem = t(fv)  # [B, N, W]
    pos = t(sine_position_encoding(4, 6, Wd))
    qpos = t(dec.query_embed.weight)  # [Q, W]
    e = Wd
    b_v = t(dec.out_self_attn.in_proj_bias[2 * e :])
    sa = t(dec.out_self_attn.out_proj.weight) @ b_v + t(dec.out_self_attn.out_proj.bias)  # [W]
    mu, var = sa.mean(), sa.var()
    tgt = (sa - mu) / np.sqrt(var + 1e-5) * t(dec.out_norm.weight) + t(dec.out_norm.bias)  # [W], every query
    q = (tgt[None] + qpos) @ t(dec.q_proj.weight).T + t(dec.q_proj.bias)  # [Q, W]
    masks = _bilinear_ref(_sigmoid_np(t(mask_logits)), 4, 6).reshape(2, 6, -1)  # [B, Q, N]
    cls = np.concatenate([t(F.normalize(text, dim=-1)), t(F.normalize(seg.no_object, dim=-1))])  # [C + 1, W]

    def reference(masks):
        want = np.zeros((2, 6, 4))
        for b in range(2):
            k = (mem[b] + pos) @ t(dec.k_proj.weight).T + t(dec.k_proj.bias)  # [N, W]
            for qi in range(6):
                emb = np.zeros(Wd)
                for h in range(heads):
                    sl = slice(h * d, (h + 1) * d)
                    a = q[qi, sl] @ k[:, sl].T / math.sqrt(d)
                    a = np.exp(a - a.max())
                    a = a / a.sum() * masks[b, qi]
                    emb[sl] = a @ mem[b, :, sl]
                emb = emb / np.linalg.norm(emb)
                want[b, qi] = 100 * cls @ emb
        return want

    want = reference(masks)
    np.testing.assert_allclose(t(logits), want, rtol=1e-4, atol=1e-3)
    # the order of sigmoid and resize shows in the logits: resizing the logits first gives others
    other = reference(_sigmoid_np(_bilinear_ref(t(mask_logits), 4, 6)).reshape(2, 6, -1))
    assert np.abs(other - want).max() > 1e-2


def test_learned_tensors_start_from_the_released_draws_per_seed(tiny, proposal_model):
    """The learned tensors' initial draws (released): visual prompts N(0, width^-0.5) (width 64:
    std 0.125; 2 layers x (1 + 24 x 24) tokens x 64), the no-object embedding N(0, text width^-0.5),
    the text context N(0, 0.02): the same for the same seed, different across seeds, and of
    the released spread (sample std within a tolerance that the sample size allows)."""
    tw = int(tiny.token_embedding.weight.shape[1])
    draws = {}
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        seg = _deop(tiny, proposal_model, text_prompt_tokens=16)
        t = {"vp": seg.visual_prompts.detach(), "no": seg.no_object.detach(), "ctx": seg.text_prompt.ctx.detach()}
        assert t["vp"].shape == (2, 1 + 24 * 24, 64) and t["no"].shape == (1, 64) and t["ctx"].shape[0] == 16
        assert float(t["vp"].std()) == pytest.approx(64**-0.5, rel=0.02)
        assert float(t["no"].std()) == pytest.approx(tw**-0.5, rel=0.35)
        assert float(t["ctx"].std()) == pytest.approx(0.02, rel=0.2)
        if seed in draws:
            for k in t:
                torch.testing.assert_close(t[k], draws[seed][k], rtol=0, atol=0)
        draws.setdefault(seed, t)
    for k in ("vp", "no", "ctx"):
        assert not torch.allclose(draws[0][k], draws[1][k])


# ============================================================================ config and refusals


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="model.alpha is used by severance: alpha only"):
        cfg(alpha=0.5)
    with pytest.raises(ConfigError, match="mask_guided"):
        cfg(mask_guided=True, severance="identity")
    with pytest.raises(ConfigError, match="did you mean 'decoder_layers'"):
        cfg(decoder_layer=2)
    dumped = cfg(severance="alpha", alpha=0.3).model_dump(mode="json")
    assert validated(DeOPConfig, dumped, "model").alpha == 0.3  # a dump (segmenter.json) reads back


def _doc(q=100, text_dim=64, head="text"):
    return {
        "class": "zeroseg.models.maskformer:MaskFormer",
        "model": {"backbone": "resnet18", "num_queries": q, "class_head": head, "size_divisibility": 32},
        "num_classes": 5,
        "text_dim": text_dim,
        "class_head": head,
        "num_queries": q,
        "hidden_dim": 256,
        "clip": None,
        "input": {"size": [128, 128], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "seen": [0, 1, 2, 3, 4],
    }


def test_refuses_proposals_of_another_query_count_or_embedding_size():
    assert check_proposals_fit(_doc(q=7), cfg(), 64) == 7  # num_queries null: the proposals' count
    assert check_proposals_fit(_doc(q=7), cfg(num_queries=7), 64) == 7
    with pytest.raises(DataError, match=r"has 100 queries but train_classifier.model.num_queries is 50"):
        check_proposals_fit(_doc(q=100), cfg(num_queries=50), 64)
    with pytest.raises(DataError, match=r"embeds segments into 512 dimensions, but DeOP's CLIP model embeds into 64"):
        check_proposals_fit(_doc(text_dim=512), cfg(), 64)
    with pytest.raises(DataError, match=r"records 7 queries but its model has num_queries 100"):
        check_proposals_fit({**_doc(q=100), "num_queries": 7}, cfg(), 64)
    assert check_proposals_fit(_doc(text_dim=None, head="objectness"), cfg(), 64) == 100


def test_stage_refuses_a_mismatched_proposals_artifact_before_training(tmp_path):
    """The method's pre-fit check on a proposals.json on disk: query count and embedding size
    named with both values; the decoder width against the CLIP size; augment.mean against the
    proposals' normalisation."""
    from pipeline.dag import Artifact
    from stages.jobs.methods._proposals import bound_proposals
    from stages.jobs.methods.deop import check_proposals
    from stages.methods.deop import DeOPMethod

    (tmp_path / "proposals.json").write_text(json.dumps(_doc(q=100, text_dim=512)))
    art = Artifact("pretrain_proposals", "0" * 64, tmp_path, str(tmp_path), {})
    base = {
        "method": "deop",
        "clip": {"model": TINY_MODEL, "random_init": True},
        "model": {"width": 64, "heads": 2, "input_size": [128, 128]},
        "augment": {"crop_size": [128, 128]},
    }
    doc, where = bound_proposals(art)
    assert where == "proposals artifact pretrain_proposals/000000000000"
    with pytest.raises(DataError, match=r"512 dimensions, but DeOP's CLIP model embeds into 64"):
        check_proposals(doc, DeOPMethod.model_validate(base))
    doc = _doc(q=100)
    with pytest.raises(DataError, match=r"has 100 queries but train_classifier.model.num_queries is 10"):
        check_proposals(doc, DeOPMethod.model_validate({**base, "model": {**base["model"], "num_queries": 10}}))
    with pytest.raises(ConfigError, match=r"model.width 512 must equal the CLIP embedding size 64"):
        check_proposals(doc, DeOPMethod.model_validate({**base, "model": {"input_size": [128, 128]}}))
    with pytest.raises(ConfigError, match=r"augment.mean \[0.5, 0.5, 0.5\] differs from the proposal model's"):
        check_proposals(
            doc, DeOPMethod.model_validate({**base, "augment": {"crop_size": [128, 128], "mean": [0.5, 0.5, 0.5]}})
        )
    check_proposals(doc, DeOPMethod.model_validate(base))  # fits
    (tmp_path / "proposals.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no file 'proposals.json'"):
        bound_proposals(art)


def test_stage_refuses_proposals_trained_on_other_seen_classes(tmp_path):
    """train_deop, before any training, refuses a proposals artifact whose recorded seen classes
    (proposals.json ``seen``) are not classes.json's train.seen: here [0, 1, 2, 3, 4] against [0, 2]."""
    from pipeline.dag import Artifact, StageContext
    from stages.jobs.methods.deop import train_deop
    from stages.methods.deop import DeOPMethod

    bs, pp, out = tmp_path / "build_splits", tmp_path / "pretrain_proposals", tmp_path / "out"
    for d in (bs, pp, out):
        d.mkdir()
    names = ["a", "b", "c", "d", "e"]
    vocab = {
        "dataset": "d",
        "names": names,
        "prompt_names": names,
        "seen": [0, 2],
        "unseen": [1, 3, 4],
        "ignore_index": 255,
    }
    (bs / "classes.json").write_text(json.dumps({"train": vocab, "eval": {"val": vocab}}))
    (pp / "proposals.json").write_text(json.dumps(_doc(q=100, text_dim=64)))
    inputs = {
        "splits": Artifact("build_splits", "a" * 64, bs, str(bs), {"files": []}),
        "proposals": Artifact("pretrain_proposals", "b" * 64, pp, str(pp), {"files": []}),
    }
    config = DeOPMethod.model_validate(
        {
            "method": "deop",
            "clip": {"model": TINY_MODEL, "random_init": True},
            "model": {"width": 64, "heads": 2, "input_size": [128, 128]},
            "augment": {"crop_size": [128, 128]},
        }
    )
    ctx = StageContext("train_classifier", "c" * 64, config, inputs, out, tmp_path, str(tmp_path / "_t"), "tc")
    with pytest.raises(
        DataError,
        match=r"proposals artifact pretrain_proposals/bbbbbbbbbbbb was trained on seen classes \[0, 1, 2, 3, 4\] "
        r"but this config's seen training classes are \[0, 2\]",
    ):
        train_deop(ctx, config)


def test_deop_without_a_proposals_stage_fails_at_plan_time(monkeypatch, tmp_path):
    """The proposals role is required: a DeOP config without pretrain_proposals does not plan."""
    from pipeline.config import load_config
    from pipeline.errors import ConfigError as PlanError
    from pipeline.plan import plan
    from stages.catalog import STAGES

    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    cfg = load_config("configs/sample_deop.yaml")
    del cfg.sections["pretrain_proposals"]
    with pytest.raises(PlanError, match=r"train_classifier needs its 'proposals' input .* pretrain_proposals"):
        plan(cfg, STAGES, checks=False)


@pytest.mark.parametrize("name", ["coco_stuff_deop", "voc_deop"])
def test_benchmark_configs_plan_with_the_released_settings(name, monkeypatch, tmp_path):
    """The real configs bind the proposals and carry the released DeOP settings."""
    from pipeline.config import load_config
    from pipeline.plan import plan
    from stages.catalog import STAGES

    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    p = plan(load_config(f"configs/{name}.yaml"), STAGES, checks=False)
    tc = p.nodes["train_classifier"]
    assert tc.bindings["proposals"] == "pretrain_proposals"
    m, t = tc.config.model, tc.config.train
    assert (m.severance, m.severance_layers, m.decoder, m.decoder_layers) == ("mask_weighted", [-1], "heatmap", 1)
    assert (m.width, m.heads, m.ffn, m.num_queries, m.text_prompt_tokens) == (512, 8, 1024, 100, 16)
    assert m.visual_prompt_layers == [0, 1, 2, 3, 4, 5] and (m.focal_weight, m.dice_weight) == (2.0, 0.8)
    world = tc.config.scaling.num_workers * t.batch_size * t.grad_accum_steps
    assert (t.lr, world, t.clip_grad_norm) == (2e-4, 16, 0.01)
    assert t.max_steps == {"coco_stuff_deop": 60000, "voc_deop": 20000}[name]
    ev = p.nodes["evaluate"].config
    assert (ev.protocol, ev.short_side, ev.gamma) == (
        "short_side",
        512,
        None,
    )  # no calibration: the segmenter states none


# ============================================================================ the sample DAG
# build_splits, embed_text and pretrain_proposals come from the session fixture
# `sample_proposals` (tests/conftest.py: configs/sample_proposals.yaml, which sample_deop.yaml
# extends, with the overrides the sample tests share, in process); these tests copy its store.

SMALL = [  # DeOP's own, after the shared overrides
    "train_classifier.train.max_steps=4",
    "train_classifier.train.checkpoint_every=2",
    "train_classifier.train.log_every=2",
]
DAG = ("build_splits", "embed_text", "pretrain_proposals", "train_classifier", "evaluate")


def _run(sample_proposals, work, *extra, overrides=()):
    r = sample_proposals.run("configs/sample_deop.yaml", work, *extra, overrides=[*SMALL, *overrides])
    return r.code, r.plan


@pytest.fixture(scope="module")
def deop_run(tmp_path_factory, sample_proposals):
    work = sample_proposals.copy_to(tmp_path_factory.mktemp("deop"))
    code, plan = _run(sample_proposals, work)
    return work, code, plan


@pytest.mark.slow
def test_sample_dag_trains_deop_on_frozen_proposals_and_evaluates(deop_run, shared_data):
    import numpy as np

    from zeroseg.models import load_segmenter

    work, code, plan = deop_run
    assert code == 0, [p.error for p in plan]
    # the proposals trained by configs/sample_proposals.yaml (another classifier) are reused as they are
    assert {p.name: p.status for p in plan} == dict(zip(DAG, ["cached", "cached", "cached", "ran", "ran"], strict=True))
    tc = plan.nodes["train_classifier"]
    assert tc.bindings["proposals"] == "pretrain_proposals"
    assert tc.metrics["steps"] == 4 and tc.metrics["proposal_queries"] == 16
    store = work / "store"
    art = store / "train_classifier" / tc.key
    seg_json = json.loads((art / "segmenter.json").read_text())
    assert seg_json["method"] == "deop" and seg_json["class"] == "zeroseg.models.deop:DeOP"
    prop_dir = store / "pretrain_proposals" / plan.nodes["pretrain_proposals"].key
    assert seg_json["model"]["proposals"] == json.loads((prop_dir / "proposals.json").read_text())
    weights = torch.load(art / "weights.pt", map_location="cpu", weights_only=True)
    seg = load_segmenter(art)
    assert set(weights) == set(seg.trainable_names())
    assert not any(k.startswith("clip.") for k in weights)  # the CLIP towers stay out
    # the proposal model travels inside the segmenter, exactly as pretrain_proposals wrote it
    prop = torch.load(prop_dir / "weights.pt", map_location="cpu", weights_only=True)
    assert {k.removeprefix("proposals.") for k in weights if k.startswith("proposals.")} == set(prop)
    for k, v in prop.items():
        assert torch.equal(weights[f"proposals.{k}"], v), k
    learned = {"decoder", "no_object", "visual_prompts", "text_prompt"}
    assert {k.split(".")[0] for k in weights} == learned | {"proposals"}
    # training checkpoints hold the learned tensors only
    ckpts = sorted(p for p in (store / "_train").glob("train_classifier-*/checkpoint_*") if p.is_dir())
    assert 1 <= len(ckpts) <= 2
    ck = torch.load(ckpts[-1] / "model.pt", map_location="cpu", weights_only=True)
    assert {k.split(".")[0] for k in ck} == learned
    # the segmenter embeds class names itself and scores [B, C, H, W] (mask logits upsampled first)
    text = seg.encode_text(["person", "dog", "sky"])
    assert text.shape == (3, 64) and torch.allclose(text.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        scores = seg(torch.zeros(1, 3, 128, 128), text)
    assert scores.shape == (1, 3, 128, 128) and bool((scores >= 0).all()) and bool((scores <= 16).all())
    ev = plan.nodes["evaluate"]
    metrics = json.loads((store / "evaluate" / ev.key / "metrics.json").read_text())
    for s in ("val", "camvid"):
        cm = np.array(metrics[s]["gzs3"]["confusion_matrix"])
        assert ev.metrics[f"{s}/pAcc"] == pytest.approx(100 * np.trace(cm) / cm.sum())
    # ---- value checks (glue; tests/test_glue_reference.py): every metric from its matrix, the
    # pixel counts from the label PNGs, and each matrix equal to a per-image reference forward of
    # the saved DeOP segmenter with its own class-name embeddings (encode_text), gamma 0 (DeOP
    # applies no calibration; its artifact states none)
    from test_glue_reference import check_sample_evaluate

    ref = check_sample_evaluate(work, plan, shared_data, {"": "train_classifier"}, {"": 0.0})
    assert set(ref) == {"val", "camvid"}


@pytest.mark.slow
def test_second_run_is_fully_cached_and_a_classifier_change_reuses_the_proposals(deop_run, sample_proposals):
    work, code, _ = deop_run
    assert code == 0
    code, plan = _run(sample_proposals, work)
    assert code == 0 and {p.name: p.status for p in plan} == {s: "cached" for s in DAG}
    # a change of the classifier alone: train_classifier and evaluate run, the proposals are reused
    change = ["train_classifier.model.decoder_layers=2"]
    code, plan = _run(sample_proposals, work, "--dry-run", overrides=change)
    assert code == 0
    assert {p.name: p.action for p in plan} == {
        "build_splits": "cached",
        "embed_text": "cached",
        "pretrain_proposals": "cached",
        "train_classifier": "run",
        "evaluate": "run",
    }
    assert "decoder_layers 1 -> 2" in plan.nodes["train_classifier"].reason
    # no real re-run here: the first run (deop_run) already trained DeOP on the cached proposals of
    # configs/sample_proposals.yaml, a config whose classifier differs


@pytest.mark.slow
def test_a_proposals_artifact_of_another_query_count_is_refused_before_training(deop_run, sample_proposals):
    work, code, _ = deop_run
    assert code == 0
    code, plan = _run(sample_proposals, work, overrides=["train_classifier.model.num_queries=7"])
    assert code != 0
    node = plan.nodes["train_classifier"]
    assert node.status == "failed"
    assert "has 16 queries but train_classifier.model.num_queries is 7" in str(node.error)
    assert not (work / "store" / "train_classifier" / node.key).exists()
    assert not list((work / "store" / "_train").glob(f"train_classifier-{node.key[:16]}*/checkpoint_*"))
