"""ZegFormer (train_classifier.method zegformer): Eq. 3's fusion and the no-object handling on
worked examples computed by hand, the sub-images on a handcrafted image, the refusal of proposals
that do not fit, the template sets, and the sample DAG proposals -> classifier -> evaluate."""

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zeroseg.confusion import calibrated_argmax
from zeroseg.errors import DataError
from zeroseg.models.clip import TINY_MODEL, ClipSpec, get_tokenizer, load_clip
from zeroseg.models.zegformer import combine, mask_boxes, renormalise, seen_from_text, segment_probabilities, sub_images
from zeroseg.text import TEMPLATES, encode_class_names

TINY = ClipSpec(model=TINY_MODEL, random_init=True)
LAM = 2.0 / 3.0  # the released lambda_balance


# ------------------------------------------------------------------ Eq. 3 on worked examples
# 2 queries, 3 classes: classes 0 and 1 seen, class 2 unseen.
# Query 0 SSE probabilities (Eq. 1 softmax over 3 classes + no-object): 0.512, 0.216, 0.008 | 0.264
# (cubes: 0.8^3, 0.6^3, 0.2^3). Its CLIP branch: p' = 0.1, 0.15, 0.343 (0.7^3) | 0.407 no-object,
# where the no-object share comes from the SSE no-object logit appended to the CLIP logits.
# Query 1 (mostly no-object): p = 0.001, 0.008, 0.027 | 0.964; p' = 0.001, 0.001, 0.064 | 0.934.
P = [[0.512, 0.216, 0.008, 0.264], [0.001, 0.008, 0.027, 0.964]]
P_IMG = [[0.1, 0.15, 0.343, 0.407], [0.001, 0.001, 0.064, 0.934]]
SHIFT = [1.7, -3.0]  # arbitrary per-query logit offsets (a softmax does not see them)
SEEN = torch.tensor([True, True, False])


def _logits():
    """SSE logits ``log p + shift`` and CLIP logits chosen so that softmax([CLIP logits, SSE
    no-object logit]) is P_IMG: ``exp(L_no) / Z = P_IMG[q][3]`` gives ``Z``, and ``a_c = log(P_IMG[q][c] * Z)``."""
    sse, clip = [], []
    for q in range(2):
        sse.append([math.log(v) + SHIFT[q] for v in P[q]])
        log_z = math.log(P[q][3]) + SHIFT[q] - math.log(P_IMG[q][3])
        clip.append([math.log(P_IMG[q][c]) + log_z for c in range(3)])
    return torch.tensor([sse], dtype=torch.float64), torch.tensor([clip], dtype=torch.float64)


def test_eq3_fusion_released_by_hand():
    sse, clip = _logits()
    out = segment_probabilities(sse, clip, SEEN, LAM, "released")
    # ZegFormer-seg: p without its no-object column
    torch.testing.assert_close(out["zegformer_seg"][0].double(), torch.tensor([P[0][:3], P[1][:3]]).double())
    # ZegFormer-img: p' with the SSE no-object logit in the softmax's denominator, column dropped
    torch.testing.assert_close(out["zegformer_img"][0].double(), torch.tensor([P_IMG[0][:3], P_IMG[1][:3]]).double())
    # fused, seen c: p_c^(2/3) * mean_seen(p')^(1/3); unseen c: p_c^(1/3) * p'_c^(2/3)
    # q0: mean_seen(p') = (0.1 + 0.15) / 2 = 0.125 -> 0.5; 0.512^(2/3) = 0.64, 0.216^(2/3) = 0.36;
    #     unseen 0.008^(1/3) * 0.343^(2/3) = 0.2 * 0.49
    # q1: mean_seen(p') = 0.001 -> 0.1; 0.001^(2/3) = 0.01, 0.008^(2/3) = 0.04;
    #     unseen 0.027^(1/3) * 0.064^(2/3) = 0.3 * 0.16
    want = torch.tensor([[0.32, 0.18, 0.098], [0.001, 0.004, 0.048]], dtype=torch.float64)
    torch.testing.assert_close(out["zegformer"][0].double(), want, rtol=1e-5, atol=1e-7)


def test_no_object_logit_joins_the_clip_softmax():
    sse, clip = _logits()
    p_img = segment_probabilities(sse, clip, SEEN, LAM)["zegformer_img"][0].double()
    # without the appended SSE no-object logit, query 1's CLIP probabilities would be
    # (0.001, 0.001, 0.064) / 0.066 (= 0.0152, 0.0152, 0.9697): the no-object share keeps them small
    assert p_img[1, 2].item() == pytest.approx(0.064, rel=1e-6)
    # the no-object column is dropped after the softmax: the rest sums to 1 - no-object
    torch.testing.assert_close(p_img.sum(-1), torch.tensor([1 - 0.407, 1 - 0.934], dtype=torch.float64))
    # the same no-object logit in the SSE branch: p sums to 1 - 0.264 and 1 - 0.964
    p = segment_probabilities(sse, None, SEEN)["zegformer_seg"][0].double()
    torch.testing.assert_close(p.sum(-1), torch.tensor([1 - 0.264, 1 - 0.964], dtype=torch.float64))
    assert set(segment_probabilities(sse, None, SEEN)) == {"zegformer_seg"}  # no image branch


