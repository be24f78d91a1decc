"""ZegCLIP model (zeroseg/models/zegclip.py, zeroseg/models/prompt.py) on a tiny random-weight CLIP."""

import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from zeroseg.config.zegclip import ZegCLIPConfig
from zeroseg.errors import ConfigError
from zeroseg.models.prompt import PromptedVisionTransformer
from zeroseg.models.zegclip import (
    RD_FORMS,
    ZEGCLIP_DEFAULT_CONFIG,
    MaskDecoder,
    MaskDecoderLayer,
    RelationshipDescriptor,
    ZegCLIP,
    resolve_zegclip_config,
)

TINY = Path(__file__).resolve().parent.parent / "zeroseg" / "models" / "configs" / "zeroseg-tiny-vit.json"
D = 64  # tiny model: embed_dim 64, width 64, 2 layers, patch 16, native 224
SMALL = {"input_size": [64, 64], "decoder_width": 32, "decoder_heads": 4, "prompt_tokens": 3}


def tiny_clip(seed: int = 0):
    open_clip.add_model_config(str(TINY))
    torch.manual_seed(seed)
    return open_clip.create_model("zeroseg-tiny-vit").eval()


def images(b=2, size=64, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def text(c=3, seed=2):
    return F.normalize(torch.randn(c, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ------------------------------------------------------------------ deep prompt tuning (Eq. 3)


def test_zero_prompts_equals_plain_clip_at_native_size():
    clip = tiny_clip()
    x = images(2, 224)
    with torch.no_grad():
        ref = clip.encode_image(x)
        clip.visual.output_tokens = True
        _, ref_tokens = clip.visual(x)  # ln_post(last layer)[:, 1:], before proj
        clip.visual.output_tokens = False
        for variant in ("dpt", "fix"):
            enc = PromptedVisionTransformer(clip.visual, backbone=variant, prompt_tokens=0)
            g, patches, hw = enc(x)
            assert hw == (14, 14) and patches.shape == (2, 196, D)
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(patches, ref_tokens @ clip.visual.proj, rtol=1e-5, atol=1e-5)
        enc = PromptedVisionTransformer(clip.visual, backbone="dpt", prompt_tokens=4)
        g4, patches4, _ = enc(x)
    assert patches4.shape == (2, 196, D)  # prompt outputs are not returned
    assert not torch.allclose(g4, ref, atol=1e-3)  # prompts do change the encoding


def _reference_eq3(visual, prompts_by_layer, x):
    """Independent Eq. 3: layer l sees [g, P^l, H]; prompt outputs are dropped after every layer."""
    h = visual._embeds(x)  # open_clip's own conv1 + cls + pos + ln_pre
    for i, blk in enumerate(visual.transformer.resblocks):
        P = prompts_by_layer.get(i)
        if P is not None:
            h = blk(torch.cat([h[:, :1], P.unsqueeze(0).expand(h.shape[0], -1, -1), h[:, 1:]], 1))
            h = torch.cat([h[:, :1], h[:, 1 + P.shape[0] :]], 1)
        else:
            h = blk(h)
    h = visual.ln_post(h) @ visual.proj
    return h[:, 0], h[:, 1:]


@pytest.mark.parametrize("layers", [None, [2], [1]])
def test_deep_prompts_follow_eq3(layers):
    clip = tiny_clip()
    enc = PromptedVisionTransformer(
        clip.visual, backbone="dpt", prompt_tokens=5, prompt_layers=layers, prompt_dropout=0.0
    )
    expect_layers = [1, 2] if layers is None else layers
    assert enc.prompts.shape == (len(expect_layers), 5, 64)
    bound = (6.0 / (3 * 16 * 16 + 64)) ** 0.5  # VPT xavier-uniform range
    assert enc.prompts.abs().max() <= bound and enc.prompts.std() > bound / 4
    x = images(2, 224)
    with torch.no_grad():
        g, patches, _ = enc(x)
        rg, rp = _reference_eq3(clip.visual, {layer - 1: enc.prompts[r] for r, layer in enumerate(expect_layers)}, x)
    torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patches, rp, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside 1..2"):
        PromptedVisionTransformer(tiny_clip().visual, prompt_layers=[3])


def test_prompt_dropout_mask_is_per_image():
    """Dropout is applied after the prompts are expanded to the batch (ZegCLIP's released code):
    in train mode two identical images get different prompt masks, in eval mode none."""
    clip = tiny_clip()
    enc = PromptedVisionTransformer(clip.visual, backbone="dpt", prompt_tokens=8, prompt_layers=[1], prompt_dropout=0.5)
    seen = []
    hook = clip.visual.transformer.resblocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = images(1, 64).expand(2, -1, -1, -1)  # two identical images
    torch.manual_seed(0)
    with torch.no_grad():
        enc.train()
        g_train, _, _ = enc(x)
        enc.eval()
        g_eval, _, _ = enc(x)
    hook.remove()
    p_train, p_eval = seen[0][:, 1:9], seen[1][:, 1:9]  # prompt tokens right after [CLS]
    assert not torch.equal(p_train[0] == 0, p_train[1] == 0)  # per-image dropout masks
    assert not torch.allclose(g_train[0], g_train[1])
    torch.testing.assert_close(p_eval[0], enc.prompts[0])
    torch.testing.assert_close(p_eval[1], p_eval[0])
    torch.testing.assert_close(g_eval[1], g_eval[0])


def test_positional_embedding_resized_once_bicubic():
    clip = tiny_clip()
    old = clip.visual.positional_embedding.detach().clone()  # [1 + 14*14, 64]
    model = ZegCLIP(clip, SMALL)
    new = model.encoder.visual.positional_embedding
    assert new.shape == (1 + 4 * 4, 64) and model.encoder.grid_size == (4, 4)
    grid = old[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(16, 64)
    torch.testing.assert_close(new[0], old[0])
    torch.testing.assert_close(new[1:], expect)
    assert model.input_size == (64, 64) and len(model.mean) == 3 and len(model.std) == 3
    assert not new.requires_grad


# ------------------------------------------------------------------ RD (Eq. 8, Table 4) and decoder (Eq. 2)


def test_relationship_descriptor_forms():
    t, g = text(3), F.normalize(torch.randn(2, D), dim=-1)
    for form, (k, _) in RD_FORMS.items():
        rd = RelationshipDescriptor(D, 32, form)
        assert rd.describe(t, g).shape == (2, 3, k * D), form
        assert rd(t, g).shape == (2, 3, 32), form
    assert {"tg_t", "t", "tg", "t_plus_g", "t_g"} <= set(RD_FORMS)
    th = RelationshipDescriptor(D, 32, "tg_t").describe(t, g)
    torch.testing.assert_close(th[1, 2], torch.cat([t[2] * g[1], t[2]]))  # Eq. 8: [t * g, t]
    tg = RelationshipDescriptor(D, 32, "t_g").describe(t, g)
    torch.testing.assert_close(tg[0, 1], torch.cat([t[1], g[0]]))
    plain = RelationshipDescriptor(D, 32, "t").describe(t, g)
    assert torch.equal(plain[0], plain[1])  # no image prior
    with pytest.raises(ValueError, match="rd form"):
        RelationshipDescriptor(D, 32, "t*g")


def test_decoder_layer_masks_are_scaled_qk():
    torch.manual_seed(0)
    q, mem = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    for heads in (1, 2):
        layer = MaskDecoderLayer(8, heads, dropout=0.0).eval()
        q2, logits = layer(q, mem)
        assert q2.shape == (2, 3, 8) and logits.shape == (2, 3, 5)
        Q, K = layer.q_proj(q), layer.k_proj(mem)
        dh = 8 // heads
        expect = torch.stack(
            [
                Q[..., h * dh : (h + 1) * dh] @ K[..., h * dh : (h + 1) * dh].transpose(1, 2) / dh**0.5
                for h in range(heads)
            ]
        ).mean(0)
        torch.testing.assert_close(logits, expect)  # Eq. 2 (heads=1), head-averaged otherwise


def test_decoder_shapes_all_layers():
    dec = MaskDecoder(D, width=32, layers=3, heads=4, self_attn=True).eval()
    out = dec(text(5), F.normalize(torch.randn(2, D), dim=-1), torch.randn(2, 12, D), (3, 4))
    assert len(out) == 3 and all(o.shape == (2, 5, 3, 4) for o in out)
    with pytest.raises(ValueError, match="grid"):
        dec(text(5), torch.randn(2, D), torch.randn(2, 12, D), (3, 3))


# ------------------------------------------------------------------ the segmenter


def test_forward_shapes_scores_and_class_count():
    model = ZegCLIP(tiny_clip(), SMALL).eval()
    x = images(2, 64)
    with torch.no_grad():
        s_train = model(x, text(3))  # seen classes only
        s_all = model(x, text(5))  # all classes at inference
        logits = model.mask_logits(x, text(5))
        layers = model.mask_logits(x, text(5), all_layers=True)
    assert s_train.shape == (2, 3, 4, 4) and s_all.shape == (2, 5, 4, 4)
    assert torch.all((s_all > 0) & (s_all < 1))
    torch.testing.assert_close(s_all, torch.sigmoid(logits))
    assert len(layers) == 3 and torch.equal(layers[-1], logits)
    with pytest.raises(ValueError, match="text_embeddings"):
        model(x, torch.randn(5, D + 1))


def _step(model, lr=1e-2):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    target = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(3))
    target[:, :8] = 255
    loss = model.loss(images(2, 64), target, text(3))["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_dpt_step_changes_only_prompts_and_head():
    model = ZegCLIP(tiny_clip(), SMALL)
    changed = _step(model)
    assert "encoder.prompts" in changed
    assert any(k.startswith("head.rd.") for k in changed) and any(k.startswith("head.layers.2.") for k in changed)
    assert not any(k.startswith("encoder.visual.") for k in changed)
    assert all(p.grad is None for p in model.encoder.visual.parameters())
    assert set(changed) <= set(model.trainable_names())


def test_fix_has_no_prompts_and_frozen_backbone():
    model = ZegCLIP(tiny_clip(), {**SMALL, "backbone": "fix"})
    assert model.encoder.prompts is None
    assert not any("prompt" in k for k in model.state_dict())
    changed = _step(model)
    assert changed and all(k.startswith("head.") for k in changed)


def test_ft_trains_the_backbone():
    model = ZegCLIP(tiny_clip(), {**SMALL, "backbone": "ft"})
    assert model.encoder.prompts is None
    changed = _step(model)
    assert "encoder.visual.conv1.weight" in changed
    assert any(k.startswith("encoder.visual.transformer.resblocks.0.") for k in changed)
    assert set(model.trainable_names()) == set(model.state_dict())


def test_trainable_state_dict_roundtrip_is_strict():
    a = ZegCLIP(tiny_clip(seed=0), SMALL).eval()
    _step(a)
    a.eval()
    sd = a.trainable_state_dict()
    assert "encoder.prompts" in sd and not any(k.startswith("encoder.visual.") for k in sd)
    b = ZegCLIP(tiny_clip(seed=0), SMALL).eval()  # same CLIP weights, fresh prompts + head
    x, t = images(1, 64), text(4)
    with torch.no_grad():
        assert not torch.allclose(a(x, t), b(x, t))
        b.load_trainable_state_dict(sd)
        torch.testing.assert_close(a(x, t), b(x, t))
    with pytest.raises(ValueError, match="missing"):
        b.load_trainable_state_dict({k: v for k, v in sd.items() if k != "encoder.prompts"})
    with pytest.raises(ValueError, match="unexpected"):
        b.load_trainable_state_dict({**sd, "encoder.visual.proj": a.encoder.visual.proj})
    fix = ZegCLIP(tiny_clip(seed=0), {**SMALL, "backbone": "fix"})
    with pytest.raises(ValueError, match="unexpected"):
        fix.load_trainable_state_dict(sd)  # prompts do not exist in Baseline-Fix


def test_config_validation():
    with pytest.raises(ConfigError, match="prompt_tokens"):
        ZegCLIP(tiny_clip(), {"prompt_token": 4})
    with pytest.raises(ConfigError, match="backbone"):
        ZegCLIP(tiny_clip(), {"backbone": "lora"})
    with pytest.raises(ConfigError, match="rd"):
        ZegCLIP(tiny_clip(), {"rd": "tgt"})
    with pytest.raises(ConfigError, match="divisible"):
        ZegCLIP(tiny_clip(), {"decoder_width": 30, "decoder_heads": 4})
    with pytest.raises(ConfigError, match=r"model.input_size \[72, 64\] is not a multiple of the CLIP patch size"):
        ZegCLIP(tiny_clip(), {"input_size": [72, 64]})
    model = ZegCLIP(tiny_clip(), {"input_size": 32, "rd": "t_g", "loss": "ce"})
    assert isinstance(model.cfg, ZegCLIPConfig) and model.cfg.input_size == (32, 32) and model.head.rd.in_dim == 2 * D


@pytest.mark.parametrize("value", [[], "12", [1, "2"], [True], [0], [1.0], 3])
def test_prompt_layers_must_be_a_nonempty_int_list(value):
    with pytest.raises(ConfigError, match=r"model.prompt_layers must be a non-empty list of 1-based layer numbers"):
        resolve_zegclip_config({"prompt_layers": value})


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "10", None])
def test_prompt_tokens_must_be_a_positive_int(value):
    with pytest.raises(ConfigError, match=r"model.prompt_tokens must be a positive int"):
        resolve_zegclip_config({"prompt_tokens": value})


def test_prompt_settings_accepted():
    cfg = resolve_zegclip_config({"prompt_layers": (1, 2), "prompt_tokens": 1})
    assert cfg.prompt_layers == [1, 2] and cfg.prompt_tokens == 1
    assert resolve_zegclip_config().prompt_layers is None  # every layer (Table 8)
    typed = ZegCLIPConfig(prompt_tokens=3)
    assert resolve_zegclip_config(typed) is typed  # a validated config is taken as it is


@pytest.mark.parametrize("kind", ["focal_dice", "ce"])
def test_few_steps_reduce_the_loss(kind):
    torch.manual_seed(0)
    model = ZegCLIP(tiny_clip(), {**SMALL, "loss": kind, "prompt_dropout": 0.0, "decoder_dropout": 0.0})
    opt = torch.optim.AdamW(model.optimizer_param_groups(0.01), lr=1e-2)
    x, t = images(2, 64), text(3)
    # a fixed target: left half class 0, right half class 1 (image 0) / class 2 (image 1), a band ignored
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    target[0, :, 32:] = 1
    target[1, :, 32:] = 2
    target[:, 28:36] = 255
    model.train()
    losses = []
    for _ in range(15):
        loss = model.loss(x, target, t)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses  # ~0.45x (focal_dice) / ~0.4x (ce) at 15 steps


def test_is_a_segmenter_and_its_schema_names_every_rd_form():
    from zeroseg.config.zegclip import RD_FORM_NAMES, ZegCLIPConfig
    from zeroseg.models import Segmenter

    assert issubclass(ZegCLIP, Segmenter) and ZegCLIP.scores_are_probabilities
    assert set(RD_FORM_NAMES) == set(RD_FORMS)  # the torch-free schema accepts exactly the defined forms
    assert ZEGCLIP_DEFAULT_CONFIG == ZegCLIPConfig().model_dump(mode="json")


def test_lr_schedule_is_the_released_poly_with_warmup_and_min_lr():
    """mmcv's poly (to an absolute min_lr) times its linear warm-up, by hand: base 2e-4 (2e-5 x
    lr_mult 10), min_lr 1e-6, power 0.9, warm-up 4 steps from ratio 1e-6, 10 steps in all."""
    from zeroseg.models.zegclip import zegclip_lr_factor

    b, m, r = 2e-4, 1e-6, 1e-6

    def f(s):
        return zegclip_lr_factor(s, 10, b, min_lr=m, power=0.9, warmup_steps=4, warmup_ratio=r)

    assert f(0) == pytest.approx(((b - m) * 1.0 + m) * r / b)  # warm(0) = ratio
    warm2 = 1 - (1 - 2 / 4) * (1 - r)  # = 0.5000005
    assert f(2) == pytest.approx(((b - m) * 0.8**0.9 + m) * warm2 / b)
    assert f(4) == pytest.approx(((b - m) * 0.6**0.9 + m) / b)  # warm-up over
    assert f(10) * b == pytest.approx(m)  # ends at min_lr, not 0
    assert zegclip_lr_factor(10, 10, b, min_lr=0.0, warmup_steps=0) == 0.0  # the no-min_lr variant


# ====================================================================== equations pinned by hand
# Each test below computes its expected values by hand (small tensors, terms in the comments) and
# fails if the corresponding term of ZegCLIP is wrong.


def test_rd_eq8_and_table4_forms_by_hand():
    """t = (1, 2), g = (3, 4): t*g = (3, 8), t+g = (4, 6), t-g = (-2, -2), |t-g| = (2, 2)."""
    t, g = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    expect = {
        "t": [1, 2],
        "tg": [3, 8],
        "abs_t_minus_g": [2, 2],
        "t_plus_g": [4, 6],
        "t_g": [1, 2, 3, 4],
        "tg_t": [3, 8, 1, 2],  # Eq. 8: concat[t * g, t], ZegCLIP's choice (Table 4, red line)
        "t_minus_g_t": [-2, -2, 1, 2],
        "tg_t_plus_g": [3, 8, 4, 6],
        "t_plus_g_t": [4, 6, 1, 2],
        "tg_t_minus_g": [3, 8, -2, -2],
        "tg_abs_t_minus_g_t": [3, 8, 2, 2, 1, 2],
    }
    assert set(expect) == set(RD_FORMS)
    for form, vec in expect.items():
        got = RelationshipDescriptor(2, 4, form).describe(t, g)
        assert got.tolist() == [[[float(v) for v in vec]]], form


def test_rd_projection_by_hand():
    """The learnable projection k*D -> width (Sec. 3.5): W = [[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1]],
    b = (0.5, 0, -1); t_hat = (3, 8, 1, 2) -> W t_hat + b = (3 + 2 + .5, 8 + 1, 14 - 1) = (5.5, 9, 13)."""
    rd = RelationshipDescriptor(2, 3, "tg_t")
    with torch.no_grad():
        rd.proj.weight.copy_(torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1]]))
        rd.proj.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
        out = rd(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]))
    assert out.tolist() == [[[5.5, 9.0, 13.0]]]


