"""Every shipped config plans against the stage catalogue (sections validate, input roles bind,
the order is build_splits ... evaluate, keys compute); the sample configs also pass the stages'
plan-time checks on the real sample data. No Ray, no stage runs."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.plan import plan
from stages.catalog import STAGES
from stages.methods import methods

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(REPO.glob("configs/*.yaml"))
SAMPLES = [p for p in CONFIGS if p.name.startswith("sample")]
ORDER = ["build_splits", "embed_text", "train_classifier", "evaluate"]
BINDINGS = {
    "build_splits": {},
    "embed_text": {"splits": "build_splits"},
    "train_classifier": {"splits": "build_splits", "text": "embed_text"},
    "evaluate": {"splits": "build_splits", "text": "embed_text", "model": "train_classifier"},
}


def _expected(cfg):
    """ORDER and BINDINGS of the stages the config has, with pretrain_proposals (and
    train_classifier's proposals role) when the config has that stage (the decoupled methods:
    ZegFormer, DeOP; PADing); DeOP's classifier takes no text."""
    order = [s for s in ORDER if s in cfg.sections]
    bindings = {k: dict(BINDINGS[k]) for k in order}
    if "pretrain_proposals" in cfg.sections:
        order.insert(2, "pretrain_proposals")
        head = (cfg.sections["pretrain_proposals"].get("model") or {}).get("class_head", "text")
        bindings["pretrain_proposals"] = {
            "splits": "build_splits",
            **({"text": "embed_text"} if head == "text" else {}),
        }
        method = (cfg.sections.get("train_classifier") or {}).get("method")
        if method and "proposals" in methods()[method].inputs:  # a decoupled method
            bindings["train_classifier"]["proposals"] = "pretrain_proposals"
        if method == "deop":  # DeOP classifies with its own learned anchors: no text input
            del bindings["train_classifier"]["text"]
    if "self_train" in cfg.sections:  # ZegCLIP+ST: self_train after train_classifier, evaluated beside it
        order.insert(order.index("evaluate"), "self_train")
        bindings["self_train"] = {"splits": "build_splits", "text": "embed_text", "init_from": "train_classifier"}
        bindings["evaluate"].update(model="self_train", compare="train_classifier")
    if "train_generator" in cfg.sections:  # PADing: the feature artifact, the generator, evaluate binds it
        order.insert(order.index("pretrain_proposals") + 1, "extract_features")
        order.insert(order.index("evaluate"), "train_generator")
        bindings["extract_features"] = {"splits": "build_splits", "proposals": "pretrain_proposals"}
        bindings["train_generator"] = {
            "splits": "build_splits",
            "text": "embed_text",
            "features": "extract_features",
            "proposals": "pretrain_proposals",
        }
        bindings["evaluate"]["model"] = "train_generator"
    return order, bindings


