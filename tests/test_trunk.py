"""The shared ViT trunk (zeroseg/models/trunk.py) on the tiny random-weight CLIP.

Two kinds of test:

- regression: MaskCLIP's ``dense_features`` and ZegCLIP's ``PromptedVisionTransformer`` now run on
  the trunk; their outputs are compared with the pre-refactor implementations kept verbatim in
  ``tests/reference_vit.py`` over input sizes, prompt settings, backbone variants, train / eval
  mode and both transformer layouts;
- hooks: each hook against an expected value that does not come from the trunk (open_clip's own
  forward, a hand-written block, a hand-written attention).
"""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_vit as ref

from zeroseg.models.clip import TINY_MODEL, ClipSpec, dense_features, load_clip, resize_pos_embed
from zeroseg.models.maskclip import MaskCLIP
from zeroseg.models.prompt import PromptedVisionTransformer
from zeroseg.models.trunk import (
    INPUT,
    BlockContext,
    blended_attention,
    embed,
    forward_trunk,
    grid_additive,
    identity_attention,
    maskclip_attention,
    project,
    run_blocks,
    standard_attention,
    value_scaled_attention,
)

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip(ClipSpec(model=TINY_MODEL, random_init=True))


def pixels(b, h, w, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def seq_first(visual):
    """The same tower in the sequence-first layout of older open_clip models."""
    visual.transformer.batch_first = False
    for blk in visual.transformer.resblocks:
        blk.attn.batch_first = False
    return visual


def towers(tiny, layout):
    a, b = copy.deepcopy(tiny.visual), copy.deepcopy(tiny.visual)
    if layout == "seq_first":
        seq_first(a), seq_first(b)
    return a, b


# ====================================================================== regression: MaskCLIP


@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
@pytest.mark.parametrize("size", [(224, 224), (160, 320), (64, 96), (200, 232)])  # native, non-square, small, cropped
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dense_features_match_pre_refactor(tiny, layout, size, mode):
    new_v, ref_v = towers(tiny, layout)
    new_v.train(mode == "train"), ref_v.train(mode == "train")
    x = pixels(2, *size)
    with torch.no_grad():
        cls_n, p_n = dense_features(new_v, x)
        cls_r, p_r = ref.dense_features(ref_v, x)
    assert p_n.shape == p_r.shape == (2, 64, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(cls_n, cls_r, **TOL)
    torch.testing.assert_close(p_n, p_r, **TOL)


def test_dense_features_gradients_match_pre_refactor(tiny):
    new_v, ref_v = towers(tiny, "batch_first")
    x = pixels(1, 96, 128)
    w = torch.randn(1, 64, 6, 8, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn, v in ((dense_features, new_v), (ref.dense_features, ref_v)):
        xi = x.clone().requires_grad_(True)
        cls, p = fn(v, xi)
        ((p * w).sum() + cls.sum()).backward()
        grads.append((xi.grad, v.transformer.resblocks[-1].attn.in_proj_weight.grad, v.conv1.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


def test_maskclip_scores_match_pre_refactor(tiny):
    seg = MaskCLIP(copy.deepcopy(tiny), {"input_size": [160, 224]})
    x, t = pixels(2, 160, 224), F.normalize(torch.randn(5, 64), dim=-1)
    with torch.no_grad():
        out = seg(x, t)
        _, p = ref.dense_features(copy.deepcopy(tiny.visual), x)
    expect = 100.0 * torch.einsum("bdhw,cd->bchw", F.normalize(p, dim=1), t)
    torch.testing.assert_close(out, expect, **TOL)


# ====================================================================== regression: ZegCLIP encoder


PROMPT_CASES = [
    dict(backbone="dpt", prompt_tokens=5, prompt_layers=None),  # every layer (ZegCLIP default)
    dict(backbone="dpt", prompt_tokens=3, prompt_layers=[2]),  # a subset (top layer only)
    dict(backbone="dpt", prompt_tokens=4, prompt_layers=[1]),  # a subset (bottom layer only)
    dict(backbone="dpt", prompt_tokens=0, prompt_layers=None),  # 0 tokens: plain frozen encoder
    dict(backbone="ft"),
    dict(backbone="fix"),
]


def encoders(tiny, layout, input_size, dropout, **kw):
    new_v, ref_v = towers(tiny, layout)
    new = PromptedVisionTransformer(new_v, input_size=input_size, prompt_dropout=dropout, **kw)
    old = ref.PromptedVisionTransformer(ref_v, input_size=input_size, prompt_dropout=dropout, **kw)
    if new.prompts is not None:
        with torch.no_grad():
            old.prompts.copy_(new.prompts)
    assert (new.prompts is None) == (old.prompts is None)
    torch.testing.assert_close(new_v.positional_embedding, ref_v.positional_embedding, rtol=0, atol=0)
    return new, old


@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
@pytest.mark.parametrize(
    "case", PROMPT_CASES, ids=lambda c: f"{c['backbone']}-{c.get('prompt_tokens')}-{c.get('prompt_layers')}"
)
@pytest.mark.parametrize(
    "input_size, image",
    [(None, (224, 224)), ((64, 96), (64, 96)), ((64, 64), (96, 160))],  # native; resized once; resized again per call
)
def test_prompted_encoder_matches_pre_refactor_eval(tiny, layout, case, input_size, image):
    new, old = encoders(tiny, layout, input_size, 0.1, **case)
    new.eval(), old.eval()
    x = pixels(2, *image)
    with torch.no_grad():
        g_n, p_n, hw_n = new(x)
        g_r, p_r, hw_r = old(x)
    assert hw_n == hw_r == (image[0] // 16, image[1] // 16)
    torch.testing.assert_close(g_n, g_r, **TOL)
    torch.testing.assert_close(p_n, p_r, **TOL)


@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("case", PROMPT_CASES[:3] + PROMPT_CASES[4:5], ids=["dpt-all", "dpt-top", "dpt-bottom", "ft"])
def test_prompted_encoder_matches_pre_refactor_train(tiny, layout, dropout, case):
    """Train mode with gradients: same outputs (prompt dropout seeded identically: both draw one
    mask per prompted layer, bottom to top) and the same gradients on what trains."""
    new, old = encoders(tiny, layout, (64, 96), dropout, **case)
    new.train(), old.train()
    x = pixels(2, 64, 96)
    w = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(9))
    outs = []
    for enc in (new, old):
        torch.manual_seed(1234)
        g, p, _ = enc(x)
        ((p * w).sum() + g.square().sum()).backward()
        trained = enc.prompts if enc.prompts is not None else enc.visual.conv1.weight
        outs.append((g, p, trained.grad, enc.visual.transformer.resblocks[0].mlp.c_fc.weight.grad))
    for a, b in zip(*outs):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, **TOL)
    if dropout and new.prompts is not None:  # the seeded masks really were drawn (outputs differ from eval)
        new.eval()
        with torch.no_grad():
            assert not torch.allclose(new(x)[0], outs[0][0], atol=1e-4)


# ====================================================================== the trunk against open_clip


def test_plain_trunk_is_open_clips_forward(tiny):
    v = tiny.visual
    x = pixels(2, 224, 224)
    with torch.no_grad():
        out = forward_trunk(v, x)
        tokens = v.transformer(v._embeds(x))  # open_clip's own embedding + blocks
        pooled = v(x)
    assert out.grid == (14, 14) and out.tokens.shape == (2, 197, 64) and out.intermediates == {}
    torch.testing.assert_close(out.tokens, tokens, **TOL)
    torch.testing.assert_close(project(v, out.tokens)[:, 0], pooled, **TOL)


@pytest.mark.parametrize("k", [0, 1, -1])
def test_intermediates_equal_a_manual_forward_of_blocks_0_to_k(tiny, k):
    v = tiny.visual
    x = pixels(2, 224, 224)
    with torch.no_grad():
        out = forward_trunk(v, x, return_layers=[k])
        h = v._embeds(x)
        for blk in v.transformer.resblocks[: (k % 2) + 1]:
            h = blk(h)
    assert list(out.intermediates) == [k % 2]
    torch.testing.assert_close(out.intermediates[k % 2], h, **TOL)


def test_intermediates_drop_the_prompts(tiny):
    """With prompts in block 0 only, block 0's intermediate is [CLS, patches] of that block's output."""
    v = tiny.visual
    x = pixels(1, 224, 224)
    P = torch.randn(3, 64)
    with torch.no_grad():
        out = forward_trunk(v, x, prompts={0: P}, return_layers=[0, 1])
        h = v._embeds(x)
        h0 = v.transformer.resblocks[0](torch.cat([h[:, :1], P[None], h[:, 1:]], 1))
        h0 = torch.cat([h0[:, :1], h0[:, 4:]], 1)
        h1 = v.transformer.resblocks[1](h0)
    torch.testing.assert_close(out.intermediates[0], h0, **TOL)
    torch.testing.assert_close(out.intermediates[1], h1, **TOL)
    torch.testing.assert_close(out.tokens, h1, **TOL)


def test_prompts_per_layer_may_differ_in_number_eq3(tiny):
    """Eq. 3 with M = 2 tokens in block 0 and M = 5 in block 1: block 1 sees [g, P^1, H] where H
    are block 0's patch outputs (block 0's prompt outputs discarded)."""
    v = tiny.visual
    x = pixels(2, 64, 80)
    P0, P1 = torch.randn(2, 64), torch.randn(2, 5, 64)  # [M, width] and [B, M, width]
    with torch.no_grad():
        out = forward_trunk(v, x, prompts={0: P0, 1: P1})
        h, _ = embed(v, x)
        b0, b1 = v.transformer.resblocks
        h = b0(torch.cat([h[:, :1], P0.expand(2, -1, -1), h[:, 1:]], 1))
        h = b1(torch.cat([h[:, :1], P1, h[:, 3:]], 1))
        h = torch.cat([h[:, :1], h[:, 6:]], 1)
    torch.testing.assert_close(out.tokens, h, **TOL)


# ====================================================================== attention hooks


@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
def test_alpha_zero_leaves_the_encoder_unchanged(tiny, layout):
    v = seq_first(copy.deepcopy(tiny.visual)) if layout == "seq_first" else tiny.visual
    x = pixels(2, 96, 112)
    with torch.no_grad():
        plain = forward_trunk(v, x).tokens
        for hook in (blended_attention(0.0), blended_attention(torch.zeros(1 + 6 * 7)), standard_attention):
            for layers in ([0], [1], [0, 1]):
                out = forward_trunk(v, x, attention={i: hook for i in layers}).tokens
                torch.testing.assert_close(out, plain, **TOL)


def test_identity_attention_severs_the_patches(tiny):
    """alpha = 1 in block 0: a patch's block-0 output depends on that patch only. Perturbing the
    pixels of patch (1, 2) changes its own output but no other token's; with the ordinary
    attention every token changes."""
    v = tiny.visual
    x = pixels(1, 64, 64)
    y = x.clone()
    y[..., 16:32, 32:48] += 1.0  # patch (1, 2) -> token 1 + 1*4 + 2 = 7
    with torch.no_grad():
        for hook in (identity_attention, blended_attention(1.0)):
            a = forward_trunk(v, x, attention={0: hook}, return_layers=[0]).intermediates[0]
            b = forward_trunk(v, y, attention={0: hook}, return_layers=[0]).intermediates[0]
            others = [i for i in range(17) if i != 7]
            torch.testing.assert_close(a[:, others], b[:, others], rtol=0, atol=1e-6)
            assert (a[:, 7] - b[:, 7]).abs().max() > 1e-2
        a = forward_trunk(v, x, return_layers=[0]).intermediates[0]
        b = forward_trunk(v, y, return_layers=[0]).intermediates[0]
        assert ((a - b).abs().amax(-1) > 1e-4).all()  # control: ordinary attention mixes
        # severed in every block: independent at the output too
        sev = {0: identity_attention, 1: identity_attention}
        a = forward_trunk(v, x, attention=sev).tokens
        b = forward_trunk(v, y, attention=sev).tokens
        torch.testing.assert_close(a[:, others], b[:, others], rtol=0, atol=1e-6)


def _by_hand_attention(attn, y, A_mix):
    """Multi-head attention of one block written out: per head h (d = width / heads),
    Q_h = y W_q^h + b_q^h etc., A_h = softmax(Q_h K_h^T / sqrt(d)), O_h = A_mix(A_h) V_h,
    output = concat_h(O_h) W_o^T + b_o."""
    e, H = attn.embed_dim, attn.num_heads
    d = e // H
    W, bias = attn.in_proj_weight, attn.in_proj_bias
    q = y @ W[:e].T + bias[:e]
    k = y @ W[e : 2 * e].T + bias[e : 2 * e]
    val = y @ W[2 * e :].T + bias[2 * e :]
    outs = []
    for h in range(H):
        s = slice(h * d, (h + 1) * d)
        A = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / d**0.5, dim=-1)
        outs.append(A_mix(A) @ val[..., s])
    return torch.cat(outs, -1) @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_blended_attention_is_deop_eq2(tiny, alpha):
    """DeOP Eq. 2, F_out = (alpha E + (1 - alpha) Attn) x F_in, per head, written by hand."""
    blk = tiny.visual.transformer.resblocks[1]
    y = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(3))
    ctx = BlockContext(1, 2, 0, (3, 3))
    with torch.no_grad():
        got = blended_attention(alpha)(blk, y, ctx)
        E = torch.eye(10)
        expect = _by_hand_attention(blk.attn, y, lambda A: alpha * E + (1 - alpha) * A)
    torch.testing.assert_close(got, expect, **TOL)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        blended_attention(1.5)


def test_maskclip_attention_is_per_token_alpha_and_matches_by_hand(tiny):
    blk = tiny.visual.transformer.resblocks[1]
    y = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(4))
    ctx = BlockContext(1, 2, 0, (3, 3))
    alpha = torch.ones(10)
    alpha[0] = 0.0  # [CLS] attends, the patches keep their value
    with torch.no_grad():
        got = maskclip_attention(blk, y, ctx)
        torch.testing.assert_close(got, blended_attention(alpha)(blk, y, ctx), **TOL)
        mix = lambda A: torch.cat([A[..., :1, :], torch.eye(10)[1:].expand_as(A[..., 1:, :])], -2)  # noqa: E731
        torch.testing.assert_close(got, _by_hand_attention(blk.attn, y, mix), **TOL)


def test_value_scaled_attention_is_deops_released_gps(tiny):
    """out_l = out_proj(w_l * (W_v y_l + b_v)): identity attention with a per-token value scale."""
    blk = tiny.visual.transformer.resblocks[1]
    attn = blk.attn
    y = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(6))
    w = torch.rand(2, 10, generator=torch.Generator().manual_seed(7)) * 3
    ctx = BlockContext(1, 2, 0, (3, 3))
    with torch.no_grad():
        got = value_scaled_attention(w)(blk, y, ctx)
        Wv, bv = attn.in_proj_weight[128:], attn.in_proj_bias[128:]
        expect = (w[..., None] * (y @ Wv.T + bv)) @ attn.out_proj.weight.T + attn.out_proj.bias
        torch.testing.assert_close(got, expect, **TOL)
        torch.testing.assert_close(
            value_scaled_attention(torch.ones(2, 10))(blk, y, ctx), identity_attention(blk, y, ctx), **TOL
        )
        # with 2 prompt tokens in the sequence a [B, 1 + h*w] weight leaves them at 1
        yp = torch.randn(2, 12, 64)
        ctxp = BlockContext(1, 2, 2, (3, 3))
        got = value_scaled_attention(lambda c: w)(blk, yp, ctxp)
        full = torch.cat([w[:, :1], torch.ones(2, 2), w[:, 1:]], 1)
        torch.testing.assert_close(got, value_scaled_attention(full)(blk, yp, ctxp), **TOL)
    with pytest.raises(ValueError, match="value weights"):
        value_scaled_attention(torch.ones(2, 7))(blk, y, ctx)