def _identity_layer(width, heads, ffn_bias=None):
    layer = MaskDecoderLayer(width, heads, ffn_ratio=4.0, dropout=0.0).eval()
    with torch.no_grad():
        for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
            lin.weight.copy_(torch.eye(width))
            lin.bias.zero_()
        for lin in (layer.ffn[0], layer.ffn[3]):
            lin.weight.zero_()
            lin.bias.zero_()
        if ffn_bias is not None:
            layer.ffn[3].bias.copy_(torch.tensor(ffn_bias))
    return layer


def test_decoder_mask_logits_eq2_by_hand():
    """Eq. 2, Masks = Q K^T / sqrt(d_k), with identity phi_q / phi_k, q = (1, 2) and patch tokens
    k1 = (3, 4), k2 = (-1, 1):
      heads = 1 (d_k = 2): (1*3 + 2*4) / sqrt 2 = 11 / 1.41421 = 7.7782, (-1 + 2) / sqrt 2 = 0.7071
      heads = 2 (d_k = 1 per head, averaged over heads as the released head does):
        head 0: 1*3 = 3, 1*(-1) = -1; head 1: 2*4 = 8, 2*1 = 2 -> means (5.5, 0.5)."""
    q = torch.tensor([[[1.0, 2.0]]])
    mem = torch.tensor([[[3.0, 4.0], [-1.0, 1.0]]])
    with torch.no_grad():
        _, l1 = _identity_layer(2, 1)(q, mem)
        _, l2 = _identity_layer(2, 2)(q, mem)
    torch.testing.assert_close(l1, torch.tensor([[[11 / 2**0.5, 1 / 2**0.5]]]))
    torch.testing.assert_close(l2, torch.tensor([[[5.5, 0.5]]]))