def test_fusion_all_classes_and_lambda_by_hand():
    sse, clip = _logits()
    # ENSEMBLING_ALL_CLS: every class p^(1/3) * p'^(2/3) (0.512^(1/3) = 0.8, 0.216^(1/3) = 0.6)
    got = segment_probabilities(sse, clip, SEEN, LAM, "all_classes")["zegformer"][0, 0].double()
    want = torch.tensor([0.8 * 0.1 ** (2 / 3), 0.6 * 0.15 ** (2 / 3), 0.2 * 0.49], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # lambda = 1: seen classes keep p, unseen take p'; lambda = 0: seen take mean_seen(p'), unseen keep p
    got = segment_probabilities(sse, clip, SEEN, 1.0)["zegformer"][0, 0].double()
    torch.testing.assert_close(got, torch.tensor([0.512, 0.216, 0.343], dtype=torch.float64), rtol=1e-5, atol=1e-7)
    got = segment_probabilities(sse, clip, SEEN, 0.0)["zegformer"][0, 0].double()
    torch.testing.assert_close(got, torch.tensor([0.125, 0.125, 0.008], dtype=torch.float64), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="unknown fusion"):
        segment_probabilities(sse, clip, SEEN, LAM, "mean")
    with pytest.raises(ValueError, match="seen"):
        segment_probabilities(sse, clip, torch.tensor([True, False]), LAM)


def test_per_pixel_combination_then_calibration_by_hand():
    sse, clip = _logits()
    fused = segment_probabilities(sse, clip, SEEN, LAM)["zegformer"].float()  # [1, 2, 3]
    # two pixels; query 0's mask logits (0, log 3) -> sigmoid (0.5, 0.75); query 1's (log 3, -log 3) -> (0.75, 0.25)
    masks = torch.tensor([[[[0.0, math.log(3)]], [[math.log(3), -math.log(3)]]]])  # [1, 2, 1, 2]
    scores = combine(fused, masks)  # [1, 3, 1, 2]
    # pixel 0: 0.5 * (0.32, 0.18, 0.098) + 0.75 * (0.001, 0.004, 0.048)
    # pixel 1: 0.75 * (0.32, 0.18, 0.098) + 0.25 * (0.001, 0.004, 0.048)
    want = torch.tensor([[0.16075, 0.24025], [0.093, 0.136], [0.085, 0.0855]])
    torch.testing.assert_close(scores[0, :, 0], want, rtol=1e-5, atol=1e-6)
    # Eq. 2's gamma (evaluate, on these probabilities as they are): 0.1 off the seen classes turns
    # pixel 0 to the unseen class 2 (0.085 > 0.06075) and leaves pixel 1 on class 0 (0.14025 > 0.0855)
    assert calibrated_argmax(scores, [0, 1], 0.1, probabilities=True)[0, 0].tolist() == [2, 0]
    assert calibrated_argmax(scores, [0, 1], 0.0, probabilities=True)[0, 0].tolist() == [0, 0]


# ------------------------------------------------------------------ sub-images
def _image():
    """``[3, 8, 8]`` with value ``100 c + 10 y + x`` at channel c, row y, column x."""
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(8), torch.arange(8), indexing="ij")
    return (100 * c + 10 * y + x).float()


def _masks():
    """Mask logits ``[4, 8, 8]`` (+5 inside, -5 outside): q0 rows 2..4 x columns 3..6 without the
    pixel (3, 4) plus row 5 column 6; q1 empty; q2 a single row; q3 rows 0..1 x columns 6..7."""
    m = torch.full((4, 8, 8), -5.0)
    m[0, 2:5, 3:7] = 5.0
    m[0, 3, 4] = -5.0
    m[0, 5, 6] = 5.0
    m[2, 4, 1:6] = 5.0
    m[3, 0:2, 6:8] = 5.0
    return m


def test_mask_boxes_as_released():
    # (first column, first row, last column, last row); zero-area boxes (empty, one row) -> whole image
    boxes = mask_boxes(_masks() > 0)
    assert boxes.tolist() == [[3, 2, 6, 5], [0, 0, 8, 8], [0, 0, 8, 8], [6, 0, 7, 1]]


