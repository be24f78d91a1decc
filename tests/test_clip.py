"""CLIP loading and the dense-feature path (zeroseg/models/clip.py) on the tiny random-weight model."""

import hashlib
import warnings

import open_clip
import pytest
import torch

from zeroseg.errors import ConfigError
from zeroseg.models.clip import (
    TINY_MODEL,
    TINY_MODEL_CONFIG,
    ClipSpec,
    clip_fingerprint,
    dense_features,
    embed_dim,
    get_tokenizer,
    image_norm,
    load_clip,
    resize_pos_embed,
    weights_id,
)

TINY = {"model": TINY_MODEL, "random_init": True}


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip(ClipSpec(**TINY))


# ------------------------------------------------------------------ ClipSpec


@pytest.mark.parametrize(
    "kw, says",
    [
        ({}, "none of them"),  # random weights must be an explicit choice
        ({"pretrained": "openai", "random_init": True}, "pretrained and random_init"),
        ({"pretrained": "openai", "checkpoint": "x.pt"}, "pretrained and checkpoint"),
        ({"checkpoint": "x.pt", "random_init": True}, "checkpoint and random_init"),
    ],
)
def test_spec_needs_exactly_one_weight_source(kw, says):
    with pytest.raises(ConfigError, match="exactly one weight source") as e:
        ClipSpec(**kw)
    msg = str(e.value)
    assert says in msg
    for option in ("pretrained:", "checkpoint:", "random_init: true"):
        assert option in msg


def test_spec_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="pretrianed"):
        ClipSpec(pretrianed="openai")


def test_spec_in_a_stage_section_is_a_config_error(tmp_path):
    from pipeline.config import validate_section
    from pipeline.errors import ConfigError as PlanError
    from stages.embed_text import EmbedTextConfig

    with pytest.raises(PlanError, match="exactly one weight source"):
        validate_section("embed_text", EmbedTextConfig, {"clip": {"model": TINY_MODEL}}, tmp_path / "c.yaml")
    conf = validate_section("embed_text", EmbedTextConfig, {"clip": TINY}, tmp_path / "c.yaml")
    assert conf.clip == ClipSpec(**TINY)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ConfigError, match="ViT-B-16") as e:
        load_clip(ClipSpec(model="ViT-B-61", random_init=True))
    assert "not an open_clip model" in str(e.value)


def test_unknown_tag_lists_the_model_tags():
    with pytest.raises(ConfigError, match="openai"):  # no download is attempted for a bad tag
        load_clip(ClipSpec(model="ViT-B-16", pretrained="opneai"))


def test_openai_tag_forces_quickgelu_and_download_failure_is_explained(monkeypatch):
    """The OpenAI weights were trained with QuickGELU; open_clip 3 only warns when the config
    lacks it, so load_clip must force it. No network here: creation is stubbed."""
    calls = []

    def fake_create_model(name, pretrained=None, **kw):
        calls.append((name, pretrained, kw))
        raise RuntimeError("Failed to download weights for tag 'openai': no network")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(ConfigError, match="clip.checkpoint"):
        load_clip(ClipSpec(model="ViT-B-16", pretrained="openai"))
    assert calls == [("ViT-B-16", "openai", {"device": "cpu", "force_quick_gelu": True})]
    calls.clear()
    with pytest.raises(ConfigError):
        load_clip(ClipSpec(model="ViT-B-16", pretrained="laion2b_s34b_b88k"))
    assert calls[0][2]["force_quick_gelu"] is False
    assert weights_id(ClipSpec(model="ViT-B-16", pretrained="openai")) == "openai"


def test_missing_json_config_path():
    with pytest.raises(ConfigError, match="no such file"):
        load_clip(ClipSpec(model="configs/nope.json", random_init=True))


# ------------------------------------------------------------------ loading