def test_attention_hook_block_matches_open_clip_block(tiny):
    """A hooked block with the standard attention is open_clip's block: checked through the last
    block (layer -1 and layer 1 are the same block)."""
    v = tiny.visual
    x = pixels(1, 224, 224)
    with torch.no_grad():
        a = forward_trunk(v, x, attention={-1: standard_attention}).tokens
        b = forward_trunk(v, x, attention={1: lambda blk, y, ctx: blk.attn(y, y, y, need_weights=False)[0]}).tokens
        torch.testing.assert_close(a, v.transformer(v._embeds(x)), **TOL)
        torch.testing.assert_close(b, a, **TOL)
    with pytest.raises(ValueError, match="outside 0..1"):
        forward_trunk(v, x, attention={2: standard_attention})
    with pytest.raises(ValueError, match="returned"):
        forward_trunk(v, x, attention={0: lambda blk, y, ctx: y[:, 1:]})


def test_hook_context(tiny):
    seen = []

    def spy(blk, y, ctx):
        seen.append((ctx, tuple(y.shape)))
        return standard_attention(blk, y, ctx)

    with torch.no_grad():
        forward_trunk(tiny.visual, pixels(2, 48, 80), prompts={1: torch.zeros(4, 64)}, attention={0: spy, 1: spy})
    assert seen == [(BlockContext(0, 2, 0, (3, 5)), (2, 16, 64)), (BlockContext(1, 2, 4, (3, 5)), (2, 20, 64))]
    assert seen[1][0].num_prefix == 5 and seen[1][0].seq_len == 20