def test_crop_and_mask_sub_image_by_hand():
    img, m = _image(), _masks()
    # q0's box (3, 2, 6, 5) is 3 x 3 in roi_align's aligned coordinates: output 3 samples the pixel
    # centres of columns 3..5 and rows 2..4, i.e. the image there times the binary mask
    out = sub_images(img, m[:1], "crop_and_mask", size=3)
    want = img[:, 2:5, 3:6].clone()
    want[:, 1, 1] = 0.0  # the pixel (3, 4) is outside the mask: background 0 (CLIP's mean colour)
    torch.testing.assert_close(out[0], want)
    # crop: the same box of the unmasked image
    torch.testing.assert_close(sub_images(img, m[:1], "crop", size=3)[0], img[:, 2:5, 3:6])
    # an empty or single-row mask crops the whole image (output 8 = pixel centres of the 8 x 8 image)
    out = sub_images(img, m, "crop", size=8)
    torch.testing.assert_close(out[1], img)
    torch.testing.assert_close(out[2], img)
    # ... and masked, an empty mask leaves nothing
    assert sub_images(img, m[1:2], "crop_and_mask", size=8).abs().max() == 0
    # mask: the whole image (resized to the output size: here its own size) times the binary mask
    out = sub_images(img, m, "mask", size=8)
    torch.testing.assert_close(out, img[None] * (m > 0)[:, None].float())
    assert out.shape == (4, 3, 8, 8)
    # the sigmoid threshold: logits +5 are kept at 0.99 (sigmoid(5) = 0.9933), dropped at 0.995
    assert sub_images(img, m[:1], "mask", size=8, threshold=0.995).abs().max() == 0


def test_renormalise_to_clip_pixels():
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    openai = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    pixel = torch.tensor([0.5, 0.25, 1.0])  # in [0, 1]
    x = ((pixel - torch.tensor(imagenet[0])) / torch.tensor(imagenet[1])).view(1, 3, 1, 1)
    got = renormalise(x, *imagenet, *openai).flatten()
    want = torch.tensor(
        [(0.5 - 0.48145466) / 0.26862954, (0.25 - 0.4578275) / 0.26130258, (1.0 - 0.40821073) / 0.27577711]
    )
    torch.testing.assert_close(got, want)


def test_seen_classes_from_their_text_embeddings():
    seen_text = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), dim=-1)
    text = F.normalize(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.01, 0.0]]), dim=-1)
    assert seen_from_text(text, seen_text).tolist() == [True, False, True, False]
    assert seen_from_text(text, seen_text[:0]).tolist() == [False] * 4


def test_seen_classes_just_inside_and_outside_the_tolerance():
    """seen = L2 distance <= 1e-4 between normalised rows: a row at angle 5e-5 from a seen row
    (distance 2 sin(theta / 2) ~ 5e-5) is seen, one at 2e-4 is not; the length of a row does not
    matter (both sides are normalised)."""
    seen_text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])

    def at(theta, scale=1.0):
        return [scale * math.cos(theta), 0.0, scale * math.sin(theta)]

    text = torch.tensor([at(5e-5), at(2e-4), at(5e-5, 3.0), at(2e-4, 0.2)])
    assert seen_from_text(text, seen_text).tolist() == [True, False, True, False]
    assert seen_from_text(text, seen_text, tol=3e-4).tolist() == [True] * 4


# ------------------------------------------------------------------ text
def test_zegformer_template_sets():
    # released-code.md section 1.2 (dingjiansw101/ZegFormer imagenet_templates.IMAGENET_TEMPLATES_SELECT
    # + the scene template; PROMPT_ENSEMBLE_TYPE "single")
    assert TEMPLATES["imagenet_select"] == (
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
        "A photo of a {} in the scene",
    )
    assert TEMPLATES["zegformer_single"] == ("A photo of a {} in the scene",)


def test_class_names_split_into_synonyms():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = load_clip(TINY), get_tokenizer(TINY)
    temps = ["a {}.", "the {} here"]
    out = encode_class_names(model, tok, ["cat, kitty", "dog"], temps, split_names=", ")
    with torch.no_grad():

        def mean_of(prompts):
            e = F.normalize(model.encode_text(tok(prompts)).float(), dim=-1).mean(0)
            return (e / e.norm()).numpy()

        # every template x part of "cat, kitty"; "dog" as without splitting
        want0 = mean_of(["a cat.", "a kitty.", "the cat here", "the kitty here"])
        want1 = mean_of(["a dog.", "the dog here"])
    torch.testing.assert_close(torch.from_numpy(out[0]), torch.from_numpy(want0), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(out[1]), torch.from_numpy(want1), atol=1e-5, rtol=0)
    plain = encode_class_names(model, tok, ["cat, kitty"], temps)  # no split: the whole name in each prompt
    with torch.no_grad():
        want = mean_of(["a cat, kitty.", "the cat, kitty here"])
    torch.testing.assert_close(torch.from_numpy(plain[0]), torch.from_numpy(want), atol=1e-5, rtol=0)