def test_decoder_layer_updates_queries_post_norm_by_hand():
    """Cross-attention + FFN with post-norm residuals (released TPN_DecoderLayer), width 3, 1 head,
    identity projections, FFN = constant (0, 0, 1), LayerNorms at their init (eps 1e-5):

    q = (1, 0, 0); patch tokens m1 = (1, 1, 0), m2 = (0, 0, 2)
    logits = (q.m1, q.m2) / sqrt 3 = (0.5773503, 0)          <- the returned mask logits (Eq. 2)
    softmax = (e^.57735 / (e^.57735 + 1), 1 / (...)) = (0.6404575, 0.3595425)
    attention output = .6404575 m1 + .3595425 m2 = (0.6404575, 0.6404575, 0.7190850)
    residual q + out = (1.6404575, 0.6404575, 0.7190850); mean 1, var 0.2061233
    LN -> (x - 1) / sqrt(0.2061233 + 1e-5) = (1.4106402, -0.7919107, -0.6187295)
    + FFN (0, 0, 1) = (1.4106402, -0.7919107, 0.3812705); mean 1/3, var 0.8096874
    LN -> (1.1972313, -1.2505048, 0.0532735)  <- the updated query."""
    layer = _identity_layer(3, 1, ffn_bias=[0.0, 0.0, 1.0])
    q = torch.tensor([[[1.0, 0.0, 0.0]]])
    mem = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]])
    with torch.no_grad():
        q2, logits = layer(q, mem)
    torch.testing.assert_close(logits, torch.tensor([[[0.5773503, 0.0]]]))
    torch.testing.assert_close(q2, torch.tensor([[[1.1972313, -1.2505048, 0.0532735]]]), rtol=1e-5, atol=1e-6)