def test_random_init_is_loud_deterministic_and_keeps_global_rng(tiny):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS.*not meaningful"):
        m = load_clip(ClipSpec(**TINY))
    assert torch.equal(torch.rand(3), expected)  # the global RNG stream is untouched
    assert isinstance(m, open_clip.model.CLIP) and not m.training
    assert embed_dim(m) == 64
    # every process building this spec gets the same weights (embed_text and evaluate must agree)
    for (k, a), b in zip(m.state_dict().items(), tiny.state_dict().values()):
        assert torch.equal(a, b), k
    assert weights_id(ClipSpec(**TINY)) == "random-init"
    assert image_norm(m) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


def test_image_norm_falls_back_to_legacy_attributes():
    """open_clip's legacy OpenAI loader sets only ``visual.image_mean`` / ``image_std``."""
    visual = torch.nn.Module()
    visual.image_mean, visual.image_std = (0.5, 0.25, 0.125), (0.1, 0.2, 0.3)
    assert image_norm(visual) == ((0.5, 0.25, 0.125), (0.1, 0.2, 0.3))
    visual.preprocess_cfg = {"mean": (0.4, 0.4, 0.4), "std": (0.2, 0.2, 0.2)}  # wins when present
    assert image_norm(visual) == ((0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    assert image_norm(torch.nn.Module()) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


def test_model_as_json_config_path(tiny):
    spec = ClipSpec(model=str(TINY_MODEL_CONFIG), random_init=True)
    with pytest.warns(UserWarning):
        m = load_clip(spec)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), tiny.state_dict().values()))
    digest = hashlib.sha256(TINY_MODEL_CONFIG.read_bytes()).hexdigest()
    assert clip_fingerprint(spec) == f"weights=random-init;model_config=sha256:{digest}"
    assert clip_fingerprint(ClipSpec(**TINY)) == "weights=random-init"