def test_check_proposals_refuses_what_does_not_fit():
    from stages.jobs.methods.zegformer import check_proposals

    good = {"class_head": "text", "text_dim": 64, "num_queries": 10, "model": {"class_head": "text", "num_queries": 10}}
    check_proposals(good, 64, TINY_MODEL, "proposals artifact x")
    bad = {**good, "class_head": "linear", "model": {**good["model"], "class_head": "linear"}}
    with pytest.raises(DataError, match=r"proposals artifact x.*class head 'linear'.*needs 'text'"):
        check_proposals(bad, 64, TINY_MODEL, "proposals artifact x")
    with pytest.raises(
        DataError,
        match=r"embeds segments into 512 dimensions, but ZegFormer's CLIP model 'zeroseg-tiny-vit' embeds into 64",
    ):
        check_proposals({**good, "text_dim": 512}, 64, TINY_MODEL, "proposals artifact x")
    with pytest.raises(DataError, match=r"records 12 queries but its model has num_queries 10"):
        check_proposals({**good, "num_queries": 12}, 64, TINY_MODEL, "proposals artifact x")


# ------------------------------------------------------------------ the segmenter
PROPOSAL_MODEL = {
    "backbone": "resnet18",
    "num_queries": 4,
    "hidden_dim": 32,
    "dec_layers": 1,
    "nheads": 2,
    "dim_feedforward": 32,
    "conv_dim": 16,
    "mask_dim": 16,
    "class_head": "text",
}


@pytest.fixture(scope="module")
def tiny_clip():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip(TINY)


@pytest.fixture(scope="module")
def proposals_dir(tmp_path_factory, tiny_clip):
    """A proposals artifact as pretrain_proposals writes it: a tiny text-head MaskFormer trained on
    the seen classes 0 and 2 (of 5), random weights."""
    from zeroseg.models.maskformer import MaskFormer, save_proposals

    torch.manual_seed(0)
    model = MaskFormer(PROPOSAL_MODEL, num_classes=2, text_dim=64, load_backbone_weights=False)
    d = tmp_path_factory.mktemp("proposals")
    save_proposals(d, model, seen=[0, 2], input_size=[64, 64], clip_spec=TINY)
    return d


def _zegformer(tiny_clip, proposals_dir, **cfg):
    from zeroseg.models.maskformer import read_proposals_json
    from zeroseg.models.zegformer import ZegFormer

    seg = ZegFormer(tiny_clip, {**cfg, "proposals": read_proposals_json(proposals_dir)})
    seg.proposals.load_state_dict(torch.load(proposals_dir / "weights.pt", weights_only=True))
    return seg.eval()


def test_segmenter_variants_and_artifact_round_trip(tiny_clip, proposals_dir, tmp_path):
    from zeroseg.models import load_segmenter, save_segmenter
    from zeroseg.models.maskformer import semantic_scores

    seg = _zegformer(tiny_clip, proposals_dir)
    torch.manual_seed(1)
    text = F.normalize(torch.randn(5, 64), dim=-1)
    seg.seen_text.copy_(text[[0, 2]])  # the seen training classes' rows, as the method writes them
    images = torch.randn(2, 3, 64, 64)
    assert seg.variants == ("zegformer", "zegformer_seg", "zegformer_img") and seg.scores_are_probabilities
    assert seg.size_divisibility == 32 and seg.input_size == (64, 64)
    assert seg.mean == pytest.approx((0.485, 0.456, 0.406))  # the ResNet proposal model's (ImageNet)
    assert seg.cfg.crop_size == 224  # the tiny CLIP tower's native input size
    assert seg.config_json()["proposals"] == seg.proposals_doc and seg.config_json()["crop_size"] == 224
    with torch.no_grad():
        out = seg(images, text)
        assert set(out) == set(seg.variants) and all(v.shape == (2, 5, 64, 64) for v in out.values())
        # zegformer_seg: MaskFormer's semantic inference on the masks upsampled to the input size
        raw = seg.proposals(images, text)
        up = F.interpolate(raw["pred_masks"], size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out["zegformer_seg"], semantic_scores(raw["pred_logits"], up))
        # the seen classes told from seen_text are the ones given explicitly
        explicit = seg(images, text, seen=[0, 2])
        for v in seg.variants:
            torch.testing.assert_close(explicit[v], out[v])
        assert not torch.allclose(seg(images, text, seen=[1])["zegformer"], out["zegformer"])
    # weights.pt: the proposal model and seen_text, not the frozen CLIP tower
    names = seg.trainable_names()
    assert "seen_text" in names and all(n.startswith("proposals.") or n == "seen_text" for n in names)
    assert any(k.startswith("clip_visual.") for k in seg.state_dict())
    save_segmenter(tmp_path, seg, TINY, "zegformer", seg.trainable_state_dict())
    back = load_segmenter(tmp_path)
    with torch.no_grad():
        again = back(images, text)
    for v in seg.variants:
        torch.testing.assert_close(again[v], out[v])
    # without the image branch: ZegFormer-seg alone, unchanged
    seg_only = _zegformer(tiny_clip, proposals_dir, image_branch=False)
    seg_only.seen_text.copy_(text[[0, 2]])
    assert seg_only.variants == ("zegformer_seg",) and seg_only.clip_visual is None
    with torch.no_grad():
        torch.testing.assert_close(seg_only(images, text)["zegformer_seg"], out["zegformer_seg"])


