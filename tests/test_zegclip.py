"""ZegCLIP model (zeroseg/models/zegclip.py, zeroseg/models/prompt.py) on a tiny random-weight CLIP."""

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from zeroseg.errors import ConfigError
from zeroseg.models.prompt import PromptedVisionTransformer
from zeroseg.models.zegclip import (
    RD_FORMS,
    ZEGCLIP_PAPER_SETTINGS,
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
            h = torch.cat([h[:, :1], h[:, 1 + P.shape[0]:]], 1)
        else:
            h = blk(h)
    h = visual.ln_post(h) @ visual.proj
    return h[:, 0], h[:, 1:]


@pytest.mark.parametrize("layers", [None, [2], [1]])
def test_deep_prompts_follow_eq3(layers):
    clip = tiny_clip()
    enc = PromptedVisionTransformer(clip.visual, backbone="dpt", prompt_tokens=5, prompt_layers=layers, prompt_dropout=0.0)
    expect_layers = [1, 2] if layers is None else layers
    assert enc.prompts.shape == (len(expect_layers), 5, 64)
    bound = (6.0 / (3 * 16 * 16 + 64)) ** 0.5  # VPT xavier-uniform range
    assert enc.prompts.abs().max() <= bound and enc.prompts.std() > bound / 4
    x = images(2, 224)
    with torch.no_grad():
        g, patches, _ = enc(x)
        rg, rp = _reference_eq3(clip.visual, {l - 1: enc.prompts[r] for r, l in enumerate(expect_layers)}, x)
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
            [Q[..., h * dh:(h + 1) * dh] @ K[..., h * dh:(h + 1) * dh].transpose(1, 2) / dh ** 0.5 for h in range(heads)]
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
    assert model.cfg["input_size"] == [32, 32] and model.head.rd.in_dim == 2 * D
    assert ZEGCLIP_PAPER_SETTINGS["prompt_tokens"] == {"voc": 10, "coco": 100, "context": 35}


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
    assert cfg["prompt_layers"] == [1, 2] and cfg["prompt_tokens"] == 1
    assert resolve_zegclip_config()["prompt_layers"] is None  # every layer (Table 8)


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


def test_is_a_registered_segmenter():
    import zeroseg.models as models

    if not hasattr(models, "Segmenter"):
        pytest.skip("zeroseg.models.Segmenter not written yet")
    assert issubclass(ZegCLIP, models.Segmenter)