def _perturbed_state(model):
    g = torch.Generator().manual_seed(7)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def test_checkpoint_round_trip(tiny, tmp_path):
    sd = _perturbed_state(tiny)  # differs from the random-init weights
    ref = open_clip.create_model(TINY_MODEL)
    ref.load_state_dict(sd)
    ref.eval()
    path = tmp_path / "tiny.pt"
    torch.save(sd, path)
    spec = ClipSpec(model=TINY_MODEL, checkpoint=str(path))
    m = load_clip(spec)
    x = torch.randn(2, 3, 224, 224)
    tok = get_tokenizer(spec)(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        assert torch.allclose(m.encode_image(x), ref.encode_image(x), atol=1e-6)
        assert torch.allclose(m.encode_text(tok), ref.encode_text(tok), atol=1e-6)
        assert not torch.allclose(m.encode_image(x), tiny.encode_image(x), atol=1e-4)
    first = weights_id(spec)
    assert first == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    # a changed file changes the id (and so every key that depends on it)
    sd["logit_scale"] = sd["logit_scale"] + 1
    torch.save(sd, path)
    assert weights_id(spec) != first
    assert weights_id(spec) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    # wrapped {"state_dict": ...} checkpoints load too
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pt")
    m2 = load_clip(ClipSpec(model=TINY_MODEL, checkpoint=str(tmp_path / "wrapped.pt")))
    assert torch.equal(m2.logit_scale, sd["logit_scale"])


def test_checkpoint_with_missing_or_extra_keys_is_an_error(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    del sd["visual.proj"]
    sd["visual.extra_head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ConfigError) as e:
        load_clip(ClipSpec(model=TINY_MODEL, checkpoint=str(tmp_path / "bad.pt")))
    assert "visual.proj" in str(e.value) and "visual.extra_head.weight" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_clip(ClipSpec(model=TINY_MODEL, checkpoint=str(tmp_path / "missing.pt")))
    with pytest.raises(ConfigError, match="does not exist"):
        weights_id(ClipSpec(model=TINY_MODEL, checkpoint=str(tmp_path / "missing.pt")))


def test_tokenizer_shape():
    tok = get_tokenizer(ClipSpec(**TINY))(["a photo of a cat.", "x"])
    assert tok.shape == (2, 77) and tok.dtype == torch.long


# ------------------------------------------------------------------ dense features


def test_dense_cls_equals_encode_image_at_native_size(tiny):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cls, patches = dense_features(tiny.visual, x)
        ref = tiny.encode_image(x)
    assert cls.shape == (2, 64) and patches.shape == (2, 64, 14, 14)
    torch.testing.assert_close(cls, ref, atol=1e-5, rtol=1e-5)


def test_dense_nonsquare_input_uses_interpolated_positions(tiny):
    import copy

    x = torch.randn(1, 3, 160, 320)
    with torch.no_grad():
        cls, patches = dense_features(tiny.visual, x)
    assert patches.shape == (1, 64, 10, 20)
    # the same tower with its positional embedding resized by hand, run through open_clip's own
    # forward at 160x320, gives the same image embedding
    v = copy.deepcopy(tiny.visual)
    v.positional_embedding = torch.nn.Parameter(resize_pos_embed(v.positional_embedding, (14, 14), (10, 20)))
    with torch.no_grad():
        ref = v(x)
    torch.testing.assert_close(cls, ref, atol=1e-5, rtol=1e-5)


def test_resize_pos_embed_keeps_cls_and_constants():
    pos = torch.randn(1 + 4 * 4, 8)
    assert resize_pos_embed(pos, (4, 4), (4, 4)) is pos
    const = torch.cat([torch.randn(1, 8), torch.ones(16, 1) * torch.arange(8.0)], dim=0)
    out = resize_pos_embed(const, (4, 4), (3, 7))
    assert out.shape == (1 + 21, 8)
    assert torch.equal(out[0], const[0])
    torch.testing.assert_close(out[1:], torch.ones(21, 1) * torch.arange(8.0))  # bicubic keeps constants
    with pytest.raises(ValueError):
        resize_pos_embed(pos, (5, 5), (4, 4))


def test_dense_patches_skip_the_last_query_key_attention(tiny):
    """Patches come from the last block's value path: changing its query/key weights changes the
    [CLS] output but not the patch embeddings; changing the value weights changes both."""
    import copy

    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        cls0, p0 = dense_features(tiny.visual, x)
        v = copy.deepcopy(tiny.visual)
        attn = v.transformer.resblocks[-1].attn
        e = attn.embed_dim
        attn.in_proj_weight[: 2 * e] += torch.randn(2 * e, e)
        cls1, p1 = dense_features(v, x)
        assert torch.equal(p0, p1)
        assert not torch.allclose(cls0, cls1, atol=1e-4)
        attn.in_proj_weight[2 * e :] += 0.5 * torch.randn(e, e)
        _, p2 = dense_features(v, x)
        assert not torch.allclose(p0, p2, atol=1e-4)


def test_dense_patch_matches_manual_value_path(tiny):
    """One patch, computed by hand from the last block's input (MaskCLIP's released ViT code:
    v = out_proj(W_v ln_1(x) + b_v) + x; v = v + mlp(ln_2(v)); ln_post; @ proj)."""
    vis = tiny.visual
    last = vis.transformer.resblocks[-1]
    seen = {}
    h = last.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        vis(x)  # captures the last block's input through open_clip's own forward
        h.remove()
        _, patches = dense_features(vis, x)
        tok = seen["x"][0, 1 + 3 * 14 + 5]  # patch (row 3, col 5)
        e = last.attn.embed_dim
        val = torch.nn.functional.linear(
            last.ln_1(tok), last.attn.in_proj_weight[2 * e :], last.attn.in_proj_bias[2 * e :]
        )
        u = tok + last.attn.out_proj(val)
        u = u + last.mlp(last.ln_2(u))
        ref = vis.ln_post(u) @ vis.proj
    torch.testing.assert_close(patches[0, :, 3, 5], ref, atol=1e-5, rtol=1e-5)


def test_dense_features_both_layouts(tiny):
    import copy

    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cls0, p0 = dense_features(tiny.visual, x)
        v = copy.deepcopy(tiny.visual)
        v.transformer.batch_first = False  # sequence-first layout, as older open_clip models
        for blk in v.transformer.resblocks:
            blk.attn.batch_first = False
        cls1, p1 = dense_features(v, x)
    torch.testing.assert_close(cls1, cls0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p1, p0, atol=1e-5, rtol=1e-5)


def test_dense_features_rejects_bad_inputs(tiny):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        dense_features(tiny.visual, torch.randn(3, 224, 224))
    with pytest.raises(ValueError, match="smaller than one patch"):
        dense_features(tiny.visual, torch.randn(1, 3, 8, 224))
    with pytest.raises(ValueError, match="VisionTransformer"):
        dense_features(torch.nn.Linear(2, 2), torch.randn(1, 3, 224, 224))


def test_size_helpers_and_the_nearest_valid_input_size(tiny):
    from zeroseg.errors import ConfigError
    from zeroseg.models.clip import check_input_size, embed_dim, native_input_size, patch_size

    assert embed_dim(tiny) == embed_dim(tiny.visual) == 64
    assert native_input_size(tiny) == (224, 224) and patch_size(tiny) == (16, 16)
    fake = torch.nn.Module()
    fake.image_size, fake.patch_size = (96, 160), (8, 16)  # non-square everything
    assert native_input_size(fake) == (96, 160) and patch_size(fake) == (8, 16)
    fake.image_size, fake.patch_size = 64, 4
    assert native_input_size(fake) == (64, 64) and patch_size(fake) == (4, 4)
    with pytest.raises(ValueError, match="has no patch size"):
        patch_size(torch.nn.Module())
    fake.patch_size = (8, 16)
    check_input_size(fake, [8, 16], "k")  # one patch
    check_input_size(fake, (96, 160), "k")
    # [70, 40] with patches 8 x 16: 70 % 8 = 6 -> rows round(70/8) = 9 -> 72; cols round(40/16) = 2 -> 32
    with pytest.raises(
        ConfigError, match=r"k \[70, 40\] is not a multiple of the CLIP patch size \[8, 16\]; use e.g. \[72, 32\]"
    ):
        check_input_size(fake, [70, 40], "k")
    # a remainder in the width only; a size below one patch suggests one patch: [3, 20] -> [8, 16]
    with pytest.raises(ConfigError, match=r"\[16, 20\] .* use e.g. \[16, 16\]"):
        check_input_size(fake, [16, 20], "k")
    with pytest.raises(ConfigError, match=r"use e.g. \[8, 16\]"):
        check_input_size(fake, [3, 20], "k")


def test_dense_visual_checks_each_unsupported_tower(tiny):
    import copy

    from zeroseg.models.clip import check_dense_visual

    check_dense_visual(tiny.visual)
    v = copy.deepcopy(tiny.visual)
    v.pool_type = "avg"
    with pytest.raises(ValueError, match="pool_type='avg'"):
        check_dense_visual(v)
    v = copy.deepcopy(tiny.visual)
    v.attn_pool = torch.nn.Identity()
    with pytest.raises(ValueError, match="no attentional pooler"):
        check_dense_visual(v)
    v = copy.deepcopy(tiny.visual)
    v.transformer.resblocks[-1] = torch.nn.Identity()
    with pytest.raises(ValueError, match="the last block is a Identity"):
        check_dense_visual(v)
    v = copy.deepcopy(tiny.visual)
    v.positional_embedding = torch.nn.Parameter(v.positional_embedding.detach()[None])
    with pytest.raises(ValueError, match="positional embedding"):
        check_dense_visual(v)
    # images of exactly one patch are fine; one pixel less in either axis is not
    cls, patches = dense_features(tiny.visual, torch.randn(1, 3, 16, 32))
    assert cls.shape == (1, 64) and patches.shape == (1, 64, 1, 2)
    for shape in ((1, 3, 15, 32), (1, 3, 16, 15), (1, 1, 16, 16)):
        with pytest.raises(ValueError, match=r"smaller than one patch|\[B, 3, H, W\]"):
            dense_features(tiny.visual, torch.randn(*shape))