def _boxes_ref(binary):
    """The released box (argmax-of-cumsum: first and last row / column holding a mask pixel), the
    whole image for a zero-area box; plain loops."""
    n, h, w = binary.shape
    out = []
    for q in range(n):
        rows = [y for y in range(h) if binary[q, y].any()]
        cols = [x for x in range(w) if binary[q, :, x].any()]
        if not rows or rows[0] == rows[-1] or cols[0] == cols[-1]:
            out.append([0.0, 0.0, float(w), float(h)])
        else:
            out.append([float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1])])
    return torch.tensor(out)


def test_image_branch_and_fused_variant_against_a_reference_forward(tiny_clip, proposals_dir):
    """ZegFormer's three variants on a non-square image, recomputed here from the proposal
    model's raw outputs and open_clip's own image encoder: masks bilinearly upsampled to the
    image, the pixels renormalised to CLIP's mean / std (x * std + mean - mean' / std'), binary
    masks sigmoid > 0.5, crop_and_mask sub-images (image times binary mask, roi_align of the
    released box at 224), p' = softmax([100 cos(CLIP(crop), text), SSE no-object logit]) without
    no-object, then Eq. 3 (released: seen p^lam mean_S(p')^(1 - lam), unseen p^(1 - lam)
    p'^lam; all_classes p^(1 - lam) p'^lam), then sum_q p_q(c) sigmoid(m_q)."""
    from torchvision.ops import roi_align

    seg = _zegformer(tiny_clip, proposals_dir)
    lam, fusion = 2.0 / 3.0, "released"  # the released lambda_balance and ENSEMBLING (the defaults)
    assert seg.cfg.lambda_balance == pytest.approx(lam) and seg.cfg.fusion == fusion
    g = torch.Generator().manual_seed(3)
    text = F.normalize(torch.randn(5, 64, generator=g), dim=-1)
    images = torch.randn(2, 3, 64, 96, generator=g)
    seen = [0, 2]
    with torch.no_grad():
        out = seg(images, text, seen=seen)
        raw = seg.proposals(images, text)
        up = F.interpolate(raw["pred_masks"], size=(64, 96), mode="bilinear", align_corners=False).double()
        mean0, std0 = torch.tensor(seg.mean).view(3, 1, 1), torch.tensor(seg.std).view(3, 1, 1)
        # OpenAI CLIP's pixel mean / std (the tiny tower's preprocess_cfg)
        mean1 = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
        std1 = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
        # the CLIP model's own logit scale (released: logit_scale.exp(); 100 for trained CLIP, 1 / 0.07
        # at open_clip's random init)
        scale = float(tiny_clip.logit_scale.exp())
        assert scale == pytest.approx(1 / 0.07, rel=1e-5)
        clip_logits = []
        for b in range(2):
            x = (images[b] * std0 + mean0 - mean1) / std1
            binary = up[b].sigmoid() > 0.5
            boxes = _boxes_ref(binary)
            masked = x[None] * binary[:, None].float()
            rois = torch.cat([torch.arange(len(boxes)).float()[:, None], boxes], dim=1)
            crops = roi_align(masked, rois, output_size=224, aligned=True)
            emb = F.normalize(tiny_clip.encode_image(crops).double(), dim=-1)
            clip_logits.append(scale * emb @ text.double().T)
        clip_logits = torch.stack(clip_logits)  # [B, Q, C]
    sse = raw["pred_logits"].double()
    p = sse.softmax(-1)[..., :5]
    p_img = torch.cat([clip_logits, sse[..., 5:]], -1).softmax(-1)[..., :5]
    fused = torch.zeros_like(p)
    for c in range(5):
        if fusion == "all_classes":
            fused[..., c] = p[..., c] ** (1 - lam) * p_img[..., c] ** lam
        elif c in seen:
            fused[..., c] = p[..., c] ** lam * ((p_img[..., 0] + p_img[..., 2]) / 2) ** (1 - lam)
        else:
            fused[..., c] = p[..., c] ** (1 - lam) * p_img[..., c] ** lam
    sig = up.sigmoid()
    for name, probs in (("zegformer_seg", p), ("zegformer_img", p_img), ("zegformer", fused)):
        want = torch.zeros(2, 5, 64, 96, dtype=torch.float64)
        for q in range(probs.shape[1]):
            want += probs[:, q, :, None, None] * sig[:, q, None]
        torch.testing.assert_close(out[name].double(), want, rtol=1e-4, atol=1e-6, msg=name)
    # the inputs discriminate: the two branches disagree, and some masks are partial
    assert (p - p_img).abs().max() > 1e-2
    frac = (up.sigmoid() > 0.5).double().mean(dim=(-1, -2))
    assert ((frac > 0) & (frac < 1)).any()