class EverythingCached:
    """A store that holds every artifact: planning then runs no stage's data checks (the
    benchmark datasets are not on this machine), but still validates, binds and keys."""

    def exists(self, stage, key):
        return True

    def latest(self, stage):
        return None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_plans(path, monkeypatch, tmp_path):
    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    cfg = load_config(path)
    names = {s.name for s in STAGES}
    assert set(cfg.sections) <= names | {"clip"}, f"unknown sections in {path.name}"
    p = plan(cfg, STAGES, store=EverythingCached())
    order, bindings = _expected(cfg)
    assert list(p.nodes) == order
    assert {n.name: n.bindings for n in p} == bindings
    assert all(n.action == "cached" for n in p)
    assert len(set(p.keys().values())) == len(order) and all(len(k) == 64 for k in p.keys().values())
    # the shared clip section reaches the stages that take it
    for name in ("embed_text", "train_classifier", "train_generator"):
        if name in p.nodes:
            assert p.nodes[name].config.clip.model_dump() == {
                "pretrained": None,
                "checkpoint": None,
                "random_init": False,
                **cfg.sections["clip"],
            }
    if "train_classifier" in p.nodes:
        assert p.nodes["train_classifier"].config.method == cfg.sections["train_classifier"]["method"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_config_plans_a_stage_nothing_reads(path, monkeypatch, tmp_path):
    """A node no other node binds is wasted work (e.g. a MaskCLIP train_classifier beside PADing's
    train_generator, which evaluate reads instead), unless its stage is terminal by nature
    (``Stage.terminal``: evaluate; pretrain_proposals with its recall pass, sample_proposals.yaml);
    the plan would say so in a notice."""
    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    p = plan(load_config(path), STAGES, store=EverythingCached())
    read = {up for n in p for up in n.upstream}
    assert [n.name for n in p if n.name not in read and not n.stage.terminal(n.config)] == []
    assert not any("nothing in this config reads" in line for line in p.notices)


def test_the_plan_names_a_stage_nothing_reads(shared_data, monkeypatch):
    """The old PADing sample planned a MaskCLIP train_classifier beside train_generator: a notice
    names it; a proposal model without its recall pass and without a reader too."""
    monkeypatch.setenv("ZEROSEG_DATA", str(shared_data))
    p = plan(
        load_config(REPO / "configs/sample_pading.yaml", ["train_classifier.method=maskclip"]),
        STAGES,
        store=EverythingCached(),
    )
    assert [line.split(":")[0] for line in p.notices if "nothing in this config reads" in line] == ["train_classifier"]
    q = plan(
        load_config(REPO / "configs/sample_proposals.yaml", ["pretrain_proposals.recall_sets=[]"]),
        STAGES,
        store=EverythingCached(),
    )
    assert any(line.startswith("pretrain_proposals: nothing in this config reads") for line in q.notices)
    assert not any(
        "nothing in this config reads" in line
        for line in plan(load_config(REPO / "configs/sample_proposals.yaml"), STAGES, store=EverythingCached()).notices
    )


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_configs_pass_the_plan_time_checks(path, shared_data, monkeypatch):
    monkeypatch.setenv("ZEROSEG_DATA", str(shared_data))
    cfg = load_config(path)
    p = plan(cfg, STAGES)  # no store: every node runs, so every check runs
    assert [n.action for n in p] == ["run"] * len(_expected(cfg)[0]) and all(n.reason == "new" for n in p)
    assert p.nodes["build_splits"].components["data"] is not None  # the dataset fingerprint
    assert any("RANDOM WEIGHTS" in line for line in p.notices)


def test_the_zegclip_sample_shares_data_and_text_with_the_maskclip_sample(shared_data, monkeypatch):
    monkeypatch.setenv("ZEROSEG_DATA", str(shared_data))
    store = EverythingCached()
    mask = plan(load_config(REPO / "configs/sample.yaml"), STAGES, store=store).keys()
    zeg = plan(load_config(REPO / "configs/sample_zegclip.yaml"), STAGES, store=store).keys()
    assert mask["build_splits"] == zeg["build_splits"] and mask["embed_text"] == zeg["embed_text"]
    assert mask["train_classifier"] != zeg["train_classifier"] and mask["evaluate"] != zeg["evaluate"]
    # README: "--set evaluate.gamma=0.1 re-runs evaluate only"; a runtime field re-runs nothing
    gamma = plan(load_config(REPO / "configs/sample.yaml", ["evaluate.gamma=0.1"]), STAGES, store=store).keys()
    assert {k for k in mask if mask[k] != gamma[k]} == {"evaluate"}
    batch = plan(
        load_config(REPO / "configs/sample.yaml", ["evaluate.batch_size=16", "embed_text.batch_size=3"]),
        STAGES,
        store=store,
    ).keys()
    assert batch == mask


def test_real_benchmark_configs_need_the_data_root(monkeypatch):
    monkeypatch.delenv("ZEROSEG_DATA", raising=False)
    with pytest.raises(ConfigError, match="ZEROSEG_DATA"):
        load_config(REPO / "configs" / "coco_stuff.yaml")


def test_benchmark_configs_fail_the_plan_time_checks_without_their_data(monkeypatch, tmp_path):
    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    with pytest.raises(ConfigError, match=r"dataset 'coco_stuff'.*does not exist"):
        plan(load_config(REPO / "configs" / "coco_stuff.yaml"), STAGES)


@pytest.mark.parametrize(
    "name, dataset, tokens, steps, template",
    [
        ("voc_zegclip.yaml", "voc20", 10, 20_000, "zegclip_single"),
        ("coco_stuff_zegclip.yaml", "coco_stuff171", 100, 80_000, "ensemble15"),
    ],
)
def test_zegclip_benchmark_configs_are_the_released_settings(
    name, dataset, tokens, steps, template, monkeypatch, tmp_path
):
    """ZegCLIP Sec. 4.3 / Appendix A-C and the released configs (released-code.md section 4):
    ViT-B/16 openai, 512x512, global batch 16, AdamW 2e-5 x lr_mult 10, wd 0.01, poly 0.9 to
    min_lr 1e-6 after 1500 linear warm-up steps from 1e-6, 20k (VOC) / 80k (COCO) iterations,
    10 / 100 deep prompt tokens in every layer, [t*g, t] queries, a 3-layer 512-wide 8-head
    decoder, focal 100 + dice 1 (gamma 2), "a photo of a {}" on VOC and the 15 templates on
    COCO-Stuff, inductive inference with seen scores - 0.1."""
    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    p = plan(load_config(REPO / "configs" / name), STAGES, store=EverythingCached())
    tc = p.nodes["train_classifier"].config
    assert tc.clip.model == "ViT-B-16" and tc.clip.pretrained == "openai"
    m = tc.model
    assert (m.backbone, m.prompt_tokens, m.prompt_layers, m.rd) == ("dpt", tokens, None, "tg_t")
    assert (m.decoder_layers, m.decoder_width, m.decoder_heads, tuple(m.input_size)) == (3, 512, 8, (512, 512))
    assert (m.loss, m.loss_alpha, m.loss_beta, m.focal_gamma) == ("focal_dice", 100.0, 1.0, 2.0)
    tr = tc.train
    assert tc.scaling.num_workers * tr.batch_size * tr.grad_accum_steps == 16 == tr.reference_batch_size
    assert (tr.max_steps, tr.lr, tc.weight_decay, tc.head_lr_mult) == (steps, 2e-5, 0.01, 10.0)
    assert (tc.poly_power, tc.min_lr, tc.warmup_steps, tc.warmup_ratio) == (0.9, 1e-6, 1500, 1e-6)
    assert tuple(tc.augment.crop_size) == (512, 512)
    assert p.nodes["embed_text"].config.templates == template
    assert p.nodes["build_splits"].config.split.builtin == dataset
    # inductive inference with seen scores - 0.1: the segmenter's default (one source), not evaluate's
    from stages.methods.zegclip import INDUCTIVE_GAMMA

    assert p.nodes["evaluate"].config.gamma is None and INDUCTIVE_GAMMA == 0.1


def _zegclip_lr(section):
    """The learning rate of the prompts / head at optimizer step s under ``section``'s schedule, from
    ``zegclip_optimizer`` (one parameter stands in for the model's groups)."""
    import types

    import torch

    from stages.jobs.methods.zegclip import zegclip_optimizer

    seg = torch.nn.Linear(1, 1, bias=False)
    seg.trainable_names = lambda: ["weight"]
    loop = types.SimpleNamespace(lr=section.train.lr, train=section.train, config=section.solver())
    opt, sched = zegclip_optimizer(loop, seg)
    return lambda s: opt.param_groups[0]["initial_lr"] * sched.lr_lambdas[0](s)


@pytest.mark.parametrize(
    "name, inductive, base, steps",
    [
        ("voc_zegclip_st.yaml", "voc_zegclip.yaml", 20_000, 10_000),
        ("coco_stuff_zegclip_st.yaml", "coco_stuff_zegclip.yaml", 80_000, 40_000),
    ],
)
def test_zegclip_st_configs_are_the_papers_schedule(name, inductive, base, steps, monkeypatch, tmp_path):
    """ZegCLIP Sec. 4.3 (the first half inductive, self-training in the rest) and the released ST
    runs (VOC: iter_10000 of the 20k run + 10k; COCO: iter_40000 of the 80k run + 40k), with the
    inductive run's optimiser settings (released-code.md section 4); evaluate: the self-trained model
    without calibration (its artifact's default gamma) beside the inductive one."""
    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    p = plan(load_config(REPO / "configs" / name), STAGES, store=EverythingCached())
    ind = plan(load_config(REPO / "configs" / inductive), STAGES, store=EverythingCached())
    assert p.nodes["build_splits"].config.transductive and not ind.nodes["build_splits"].config.transductive
    tc, st = p.nodes["train_classifier"].config, p.nodes["self_train"].config
    assert ind.nodes["train_classifier"].config.train.max_steps == base
    assert tc.train.max_steps == st.train.max_steps == steps == base // 2
    # the inductive half is the first half of the full run's poly schedule (released: iter_10000 /
    # iter_40000 of the 20k / 80k run); self-training starts a fresh schedule with its warm-up
    # (released --load-from: a new 10k / 40k schedule_*k run)
    assert (tc.schedule_steps, st.schedule_steps) == (base, None)
    lr_t, lr_s = _zegclip_lr(tc), _zegclip_lr(st)
    b, m = 2e-5 * 10, 1e-6  # lr x lr_mult, min_lr: mmcv poly (b - m) (1 - s / T) ** 0.9 + m
    assert lr_t(steps) == pytest.approx((b - m) * 0.5**0.9 + m, rel=1e-9)  # ~0.54 b at the hand-over
    assert lr_t(1500) == pytest.approx((b - m) * (1 - 1500 / base) ** 0.9 + m, rel=1e-9)
    assert lr_s(0) == pytest.approx(b * 1e-6, rel=1e-6) and lr_s(steps) == pytest.approx(m, rel=1e-9)
    assert tc.model == ind.nodes["train_classifier"].config.model  # the same network, only the schedule halves
    solver = ("weight_decay", "head_lr_mult", "warmup_steps", "warmup_ratio", "poly_power", "min_lr", "augment")
    assert {k: getattr(st, k) for k in solver} == {k: getattr(tc, k) for k in solver}
    same = ("batch_size", "lr", "reference_batch_size", "lr_scaling", "precision", "grad_accum_steps")
    assert {k: getattr(st.train, k) for k in same} == {k: getattr(tc.train, k) for k in same}
    assert st.scaling.num_workers == tc.scaling.num_workers and (st.pixels, st.threshold) == ("unseen_only", None)
    assert "gamma" not in type(st).model_fields  # the artifact's default gamma is not a training field
    assert p.nodes["self_train"].bindings["init_from"] == "train_classifier"
    ev = p.nodes["evaluate"]
    assert ev.bindings["model"] == "self_train" and ev.bindings["compare"] == "train_classifier"
    assert ev.config.gamma is None and ev.config.protocol == "slide"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_printed_config_is_what_the_plan_validates(path, monkeypatch, tmp_path):
    """``zeroseg run --print-config`` prints every stage section exactly as the plan validates it
    (defaults filled in; the shared sections it takes printed once, at the top; its bindings as
    written), plus the validated run section."""
    import yaml

    from pipeline.config import config_yaml, validated_config

    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    cfg = load_config(path)
    doc = yaml.safe_load(config_yaml(cfg, STAGES))
    assert doc == validated_config(cfg, STAGES)
    assert list(doc)[:2] == ["run", "clip"] and "extends" not in doc
    assert doc["run"] == cfg.run.model_dump(mode="json")
    p = plan(cfg, STAGES, store=EverythingCached())
    assert [s for s in doc if s not in ("run", "clip")] == list(p.nodes)
    for n in p:
        printed = dict(doc[n.name])
        for role in n.stage.all_roles():
            assert printed.pop(role, n.bindings.get(role)) == n.bindings.get(role)
        if "clip" in n.stage.shared and "clip" not in printed:  # printed once, at the top
            printed["clip"] = doc["clip"]
        assert printed == n.config.model_dump(mode="json"), n.name


#: The seen-class calibration each shipped config's evaluate applied before the configs composed
#: (evaluate.gamma, else the segmenter's default_gamma): (model, compare). It must not change.
APPLIED_GAMMA = {
    **dict.fromkeys(["sample", "sample_zegclip", "sample_proposals", "sample_deop", "sample_pading"], (0.0, None)),
    **dict.fromkeys(["coco_stuff", "voc", "coco_stuff_deop", "voc_deop", "ade20k_full_zegformer"], (0.0, None)),
    **dict.fromkeys([f"coco_stuff_pading{s}" for s in ("", "_gmmn", "_p", "_pa", "_pad")], (0.0, None)),
    **dict.fromkeys(["coco_stuff_zegclip", "voc_zegclip"], (0.1, None)),
    **dict.fromkeys(["sample_zegformer", "coco_stuff_zegformer", "voc_zegformer"], (0.1, None)),
    **dict.fromkeys(["sample_zegclip_st", "coco_stuff_zegclip_st", "voc_zegclip_st"], (0.0, 0.1)),
}


def _default_gamma(node) -> float:
    """The ``default_gamma`` the node's segmenter artifact states (what its stage writes into
    segmenter.json; evaluate applies 0 when it states none)."""
    from stages.methods.zegclip import INDUCTIVE_GAMMA
    from stages.self_train import SELF_TRAINED_GAMMA

    if node.name == "self_train":
        return SELF_TRAINED_GAMMA
    if node.name == "train_classifier" and node.config.method == "zegclip":
        return INDUCTIVE_GAMMA
    if node.name == "train_classifier" and node.config.method == "zegformer":
        return node.config.gamma
    return 0.0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_config_applies_the_calibration_it_did(path, monkeypatch, tmp_path):
    """One source for gamma: the segmenter's default, evaluate.gamma only on purpose; the gamma
    evaluate applies to each model is the one the configs applied before."""
    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    p = plan(load_config(path), STAGES, store=EverythingCached())
    ev = p.nodes["evaluate"]
    applied = tuple(
        None
        if role not in ev.bindings
        else (ev.config.gamma if ev.config.gamma is not None else _default_gamma(p.nodes[ev.bindings[role]]))
        for role in ("model", "compare")
    )
    assert applied == APPLIED_GAMMA[path.stem]
    assert set(APPLIED_GAMMA) == {c.stem for c in CONFIGS}