def test_decoder_feeds_each_layer_the_updated_queries():
    """Layer l + 1's mask logits come from layer l's *updated* queries (and the same memory), not
    from the relationship-descriptor queries again."""
    torch.manual_seed(0)
    dec = MaskDecoder(D, width=8, layers=3, heads=2).eval()
    t, g, patches = text(4), F.normalize(torch.randn(2, D), dim=-1), F.normalize(torch.randn(2, 6, D), dim=-1)
    with torch.no_grad():
        out = dec(t, g, patches, (2, 3))
        q0 = dec.rd(t, g)
        mem = dec.patch_proj(patches)
        q1, l1 = dec.layers[0](q0, mem)
        q2, l2 = dec.layers[1](q1, mem)
        _, l3 = dec.layers[2](q2, mem)
        _, l2_stale = dec.layers[1](q0, mem)
    for got, expect in zip(out, (l1, l2, l3)):
        torch.testing.assert_close(got, expect.reshape(2, 4, 2, 3))
    assert not torch.allclose(out[1], l2_stale.reshape(2, 4, 2, 3), atol=1e-4)


class _FixedEncoder(torch.nn.Module):
    """Stands in for the image encoder: fixed (g, patches, hw) whatever the images."""

    def __init__(self, g, patches, hw):
        super().__init__()
        self.g, self.patches, self.hw = g, patches, hw
        self.visual = torch.nn.Identity()

    def forward(self, images):
        return self.g, self.patches, self.hw