def test_mask_binarisation_just_above_and_below_the_threshold():
    """A binary mask is sigmoid(logit) > threshold (released 0.5), strictly: at 0.5 the logits
    +1e-3 (sigmoid 0.50025) are kept, 0 (sigmoid exactly 0.5) and -1e-3 dropped; at 0.7 the logit
    0.85 (sigmoid 0.70057) is kept and 0.84 (0.69846) dropped, where thresholding the logit itself
    (0.84 > 0.7) would keep both."""
    img = _image()
    m = torch.full((1, 8, 8), -5.0)
    m[0, 1, 1:4] = 1e-3
    m[0, 2, 1:4] = 0.0
    m[0, 3, 1:4] = -1e-3
    out = sub_images(img, m, "mask", size=8)
    kept = out[0].abs().sum(0) > 0
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[1, 1:4] = True
    want[0, 0] = False  # img is 0 at (0, 0) in channel 0 only: the other channels show every kept pixel
    assert kept.tolist() == want.tolist()
    m2 = torch.full((1, 8, 8), -5.0)
    m2[0, 2, 2:6] = 0.85
    m2[0, 4, 2:6] = 0.84
    out = sub_images(img, m2, "mask", size=8, threshold=0.7)
    kept = out[0].abs().sum(0) > 0
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[2, 2:6] = True
    assert kept.tolist() == want.tolist()
    # crop_and_mask: the box is the kept row only (a single row: zero area -> the whole image),
    # and the masked copy keeps only that row
    out = sub_images(img, m2, "crop_and_mask", size=8, threshold=0.7)
    assert (out[0].abs().sum(0) > 0).tolist() == want.tolist()


def test_segmenter_refuses_what_does_not_fit(tiny_clip, proposals_dir):
    from zeroseg.errors import ConfigError
    from zeroseg.models.maskformer import read_proposals_json
    from zeroseg.models.zegformer import ZegFormer

    doc = read_proposals_json(proposals_dir)
    linear = {**doc, "class_head": "linear", "text_dim": None, "model": {**doc["model"], "class_head": "linear"}}
    with pytest.raises(ConfigError, match=r"class_head 'text' and text_dim 64.*has class_head 'linear', text_dim None"):
        ZegFormer(tiny_clip, {"proposals": linear})
    with pytest.raises(ConfigError, match=r"text_dim 64.*text_dim 512"):
        ZegFormer(tiny_clip, {"proposals": {**doc, "text_dim": 512}})
    with pytest.raises(ConfigError, match=r"model.crop_size 336 differs from the CLIP image encoder's input size 224"):
        ZegFormer(tiny_clip, {"crop_size": 336, "proposals": doc})
    with pytest.raises(ConfigError, match=r"needs 'proposals'"):
        ZegFormer(tiny_clip, {})
    with pytest.raises(ConfigError, match=r"did you mean 'lambda_balance'"):
        ZegFormer(tiny_clip, {"lambda_balanc": 0.5, "proposals": doc})


def test_method_refuses_a_proposals_artifact_that_does_not_fit(tiny_clip, tmp_path):
    """train_classifier's zegformer build: a linear-head or 512-d proposals artifact is refused,
    naming both values, before anything is loaded."""
    import json
    import types

    from pipeline.dag import Artifact
    from stages.jobs.methods.zegformer import build_zegformer
    from stages.methods.zegformer import ZegFormerMethod
    from zeroseg.models.maskformer import MaskFormer, save_proposals

    cfg = ZegFormerMethod(method="zegformer", clip=TINY)
    for name, head, dim, pattern in (
        ("linear", "linear", None, r"class head 'linear', ZegFormer needs 'text'"),
        ("wide", "text", 512, r"embeds segments into 512 dimensions, but ZegFormer's CLIP model 'zeroseg-tiny-vit'"),
    ):
        d = tmp_path / name
        model = MaskFormer({**PROPOSAL_MODEL, "class_head": head}, 2, dim, load_backbone_weights=False)
        save_proposals(d, model, seen=[0, 2], input_size=[64, 64], clip_spec=TINY)
        files = [{"path": p.name} for p in d.iterdir()]
        art = Artifact("pretrain_proposals", "ab" * 32, d, str(d), {"files": files})
        ctx = types.SimpleNamespace(inputs={"proposals": art}, output_dir=str(tmp_path / "out"))
        with pytest.raises(DataError, match=r"proposals artifact pretrain_proposals/abababababab: .*" + pattern):
            build_zegformer(ctx, cfg)
        assert json.loads((d / "proposals.json").read_text())["class_head"] == head
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_zegformer_config_without_proposals_fails_at_plan_time(monkeypatch, tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.plan import plan
    from stages.catalog import STAGES

    class EverythingCached:  # planning only: no data checks, no stage runs
        def exists(self, stage, key):
            return True

        def latest(self, stage):
            return None

    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "sample_zegformer.yaml")
    p = plan(cfg, STAGES, store=EverythingCached())
    assert p.nodes["train_classifier"].bindings["proposals"] == "pretrain_proposals"
    cfg.sections.pop("pretrain_proposals")
    with pytest.raises(ConfigError, match=r"train_classifier needs its 'proposals' input .*pretrain_proposals"):
        plan(cfg, STAGES, store=EverythingCached())