# ====================================================================== additive prompts


def test_additive_zero_changes_nothing(tiny):
    v = tiny.visual
    x = pixels(2, 96, 64)
    z = torch.zeros(1 + 6 * 4, 64)
    with torch.no_grad():
        plain = forward_trunk(v, x).tokens
        out = forward_trunk(v, x, additive={INPUT: z, 0: z, 1: z.expand(2, -1, -1)}).tokens
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_additive_constant_at_input_equals_shifting_the_positional_embedding(tiny):
    c = 0.37
    v2 = copy.deepcopy(tiny.visual)
    with torch.no_grad():
        v2.positional_embedding += c
        x = pixels(2, 224, 224)
        shifted = forward_trunk(v2, x).tokens
        out = forward_trunk(tiny.visual, x, additive={INPUT: torch.full((197, 64), c)}).tokens
    torch.testing.assert_close(out, shifted, **TOL)


def test_additive_at_a_block_is_added_to_its_residual_input(tiny):
    """DeOP POSITION_LAYERS: x <- x + a before block k ([CLS] and patches; prompts untouched)."""
    v = tiny.visual
    x = pixels(1, 64, 64)
    a = torch.randn(17, 64, generator=torch.Generator().manual_seed(8))
    P = torch.randn(2, 64)
    with torch.no_grad():
        out = forward_trunk(v, x, additive={1: a}, prompts={1: P}).tokens
        h, _ = embed(v, x)
        h = v.transformer.resblocks[0](h)
        h = torch.cat([h[:, :1] + a[:1], P[None], h[:, 1:] + a[1:]], 1)
        h = v.transformer.resblocks[1](h)
        expect = torch.cat([h[:, :1], h[:, 3:]], 1)
    torch.testing.assert_close(out, expect, **TOL)
    with pytest.raises(ValueError, match="additive prompt at block 1"):
        forward_trunk(v, x, additive={1: torch.zeros(16, 64)})