def _unit(i, scale=1.0):
    v = torch.zeros(D)
    v[i] = scale
    return v


def test_g_patches_and_t_are_l2_normalised_before_rd_and_decoder():
    """ZegCLIP compares unit vectors (CLIP's cosine space; released backbone normalises g and the
    patch tokens, text embeddings are normalised): the head must get
      t: (3 e0 + 4 e1) -> (.6 e0 + .8 e1),  -2 e2 -> -e2
      g: 5 e1 -> e1
      patches: (1, 1, 1, 1, 0, ...) -> (.5, .5, .5, .5, 0, ...),  7 e3 -> e3
    and Eq. 8's t * g is then (0, .8, 0, ...) for class 0."""
    model = ZegCLIP(tiny_clip(), SMALL).eval()
    g = _unit(1, 5.0)[None]
    patches = torch.stack([torch.cat([torch.ones(4), torch.zeros(D - 4)]), _unit(3, 7.0)])[None]
    model.encoder = _FixedEncoder(g, patches, (1, 2))
    t_in = torch.stack([3 * _unit(0) + 4 * _unit(1), _unit(2, -2.0)])
    seen = []
    model.head.register_forward_pre_hook(lambda m, args: seen.append(args))
    with torch.no_grad():
        logits = model.mask_logits(images(1, 32), t_in)
        t, gn, pn, hw = seen[0]
        torch.testing.assert_close(t, torch.stack([0.6 * _unit(0) + 0.8 * _unit(1), _unit(2, -1.0)]))
        torch.testing.assert_close(gn, _unit(1)[None])
        torch.testing.assert_close(
            pn, torch.stack([torch.cat([torch.full((4,), 0.5), torch.zeros(D - 4)]), _unit(3)])[None]
        )
        assert hw == (1, 2)
        torch.testing.assert_close(model.head.rd.describe(t, gn)[0, 0, :D], _unit(1, 0.8))
        # so any positive rescaling of the inputs leaves the mask logits unchanged
        model.encoder = _FixedEncoder(3 * g, patches * torch.tensor([0.1, 9.0])[None, :, None], (1, 2))
        torch.testing.assert_close(model.mask_logits(images(1, 32), 0.2 * t_in), logits)