@pytest.mark.parametrize(
    "name, dataset, backbone, steps, crop, template, short_side, long_side",
    [
        ("coco_stuff_zegformer.yaml", "coco_stuff171", "resnet101", 60_000, 640, "imagenet_select", 640, 2560),
        ("voc_zegformer.yaml", "voc20", "resnet50", 10_000, 512, "zegformer_single", 512, 2048),
    ],
)
def test_zegformer_benchmark_configs_are_the_papers_settings(
    name, dataset, backbone, steps, crop, template, short_side, long_side, monkeypatch, tmp_path
):
    """ZegFormer Sec. 4.2 and the released configs (released-code.md sections 1.1-1.4): CLIP
    ViT-B/16 openai; MaskFormer from ImageNet weights, 100 queries, hidden 256, 6 decoder layers,
    text head; batch 32, AdamW lr 1e-4, weight decay 1e-4, backbone lr x 0.1, clip 0.01, mixed
    precision on GPU; 60k iterations on 640 crops (COCO-Stuff, ResNet-101) / 10k on 512 (VOC,
    ResNet-50); 8 templates on COCO-Stuff, "A photo of a {} in the scene" on VOC, names split at
    ", "; crop-and-mask sub-images, Eq. 3 with lambda 2/3, gamma 0.1, detectron2's short-side test
    resize (640 / 512, long side at most 2560 / 2048)."""
    from pipeline.config import load_config
    from pipeline.plan import plan
    from stages.catalog import STAGES

    class EverythingCached:
        def exists(self, stage, key):
            return True

        def latest(self, stage):
            return None

    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    p = plan(load_config(Path(__file__).resolve().parent.parent / "configs" / name), STAGES, store=EverythingCached())
    assert p.nodes["build_splits"].config.split.builtin == dataset
    et = p.nodes["embed_text"].config
    assert (et.clip.model, et.clip.pretrained, et.templates, et.split_names) == ("ViT-B-16", "openai", template, ", ")
    pp = p.nodes["pretrain_proposals"].config
    m = pp.model
    assert (m.backbone, m.backbone_weights, m.class_head, m.logit_scale) == (backbone, "IMAGENET1K_V1", "text", 100.0)
    assert (m.num_queries, m.hidden_dim, m.dec_layers, m.nheads, m.dim_feedforward) == (100, 256, 6, 8, 2048)
    assert (m.conv_dim, m.mask_dim, m.deep_supervision, m.no_object_weight) == (256, 256, True, 0.1)
    tr = pp.train
    assert pp.scaling.num_workers * tr.batch_size * tr.grad_accum_steps == 32 == tr.reference_batch_size
    assert (tr.max_steps, tr.lr, tr.clip_grad_norm, tr.precision) == (steps, 1e-4, 0.01, "auto")
    assert (pp.weight_decay, pp.backbone_lr_mult, pp.scaling.use_gpu) == (1e-4, 0.1, True)
    assert tuple(pp.augment.crop_size) == (crop, crop)
    tc = p.nodes["train_classifier"].config
    assert tc.method == "zegformer" and p.nodes["train_classifier"].bindings["proposals"] == "pretrain_proposals"
    z = tc.model
    assert (z.image_branch, z.clip_style, z.mask_threshold, z.fusion) == (True, "crop_and_mask", 0.5, "released")
    assert z.lambda_balance == pytest.approx(2 / 3) and z.crop_size is None  # ViT-B/16's 224
    assert tc.gamma == 0.1  # Eq. 2's calibration: the segmenter's default_gamma (evaluate.gamma unset)
    ev = p.nodes["evaluate"].config
    assert (ev.gamma, ev.protocol, ev.short_side, ev.max_long_side) == (None, "short_side", short_side, long_side)