def test_grid_additive_resizes_bicubically(tiny):
    learned = torch.randn(1 + 24 * 24, 64)  # DeOP: trained for 384 / 16 = 24 x 24
    fn = grid_additive(learned, (24, 24))
    torch.testing.assert_close(fn((5, 7)), resize_pos_embed(learned, (24, 24), (5, 7)))
    with torch.no_grad():
        x = pixels(1, 80, 112)
        a = forward_trunk(tiny.visual, x, additive={INPUT: fn}).tokens
        b = forward_trunk(tiny.visual, x, additive={INPUT: fn((5, 7))}).tokens
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_run_blocks_rejects_bad_prompts(tiny):
    v = tiny.visual
    x, grid = embed(v, pixels(1, 32, 32))
    with pytest.raises(ValueError, match="prompts of block 0"):
        run_blocks(v, x, grid, prompts={0: torch.zeros(1, 3, 32)})
    with pytest.raises(ValueError, match="smaller than one patch"):
        embed(v, pixels(1, 8, 32))


# ------------------------------------------------------------------ the sine position encoding


@pytest.mark.parametrize("h, w, channels, temperature", [(3, 5, 8, 10000.0), (4, 2, 12, 20.0), (1, 1, 4, 10000.0)])
def test_sine_position_encoding_against_a_loop_over_detr(h, w, channels, temperature):
    """DETR's PositionEmbeddingSine(normalize=True) by a plain loop: for row i, column j (1-based
    positions i / (h + 1e-6) * 2 pi and j / (w + 1e-6) * 2 pi), feature k of each axis is
    sin (k even) or cos (k odd) of pos / T^(2 floor(k/2) / (C/2)); y features first, then x;
    token i * w + j. Non-square grids so that a swapped axis shows."""
    import math

    from zeroseg.models.position import sine_position_encoding

    npf = channels // 2
    want = torch.zeros(h * w, channels, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            yv = (i + 1) / (h + 1e-6) * 2 * math.pi
            xv = (j + 1) / (w + 1e-6) * 2 * math.pi
            for k in range(npf):
                dim = temperature ** (2 * (k // 2) / npf)
                f = math.sin if k % 2 == 0 else math.cos
                want[i * w + j, k] = f(yv / dim)
                want[i * w + j, npf + k] = f(xv / dim)
    got = sine_position_encoding(h, w, channels, temperature=temperature, dtype=torch.float64)
    assert got.shape == (h * w, channels) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert sine_position_encoding(h, w, channels).dtype == torch.float32
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_encoding(h, w, channels + 2)


def test_resize_pos_embed_on_a_non_square_grid_against_a_manual_layout():
    """Old grid 2 x 3 (rows x columns), width 2: token 1 + i * 3 + j holds (i, j) as its two channels.
    Resized to 4 x 5: the reference builds the [1, 2, 2, 3] image channel by channel from that
    layout and interpolates it (bicubic, align_corners False); a transposed reshape (3 x 2) or a
    channel-last mix-up gives other numbers. [CLS] is kept, the dtype is kept."""
    pos = torch.zeros(1 + 6, 2)
    pos[0] = torch.tensor([9.0, -9.0])
    for i in range(2):
        for j in range(3):
            pos[1 + i * 3 + j] = torch.tensor([float(i), float(j)])
    img = torch.zeros(1, 2, 2, 3)
    for i in range(2):
        for j in range(3):
            img[0, 0, i, j], img[0, 1, i, j] = float(i), float(j)
    ref_grid = F.interpolate(img, size=(4, 5), mode="bicubic", align_corners=False)[0]  # [2, 4, 5]
    out = resize_pos_embed(pos.double(), (2, 3), (4, 5))
    assert out.shape == (1 + 20, 2) and out.dtype == torch.float64
    torch.testing.assert_close(out[0], pos[0].double())
    for i in range(4):
        for j in range(5):
            torch.testing.assert_close(out[1 + i * 5 + j].float(), ref_grid[:, i, j])
    # columns keep their order: channel 1 (the column index) increases along each row
    assert torch.all(out[1:6, 1].diff() > 0) and torch.all(out[1::5, 0].diff() >= 0)
    assert resize_pos_embed(pos, (2, 3), (2, 3)) is pos
    with pytest.raises(ValueError, match=r"has 6 rows, expected 1 \+ 2\*3"):
        resize_pos_embed(pos[:6], (2, 3), (4, 4))


def test_value_projection_by_hand_with_packed_and_separate_weights():
    """out_proj(s * (W_v y + b_v)) written out with matrices: packed in_proj (W_v = the last third),
    separate v_proj_weight (vdim != embed_dim), and no bias; per-token scale multiplies the bias too."""
    from zeroseg.models.trunk import _additive_tensor, _drop_prompts, _layer_index, value_projection

    torch.manual_seed(0)
    y = torch.randn(2, 3, 8)
    s = torch.tensor([0.5, 2.0, -1.0]).view(1, 3, 1)
    packed = torch.nn.MultiheadAttention(8, 2)
    wv, bv = packed.in_proj_weight[16:], packed.in_proj_bias[16:]
    want = (s * (y @ wv.T + bv)) @ packed.out_proj.weight.T + packed.out_proj.bias
    torch.testing.assert_close(value_projection(packed, y, s), want)
    torch.testing.assert_close(
        value_projection(packed, y), (y @ wv.T + bv) @ packed.out_proj.weight.T + packed.out_proj.bias
    )
    sep = torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert sep.in_proj_weight is None
    y6 = torch.randn(2, 3, 6)
    want = (y6 @ sep.v_proj_weight.T + sep.in_proj_bias[16:]) @ sep.out_proj.weight.T + sep.out_proj.bias
    torch.testing.assert_close(value_projection(sep, y6), want)
    nob = torch.nn.MultiheadAttention(8, 2, bias=False)
    want = (y @ nob.in_proj_weight[16:].T) @ nob.out_proj.weight.T
    torch.testing.assert_close(value_projection(nob, y), want)
    # block indices: -n..n-1, ints only
    assert [_layer_index(i, 4, "w") for i in (0, 3, -1, -4)] == [0, 3, 3, 0]
    for bad in (4, -5):
        with pytest.raises(ValueError, match=r"w: block .* outside 0..3 \(or -4..-1\)"):
            _layer_index(bad, 4, "w")
    for bad in (True, 1.0, "1"):
        with pytest.raises(ValueError, match="must be ints"):
            _layer_index(bad, 4, "w")
    # additive tensors: [1 + h*w, width] or [1 or B, 1 + h*w, width]
    x = torch.zeros(2, 7, 8, dtype=torch.float64)
    assert _additive_tensor(torch.ones(7, 8), (2, 3), x, "w").shape == (1, 7, 8)
    assert _additive_tensor(torch.ones(2, 7, 8), (2, 3), x, "w").dtype == torch.float64
    assert _additive_tensor(lambda g: torch.ones(1 + g[0] * g[1], 8), (2, 3), x, "w").shape == (1, 7, 8)
    for bad in (torch.ones(3, 7, 8), torch.ones(7, 9), torch.ones(6, 8), torch.ones(1, 1, 7, 8)):
        with pytest.raises(ValueError, match=r"additive prompt at w must be .* = \[2, 7, 8\] for grid \(2, 3\)"):
            _additive_tensor(bad, (2, 3), x, "w")
    # dropping prompts: [CLS], then the tokens after the prompts
    t = torch.arange(6.0).view(1, 6, 1)
    assert _drop_prompts(t, 2).flatten().tolist() == [0.0, 3.0, 4.0, 5.0]
    assert _drop_prompts(t, 0) is t