def test_scores_are_the_sigmoid_of_the_last_layer_by_hand():
    """Sec. 3.4: one independent sigmoid per class; logits (0, ln 3, -ln 3) -> (.5, .75, .25)."""
    model = ZegCLIP(tiny_clip(), SMALL).eval()
    last = torch.tensor([0.0, math.log(3), -math.log(3)]).reshape(1, 3, 1, 1)
    model.head.forward = lambda t, g, p, hw: [torch.full_like(last, 7.0), last]
    with torch.no_grad():
        s = model(images(1, 64), text(3))
    torch.testing.assert_close(s, torch.tensor([0.5, 0.75, 0.25]).reshape(1, 3, 1, 1))


def test_zegclip_loss_is_eq6_with_the_documented_terms():
    """ZegCLIP.loss = 100 * focal + 1 * dice (ZEGCLIP_LOSS_WEIGHTS, no focal alpha, squared dice,
    ignored pixels left out; zeroseg/losses.py), on the two-image example of tests/test_losses.py:
    focal = (1/16) ln(4/3) + (1/4) ln 2 = 0.1912669,
    dice = ((1 - 3.5/3.8125) + (1 - 2.5/2.5625)) / 2 = 0.0531787  ->  19.1798712."""
    model = ZegCLIP(tiny_clip(), SMALL).eval()
    L3 = math.log(3)
    logits = torch.tensor([[[[L3, 0.0]], [[-L3, 0.0]]], [[[0.0, 5.0]], [[L3, 5.0]]]])
    target = torch.tensor([[[0, 0]], [[1, 255]]])
    model.mask_logits = lambda images, t, all_layers=False: logits  # same size: the bilinear resize is the identity
    out = model.loss(images(2, 64), target, text(2))
    focal = 0.0625 * math.log(4 / 3) + 0.25 * math.log(2)
    dice = ((1 - 3.5 / 3.8125) + (1 - 2.5 / 2.5625)) / 2
    assert out["focal"].item() == pytest.approx(focal, rel=1e-6)
    assert out["dice"].item() == pytest.approx(dice, rel=1e-6)
    assert out["loss"].item() == pytest.approx(100 * focal + dice, rel=1e-6)


def test_eq3_block_inputs_are_cls_own_prompts_patches():
    """Eq. 3 seen from inside the encoder: block l's input is [g, P^l, H] with P^l exactly this
    layer's prompts (eval: no dropout), i.e. block l-1's outputs at the prompt positions are
    discarded; a block without prompts gets [g, H] (previous prompts removed)."""
    for layers, expect_prompted in ((None, [True, True]), ([1], [True, False]), ([2], [False, True])):
        clip = tiny_clip()
        enc = PromptedVisionTransformer(clip.visual, prompt_tokens=3, prompt_layers=layers).eval()
        seen = []
        hooks = [
            b.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
            for b in clip.visual.transformer.resblocks
        ]
        with torch.no_grad():
            enc(images(2, 64))
        for h in hooks:
            h.remove()
        rows = iter(range(enc.prompts.shape[0]))
        for block_input, prompted in zip(seen, expect_prompted):
            if prompted:
                assert block_input.shape == (2, 1 + 3 + 16, 64)
                P = enc.prompts[next(rows)]
                assert torch.equal(block_input[0, 1:4], P) and torch.equal(block_input[1, 1:4], P)
            else:
                assert block_input.shape == (2, 1 + 16, 64)


# ====================================================================== released defaults, pinned


def test_default_config_is_the_released_voc_setting():
    """Expected values copied from the released VOC config as summarised in
    /work/shared/papers/released-code.md section 4 (mask_weight 100, dice 1, gamma 2; prompts in all
    12 layers, "_12_10" = 10 tokens) and the paper (Sec. 3.2: 3 decoder layers; Sec. 4.3: 512x512;
    Eq. 8 / Table 4: [t * g, t])."""
    assert ZEGCLIP_DEFAULT_CONFIG == {
        "backbone": "dpt",
        "prompt_tokens": 10,
        "prompt_layers": None,
        "prompt_dropout": 0.1,
        "rd": "tg_t",
        "decoder_layers": 3,
        "decoder_width": 512,
        "decoder_heads": 8,
        "decoder_ffn_ratio": 4.0,
        "decoder_dropout": 0.1,
        "decoder_self_attn": False,
        "input_size": [512, 512],
        "loss": "focal_dice",
        "loss_alpha": 100.0,
        "loss_beta": 1.0,
        "focal_gamma": 2.0,
    }
    assert resolve_zegclip_config().model_dump(mode="json") == ZEGCLIP_DEFAULT_CONFIG


# ------------------------------------------------------------------ PromptedVisionTransformer edges