# ------------------------------------------------------------------ the sample DAG
# build_splits, embed_text and pretrain_proposals come from the session fixture
# `sample_proposals` (tests/conftest.py: configs/sample_proposals.yaml, which this sample
# extends, with the overrides the sample tests share): this test copies its store and runs the
# ZegFormer classifier and evaluate in process.
DAG = ("build_splits", "embed_text", "pretrain_proposals", "train_classifier", "evaluate")


def _run_again(work, overrides, shared_data):
    """The user's command, in a subprocess (its own interpreter: no Ray unless a stage runs)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "pipeline/run.py", "--config", "configs/sample_zegformer.yaml", "--work-dir", str(work)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "ZEROSEG_DATA": str(shared_data)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)


def _artifact(work, stage):
    import json

    [m] = (work / "store" / stage).glob("*/manifest.json")
    return json.loads(m.read_text()), m.parent


@pytest.mark.slow
def test_zegformer_sample_dag_reports_three_variants_and_caches(
    tmp_path, sample_proposals, sample_proposals_overrides, shared_data
):
    import json

    import numpy as np

    from zeroseg.models import load_segmenter

    first = sample_proposals.run("configs/sample_zegformer.yaml", sample_proposals.copy_to(tmp_path))
    assert first.code == 0, [n.error for n in first.plan]
    # the proposals of the sample_proposals config are reused: ZegFormer adds a classifier only
    assert {n.name: n.status for n in first.plan} == dict(
        zip(DAG, ["cached", "cached", "cached", "ran", "ran"], strict=True)
    )
    # the classifier: the proposals' weights under proposals., the seen rows; nothing else
    prop_manifest, prop_dir = _artifact(tmp_path, "pretrain_proposals")
    tc_manifest, tc_dir = _artifact(tmp_path, "train_classifier")
    doc = json.loads((tc_dir / "segmenter.json").read_text())
    assert doc["method"] == "zegformer" and doc["class"] == "zeroseg.models.zegformer:ZegFormer"
    assert doc["default_gamma"] == 0.1  # train_classifier.gamma: Eq. 2's calibration, the one source evaluate applies
    assert doc["model"]["proposals"]["num_queries"] == 16 and tc_manifest["metrics"]["num_queries"] == 16
    weights = torch.load(tc_dir / "weights.pt", map_location="cpu", weights_only=True)
    proposal_weights = torch.load(prop_dir / "weights.pt", map_location="cpu", weights_only=True)
    assert set(weights) == {f"proposals.{k}" for k in proposal_weights} | {"seen_text"}
    assert all(torch.equal(weights[f"proposals.{k}"], v) for k, v in proposal_weights.items())
    classes = json.loads((_artifact(tmp_path, "build_splits")[1] / "classes.json").read_text())
    _, text_dir = _artifact(tmp_path, "embed_text")
    train_text = np.load(text_dir / "embeddings" / "train.npy")
    np.testing.assert_array_equal(weights["seen_text"].numpy(), train_text[classes["train"]["seen"]])
    seg = load_segmenter(tc_dir)
    assert seg.variants == ("zegformer", "zegformer_seg", "zegformer_img")
    # evaluate: the three variants of one run (the fused model under the usual keys)
    ev_manifest, ev_dir = _artifact(tmp_path, "evaluate")
    m = ev_manifest["metrics"]
    for s in ("val", "camvid"):
        for prefix in ("", "zegformer_seg/", "zegformer_img/"):
            assert f"{prefix}{s}/pAcc" in m, sorted(m)
    metrics = json.loads((ev_dir / "metrics.json").read_text())
    cm = np.array(metrics["val"]["gzs3"]["confusion_matrix"])
    assert m["val/pAcc"] == pytest.approx(100 * np.trace(cm) / cm.sum())
    # ---- value checks (glue; tests/test_glue_reference.py): every metric of the three variants
    # from its matrix, the pixel counts from the label PNGs, and each variant's matrix equal to a
    # per-image reference forward of the saved segmenter at gamma 0.1 (train_classifier.gamma's
    # default, the released GZERO_CALIBRATE; evaluate.gamma unset)
    from test_glue_reference import check_sample_evaluate

    ref = check_sample_evaluate(tmp_path, first.plan, shared_data, {"": "train_classifier"}, {"": 0.1})
    assert set(ref) == {f"{p}{s}" for p in ("", "zegformer_seg/", "zegformer_img/") for s in ("val", "camvid")}
    assert [metrics[f"{p}val"]["variant"] for p in ("", "zegformer_seg/", "zegformer_img/")] == list(seg.variants)
    # the same command again: every stage cached, no Ray
    again = _run_again(tmp_path, sample_proposals_overrides, shared_data)
    assert again.returncode == 0 and again.stdout.count(" cached (") == 5 and "running" not in again.stdout
    assert "ray:" not in again.stdout