def test_prompted_encoder_argument_checks_and_layer_mapping():
    with pytest.raises(ValueError, match="backbone must be one of"):
        PromptedVisionTransformer(tiny_clip().visual, backbone="lora")
    with pytest.raises(ValueError, match="prompt_tokens must be >= 0"):
        PromptedVisionTransformer(tiny_clip().visual, prompt_tokens=-1)
    with pytest.raises(ValueError, match=r"prompt_layers \[0\] outside 1..2"):
        PromptedVisionTransformer(tiny_clip().visual, prompt_layers=[0, 1])
    with pytest.raises(ValueError, match="duplicates"):
        PromptedVisionTransformer(tiny_clip().visual, prompt_layers=[1, 1])
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        PromptedVisionTransformer(tiny_clip().visual, input_size=(64, 72))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        PromptedVisionTransformer(tiny_clip().visual, input_size=(72, 64))
    v = tiny_clip().visual
    v.proj = None
    with pytest.raises(ValueError, match="no output projection"):
        PromptedVisionTransformer(v)
    v = tiny_clip().visual
    del v.ln_post
    with pytest.raises(ValueError, match="no attribute 'ln_post'"):
        PromptedVisionTransformer(v)
    v = tiny_clip().visual
    v.pool_type = "avg"
    with pytest.raises(ValueError, match="pool_type='avg'"):
        PromptedVisionTransformer(v)
    v = tiny_clip().visual
    v.attn_pool = torch.nn.Identity()
    with pytest.raises(ValueError, match="attentional pooler"):
        PromptedVisionTransformer(v)
    # layers given out of order: sorted; 1-based layer l is 0-based block l - 1 with row by order
    enc = PromptedVisionTransformer(tiny_clip().visual, prompt_tokens=2, prompt_layers=[2, 1], prompt_dropout=0.0)
    assert enc.prompt_layers == (1, 2) and enc.num_prompts == 2 and enc.num_layers == 2
    x = torch.zeros(3, 5, 64)
    torch.testing.assert_close(enc.layer_prompts(0, x), enc.prompts[0].expand(3, -1, -1))
    torch.testing.assert_close(enc.layer_prompts(1, x), enc.prompts[1].expand(3, -1, -1))
    assert enc.layer_prompts(2, x) is None
    enc = PromptedVisionTransformer(tiny_clip().visual, prompt_tokens=2, prompt_layers=[2], prompt_dropout=0.0)
    assert enc.layer_prompts(0, x) is None and enc.layer_prompts(1, x).shape == (3, 2, 64)
    assert isinstance(enc.prompt_dropout, torch.nn.Identity)
    assert "prompt_layers=[2]" in repr(enc) and "output_dim=64" in repr(enc) and "width=64" in repr(enc)
    # ft / fix: no prompts whatever prompt_tokens says
    for variant in ("ft", "fix"):
        e = PromptedVisionTransformer(tiny_clip().visual, backbone=variant, prompt_tokens=5)
        assert e.prompts is None and e.prompt_layers == () and e.num_prompts == 0
        assert all(p.requires_grad == (variant == "ft") for p in e.visual.parameters())
    # dpt with zero tokens: no prompt parameter
    assert PromptedVisionTransformer(tiny_clip().visual, prompt_tokens=0).prompts is None


def test_prompted_encoder_non_square_input_and_image_checks():
    clip = tiny_clip()
    old = clip.visual.positional_embedding.detach().clone()
    enc = PromptedVisionTransformer(clip.visual, prompt_tokens=1, input_size=(32, 48), prompt_dropout=0.0)
    # 32 x 48 pixels, patch 16 -> grid (2, 3): rows 2, columns 3 (a swapped axis gives (3, 2))
    assert enc.grid_size == (2, 3) and clip.visual.grid_size == (2, 3) and clip.visual.image_size == (32, 48)
    grid = old[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(2, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(6, 64)
    torch.testing.assert_close(clip.visual.positional_embedding[1:], expect)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    g, patches, hw = enc(x)
    assert hw == (2, 3) and patches.shape == (2, 6, 64) and g.shape == (2, 64)
    for bad in (
        torch.zeros(2, 1, 32, 48),
        torch.zeros(3, 32, 48),
        torch.zeros(1, 3, 32, 40),
        torch.zeros(1, 3, 40, 48),
    ):
        with pytest.raises(ValueError, match=r"images must be|not a multiple"):
            enc(bad)
    # native size kept when input_size equals it: the embedding is the same tensor values
    c2 = tiny_clip()
    before = c2.visual.positional_embedding.detach().clone()
    e2 = PromptedVisionTransformer(c2.visual, input_size=(224, 224))
    assert e2.grid_size == (14, 14)
    torch.testing.assert_close(c2.visual.positional_embedding.detach(), before)
    # fix runs under no_grad: no graph on the outputs; ft and dpt have one
    fix = PromptedVisionTransformer(tiny_clip().visual, backbone="fix", input_size=(32, 32))
    assert not fix(x[:, :, :, :32])[0].requires_grad
    ft = PromptedVisionTransformer(tiny_clip().visual, backbone="ft", input_size=(32, 32))
    assert ft(x[:, :, :, :32])[0].requires_grad


def test_label_logits_are_bilinear_without_corner_alignment_by_hand():
    """A 1 x 2 logit map [0, 4] upsampled to 1 x 4 (align_corners=False): source positions
    (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamped 0, then 0.25 and 0.75 of the way,
    then 1 -> [0, 1, 3, 4] (align_corners=True would give [0, 4/3, 8/3, 4]; nearest [0, 0, 4, 4])."""
    model = ZegCLIP(tiny_clip(), SMALL).eval()
    logits = torch.tensor([[[[0.0, 4.0]]]])
    model.mask_logits = lambda images, t, all_layers=False: logits
    out = model.label_logits(images(1, 64), text(1), (1, 4))
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 1.0, 3.0, 4.0]]]]))
    # loss upsamples to the target's size and takes [B, 1, H, W] targets; the config's weights,
    # gamma and loss kind reach the loss: CE of the upsampled logits [0, 1, 3, 4] vs class 0 of
    # two classes whose second logit map is 0: per pixel ln(1 + e^(-x)) for the class-0 logit x
    two = torch.tensor([[[[0.0, 4.0]], [[0.0, 0.0]]]])
    ce_model = ZegCLIP(tiny_clip(), {**SMALL, "loss": "ce"}).eval()
    ce_model.mask_logits = lambda images, t, all_layers=False: two
    target = torch.zeros(1, 1, 1, 4, dtype=torch.long)
    want = sum(math.log(1 + math.exp(-x)) for x in (0.0, 1.0, 3.0, 4.0)) / 4
    out = ce_model.loss(images(1, 64), target, text(2))
    assert set(out) == {"loss", "ce"} and out["loss"].item() == pytest.approx(want, rel=1e-6)
    # focal_dice with loss_alpha 3, loss_beta 0.5, focal_gamma 0 (plain BCE): class 0 positives
    # at logits [0, 1, 3, 4], class 1 negatives at 0 -> BCE per mask = mean ln(1 + e^-x) and ln 2;
    # one present mask -> focal = want + ln 2
    fd = ZegCLIP(tiny_clip(), {**SMALL, "loss_alpha": 3.0, "loss_beta": 0.5, "focal_gamma": 0.0}).eval()
    fd.mask_logits = lambda images, t, all_layers=False: two
    out = fd.loss(images(1, 64), target, text(2))
    assert out["focal"].item() == pytest.approx(want + math.log(2), rel=1e-6)
    assert out["loss"].item() == pytest.approx(3.0 * out["focal"].item() + 0.5 * out["dice"].item(), rel=1e-6)
    # an ignore value other than 255 is passed through
    t9 = torch.tensor([[[0, 9, 9, 9]]])
    out = ce_model.loss(images(1, 64), t9, text(2), ignore_index=9)
    assert out["loss"].item() == pytest.approx(math.log(2), rel=1e-6)


def test_text_embedding_checks_and_train_mode_of_the_tower():
    model = ZegCLIP(tiny_clip(), SMALL)
    x = images(1, 64)
    for bad in (torch.zeros(0, D), torch.zeros(2, D - 1), torch.zeros(1, 2, D), torch.zeros(D)):
        with pytest.raises(ValueError, match=rf"text_embeddings must be \[C >= 1, {D}\]"):
            model.mask_logits(x, bad)
    model.train()
    assert model.training and model.head.training and not model.encoder.visual.training
    ft = ZegCLIP(tiny_clip(), {**SMALL, "backbone": "ft"}).train()
    assert ft.encoder.visual.training
    model.eval()
    assert not model.head.training
    assert model.size_divisibility == 16 and model.input_size == (64, 64)
    # overrides win over the mapping and over a validated config
    assert resolve_zegclip_config({"prompt_tokens": 4}, prompt_tokens=6).prompt_tokens == 6
    typed = ZegCLIPConfig(prompt_tokens=3)
    over = resolve_zegclip_config(typed, decoder_layers=2)
    assert over is not typed and over.prompt_tokens == 3 and over.decoder_layers == 2
    assert ZegCLIP(tiny_clip(), SMALL, decoder_layers=2).cfg.decoder_layers == 2


def test_layer_prompts_follow_the_token_dtype_and_list_patch_sizes():
    enc = PromptedVisionTransformer(tiny_clip().visual, prompt_tokens=2, prompt_dropout=0.0)
    x = torch.zeros(2, 5, 64, dtype=torch.float64)
    p = enc.layer_prompts(1, x)
    assert p.dtype == torch.float64 and p.shape == (2, 2, 64)
    torch.testing.assert_close(p[1], enc.prompts[1].double())
    from zeroseg.models.prompt import _pair

    assert _pair([8, 16]) == (8, 16) and _pair((4, 2)) == (4, 2) and _pair(16) == (16, 16)
    # VPT's init range for patch 16, width 64: sqrt(6 / (3 * 16 * 16 + 64)) = sqrt(6 / 832) = 0.08492
    bound = math.sqrt(6 / 832)
    big = PromptedVisionTransformer(tiny_clip().visual, prompt_tokens=400, prompt_layers=[1])
    assert big.prompts.abs().max() <= bound and big.prompts.abs().max() > 0.99 * bound
    assert big.prompts.mean().abs() < 0.01 and big.prompts.min() < -0.99 * bound
