"""What enters an artifact key, as a property over the config schemas and at the plan level.

* every hashed field of every stage schema (every train_classifier method included) changes the
  hashed view, no runtime field does;
* the key changes with the hashed config, each input key, the code and the data fingerprint;
* the sample's keys do not depend on the data path's spelling, on runtime settings, or on
  restating a default; a typo in a model config fails the dry run with exit 2;
* editing a stage's source changes its key and its descendants' only; a code file counts as its
  docstring-stripped syntax tree, so docstring and comment edits re-key nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.catalogue import load_catalogue
from pipeline.config import hashed_view, is_runtime, load_config, runtime_view
from pipeline.plan import plan
from stages.methods import methods

REPO = Path(__file__).resolve().parent.parent
CATALOG = load_catalogue()


def _plan(config="configs/sample.yaml", overrides=(), env=None):
    old = dict(os.environ)
    try:
        os.environ.update(env or {})
        return plan(load_config(REPO / config, list(overrides)), CATALOG.stages, code_packages=CATALOG.code_packages)
    finally:
        os.environ.clear()
        os.environ.update(old)


# -- the property over the schemas ------------------------------------------------------------
def _changed(value, ann):
    """A different value of the same shape (validation is not needed: ``model_copy``)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        lits = (
            [a for a in typing.get_args(ann) if isinstance(a, str)] if typing.get_origin(ann) is typing.Literal else []
        )
        others = [a for a in lits if a != value]
        return others[0] if others else value + "-x"
    if isinstance(value, (list, tuple)):
        return type(value)([_changed(value[0], None), *value[1:]]) if value else type(value)(["x"])
    if isinstance(value, dict):
        return {**value, "zz": "x"}
    if value is None:
        return 7
    raise AssertionError(f"no perturbation for {value!r}")


def _replace(obj, path: tuple, value):
    head, *rest = path
    if isinstance(obj, list):
        out = list(obj)
        out[head] = value if not rest else _replace(obj[head], tuple(rest), value)
        return out
    cur = getattr(obj, head)
    new = value if not rest else _replace(cur, tuple(rest), value)
    return obj.model_copy(update={head: new})


def _nested(v) -> bool:
    return isinstance(v, BaseModel) and not hasattr(v, "key_payload")


def _leaves(model: BaseModel, prefix=()):
    """``(path, field, value)`` of every field, descending into nested models and lists of
    models (not into models that count by ``key_payload``: they are tested apart)."""
    for name, field in type(model).model_fields.items():
        v = getattr(model, name)
        if is_runtime(field, v):
            yield prefix + (name,), field, v
        elif _nested(v):
            yield from _leaves(v, prefix + (name,))
        elif isinstance(v, list) and v and all(_nested(x) for x in v):
            for i, x in enumerate(v):
                yield from _leaves(x, prefix + (name, i))
        else:
            yield prefix + (name,), field, v


def _stage_configs():
    """A validated config of every stage schema: the sample's, one per train_classifier method."""
    out = {}
    for cfg_file in (
        "configs/sample.yaml",
        "configs/sample_zegclip.yaml",
        "configs/sample_deop.yaml",
        "configs/sample_zegformer.yaml",
    ):
        for n in _plan(cfg_file):
            name = n.name if n.name != "train_classifier" else f"train_classifier[{n.config.method}]"
            out[name] = n.config
    assert {f"train_classifier[{m}]" for m in methods()} <= set(out), "a method without a sample config"
    return out


CONFIGS = _stage_configs()


@pytest.mark.parametrize("stage", sorted(CONFIGS))
def test_every_hashed_field_changes_the_hashed_view_and_no_runtime_field_does(stage):
    cfg = CONFIGS[stage]
    base = hashed_view(cfg)
    runtime = runtime_view(cfg)
    n_hashed = n_runtime = 0
    for path, field, value in _leaves(cfg):
        if isinstance(value, BaseModel) and hasattr(value, "key_payload"):
            continue  # field by field in test_every_field_of_a_key_payload_model_counts_as_it_should
        new = _replace(cfg, path, _changed(value, field.annotation))
        dotted = ".".join(map(str, path))
        if is_runtime(field, value):
            n_runtime += 1
            assert hashed_view(new) == base, f"{stage}.{dotted} is runtime but changes the key"
            assert dotted in runtime
        else:
            n_hashed += 1
            assert hashed_view(new) != base, f"{stage}.{dotted} determines outputs but does not change the key"
    assert n_hashed > 0


def _payload_models(model: BaseModel, prefix=()):
    """``(path, model)`` of every nested model that counts by ``key_payload`` (ClipSpec,
    ProposalConfig), wherever it sits in a stage config."""
    for name in type(model).model_fields:
        v = getattr(model, name)
        if isinstance(v, BaseModel):
            yield from ([(prefix + (name,), v)] if hasattr(v, "key_payload") else _payload_models(v, prefix + (name,)))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                if isinstance(x, BaseModel):
                    yield from _payload_models(x, prefix + (name, i))


def _clip_variants(spec, tmp_path):
    """``{field: a valid ClipSpec that differs from ``spec`` in it}``: the spec allows exactly one
    weight source, so a change of ``random_init`` is a change to another source."""
    from zeroseg.config.clip import ClipSpec

    ck = tmp_path / "clip-weights.pt"
    ck.write_bytes(b"some weights")
    other_model = "ViT-B-16" if spec.model != "ViT-B-16" else "zeroseg-tiny-vit"
    src = {"pretrained": spec.pretrained, "checkpoint": spec.checkpoint, "random_init": spec.random_init}
    out = {"model": ClipSpec(model=other_model, **src)}
    if not spec.pretrained:
        out["pretrained"] = out["random_init"] = ClipSpec(model=spec.model, pretrained="openai")
    if not spec.checkpoint:
        out["checkpoint"] = ClipSpec(model=spec.model, checkpoint=str(ck))
    return out


_PAYLOAD_STAGES = sorted(s for s, c in CONFIGS.items() if any(True for _ in _payload_models(c)))


@pytest.mark.parametrize("stage", _PAYLOAD_STAGES)
def test_every_field_of_a_key_payload_model_counts_as_it_should(stage, tmp_path):
    """The property above, inside the models that count by ``key_payload`` (the CLIP spec, the
    proposal model): each of their fields changes the stage's hashed view, a Runtime field would
    not. A ClipSpec field changes to another valid spec (its key_payload resolves the
    architecture and the weights); a ProposalConfig field as above."""
    from zeroseg.config.clip import ClipSpec

    cfg = CONFIGS[stage]
    base = hashed_view(cfg)
    for path, model in _payload_models(cfg):
        fields = type(model).model_fields
        if isinstance(model, ClipSpec):
            variants = _clip_variants(model, tmp_path)
        else:
            variants = {}
            for name, field in fields.items():
                v = getattr(model, name)
                new = "IMAGENET1K_V1" if v is None and name == "backbone_weights" else _changed(v, field.annotation)
                variants[name] = model.model_copy(update={name: new})
        assert set(variants) == set(fields), f"{stage}.{'.'.join(path)}: a field without a variant"
        for name, variant in variants.items():
            changed = hashed_view(_replace(cfg, path, variant)) != base
            dotted = ".".join(map(str, (*path, name)))
            if is_runtime(fields[name], getattr(model, name)):
                assert not changed, f"{stage}.{dotted} is runtime but changes the key"
            else:
                assert changed, f"{stage}.{dotted} determines outputs but does not change the key"
    # and a spelling of the same thing keeps it: ViT-B/16 is ViT-B-16
    if stage == "embed_text":
        a = _replace(cfg, ("clip",), ClipSpec(model="ViT-B-16", pretrained="openai"))
        b = _replace(cfg, ("clip",), ClipSpec(model="ViT-B/16", pretrained="openai"))
        assert hashed_view(a) == hashed_view(b) != base


def test_the_runtime_fields_are_the_ones_the_issue_names():
    """The settings a user changes between attempts: resources, retries, logging cadence,
    checkpoints kept, concurrency, device, inference batch size, data paths."""
    rt = {s: set(runtime_view(c)) for s, c in CONFIGS.items()}
    assert {
        "train.max_failures",
        "train.log_every",
        "train.keep_checkpoints",
        "train.checkpoint_every",
        "scaling.resources_per_worker",
        "block_rows",
    } <= rt["train_classifier[zegclip]"]
    assert {"batch_size", "device", "num_gpus_per_worker", "concurrency", "warmup_batches"} <= rt["evaluate"]
    assert {"train.images", "train.annotations", "eval.0.images", "eval.0.labels", "eval.0.classes"} <= rt[
        "build_splits"
    ]
    assert {"batch_size"} <= rt["embed_text"]
    # and what must stay hashed: the data's meaning, the optimisation, the model
    hashed = {s: set(hashed_view(c)) for s, c in CONFIGS.items()}
    assert {"train", "split", "unseen_policy", "seed"} <= hashed["build_splits"]
    assert {"model", "train", "augment", "weight_decay"} <= hashed["train_classifier[zegclip]"]
    assert {"max_steps", "batch_size", "lr", "seed", "precision"} <= set(
        hashed_view(CONFIGS["train_classifier[zegclip]"].train)
    )
    # with precision auto, the device decides fp32 or bf16/fp16: use_gpu counts
    assert {"num_workers", "use_gpu"} <= set(hashed_view(CONFIGS["train_classifier[zegclip]"].scaling))


def test_clip_spec_counts_by_architecture_and_weights(tmp_path):
    from zeroseg.config.clip import TINY_MODEL_CONFIG, ClipSpec

    tiny = ClipSpec(model="zeroseg-tiny-vit", random_init=True)
    tiny_sha = hashlib.sha256(TINY_MODEL_CONFIG.read_bytes()).hexdigest()
    assert tiny.key_payload() == {"model": f"zeroseg-tiny-vit;config-sha256:{tiny_sha}", "weights": "random-init"}
    assert ClipSpec(model="ViT-B-16", pretrained="openai").key_payload()["weights"] == "openai"
    # a checkpoint counts by its bytes, whatever the path's spelling
    ck = tmp_path / "w.pt"
    ck.write_bytes(b"weights v1")
    link = tmp_path / "link.pt"
    link.symlink_to(ck)
    a = ClipSpec(model="zeroseg-tiny-vit", checkpoint=str(ck)).key_payload()
    assert a == ClipSpec(model="zeroseg-tiny-vit", checkpoint=str(link)).key_payload()
    ck.write_bytes(b"weights v2")
    assert ClipSpec(model="zeroseg-tiny-vit", checkpoint=str(ck)).key_payload() != a
    # a model config file counts by its content
    cfg_copy = tmp_path / "zeroseg-tiny-vit.json"
    shutil.copy(TINY_MODEL_CONFIG, cfg_copy)
    p1 = ClipSpec(model=str(cfg_copy), random_init=True).key_payload()
    cfg_copy.write_text(cfg_copy.read_text().replace('"width": 64', '"width": 32'))
    assert ClipSpec(model=str(cfg_copy), random_init=True).key_payload() != p1


# -- the key at the plan level ----------------------------------------------------------------
def test_key_follows_config_inputs_code_and_data(monkeypatch):
    base = _plan().keys()
    # an upstream change changes the downstream keys (input keys), not the upstream ones
    k = _plan(overrides=["embed_text.templates=ensemble15"]).keys()
    assert k["build_splits"] == base["build_splits"]
    assert all(k[s] != base[s] for s in ("embed_text", "train_classifier", "evaluate"))
    # the data fingerprint
    from stages.build_splits import BuildSplits

    monkeypatch.setattr(BuildSplits, "fingerprint", lambda self, c: "other data")
    k = _plan().keys()
    assert all(k[s] != base[s] for s in base)
    monkeypatch.undo()
    # the code
    import pipeline.codehash as ch

    real = ch.code_fingerprint

    def edited(modules, packages):
        out = real(modules, packages)
        return {f: ("edited" if f == "stages/evaluate.py" else h) for f, h in out.items()}

    monkeypatch.setattr(ch, "code_fingerprint", edited)
    k = _plan().keys()
    assert {s for s in base if k[s] != base[s]} == {"evaluate"}


def test_runtime_only_changes_keep_every_key():
    runtime = [
        "train_classifier.train.max_failures=7",
        "train_classifier.train.log_every=1",
        "train_classifier.train.keep_checkpoints=5",
        "train_classifier.train.checkpoint_every=2",
        "train_classifier.scaling.resources_per_worker.CPU=1",
        "train_classifier.block_rows=8",
        "evaluate.concurrency=2",
        "evaluate.batch_size=1",
        "evaluate.device=cpu",
        "embed_text.batch_size=3",
    ]
    base = _plan("configs/sample_zegclip.yaml").keys()
    assert _plan("configs/sample_zegclip.yaml", runtime).keys() == base
    # and a hashed change next to them still counts
    assert _plan("configs/sample_zegclip.yaml", [*runtime, "train_classifier.train.lr=1e-4"]).keys() != base


def test_data_path_spelling_does_not_change_keys(tmp_path, shared_data):
    link = tmp_path / "data-link"
    link.symlink_to(shared_data)
    spellings = {"relative": os.path.relpath(shared_data, REPO), "absolute": str(shared_data), "symlink": str(link)}
    keys = {name: _plan(env={"ZEROSEG_DATA": p}).keys() for name, p in spellings.items()}
    assert keys["relative"] == keys["absolute"] == keys["symlink"]


def test_restating_a_default_keeps_the_key():
    base = _plan("configs/sample_zegclip.yaml").keys()
    restated = [
        "train_classifier.model.decoder_dropout=0.1",
        "train_classifier.model.prompt_dropout=0.1",
        "train_classifier.model.rd=tg_t",
        "train_classifier.weight_decay=0.01",
        "evaluate.gamma=0",
        "train_classifier.model.decoder_ffn_ratio=4",
    ]
    assert _plan("configs/sample_zegclip.yaml", restated).keys() == base


def test_a_model_config_typo_fails_the_dry_run_with_exit_2(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "pipeline/run.py",
            "--config",
            "configs/sample_zegclip.yaml",
            "--dry-run",
            "--work-dir",
            str(tmp_path),
            "--set",
            "train_classifier.model.prompt_tokenz=4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert (
        "unknown key 'train_classifier.model.prompt_tokenz'; did you mean train_classifier.model.prompt_tokens?"
        in out.stdout
    )
    out = subprocess.run(
        [
            sys.executable,
            "pipeline/run.py",
            "--config",
            "configs/sample.yaml",
            "--dry-run",
            "--work-dir",
            str(tmp_path),
            "--set",
            "train_classifier.method=zegclipp",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "unknown value 'zegclipp'; did you mean 'zegclip'?" in out.stdout, out.stdout


def test_a_binding_names_the_key_to_set(tmp_path):
    import yaml

    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"evaluate.model: 'embed_text' cannot be bound to input 'model'"):
        _plan(overrides=["evaluate.model=embed_text"])
    # the sample data without a method, evaluated
    raw = {"extends": str(REPO / "configs/datasets/sample.yaml"), "evaluate": {"batch_size": 4}}
    (tmp_path / "no_model.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigError,
        match=r"evaluate needs its 'model' input \(the segmenter to evaluate\) from one of "
        r"train_classifier, train_generator, self_train, but the config has none",
    ):
        plan(load_config(tmp_path / "no_model.yaml"), CATALOG.stages, code_packages=CATALOG.code_packages)


def _copy_repo(dst: Path) -> Path:
    for d in ("pipeline", "stages", "zeroseg", "configs"):
        shutil.copytree(REPO / d, dst / d, ignore=shutil.ignore_patterns("__pycache__"))
    # under `make mutants` the copied code is mutmut's trampolined copy, which reads its config here
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    return dst


def _dry_keys(root: Path, work: Path, data: Path) -> dict[str, str]:
    code = (
        "import sys; sys.path.insert(0, '.'); from pipeline.catalogue import load_catalogue; "
        "from pipeline.config import load_config; from pipeline.plan import plan; c = load_catalogue(); "
        "p = plan(load_config('configs/sample.yaml'), c.stages, code_packages=c.code_packages); "
        "print('KEYS', ' '.join(f'{n.name}={n.key}' for n in p))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ZEROSEG_DATA": str(data)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("KEYS "))
    return dict(kv.split("=") for kv in line.split()[1:])


def test_editing_a_stage_changes_its_key_and_its_descendants_only(tmp_path, shared_data):
    root = _copy_repo(tmp_path / "repo")
    base = _dry_keys(root, tmp_path, shared_data)
    with open(root / "stages" / "evaluate.py", "a") as f:  # a comment: no key changes
        f.write("\n# a comment\n")
    assert _dry_keys(root, tmp_path, shared_data) == base
    with open(root / "stages" / "evaluate.py", "a") as f:
        f.write("\n_AN_EDIT = 1\n")
    k = _dry_keys(root, tmp_path, shared_data)
    assert {s for s in base if k[s] != base[s]} == {"evaluate"}
    with open(root / "stages" / "embed_text.py", "a") as f:
        f.write("\n_AN_EDIT = 1\n")
    k2 = _dry_keys(root, tmp_path, shared_data)
    assert {s for s in base if k2[s] != k[s]} == {"embed_text", "train_classifier", "evaluate"}
    with open(root / "zeroseg" / "data" / "splits.py", "a") as f:  # science under build_splits: all
        f.write("\n_AN_EDIT = 1\n")
    k3 = _dry_keys(root, tmp_path, shared_data)
    assert all(k3[s] != k2[s] for s in base)


# -- code enters a key as its docstring-stripped syntax ----------------------------------------
_MODULE = '''"""A module docstring."""

import math  # a comment

SCALE = 2.0


class Box:
    """A class docstring."""

    def area(self, w, h):
        """A method docstring."""
        return w * h * SCALE  # another comment


def label(x):
    return f"box {x}" + "!"


def helper():
    """Only a docstring."""
'''

_SAME = {  # edits that keep the fingerprint
    "a docstring": ('"""A method docstring."""', '"""Another text, longer, over\n        two lines."""'),
    "the module docstring": ('"""A module docstring."""', '"""Rewritten."""'),
    "a comment": ("# another comment", "# the comment, reworded"),
    "a new comment line": ("SCALE = 2.0", "# why 2\nSCALE = 2.0"),
    "a docstring added to a function that had none": ("def label(x):", 'def label(x):\n    """New."""'),
    "a docstring-only body made pass": ('"""Only a docstring."""', "pass"),
    "blank lines and formatting": ("return w * h * SCALE", "return (w *\n                h * SCALE)"),
}
_CHANGED = {  # edits that change it
    "a number": ("SCALE = 2.0", "SCALE = 3.0"),
    "a string that is not a docstring": ('"box {x}"', '"Box {x}"'),
    "an operator": ("w * h", "w + h"),
    "a name": ("return w * h", "return h * w"),
    "a statement after the docstring": ('"""Only a docstring."""', '"""Only a docstring."""\n    return 1'),
}


_PACKAGES = itertools.count()


def _fingerprint_after(tmp_path, monkeypatch, edit=None):
    """The code fingerprint of a package the test writes itself (``pkg_<n>/mod.py`` with
    :data:`_MODULE`, ``edit`` = (old, new) applied), under a fresh package name each call (the
    package root is cached by name, for the whole session)."""
    from pipeline import codehash

    name = f"zs_codehash_pkg_{next(_PACKAGES)}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    src = _MODULE if edit is None else _MODULE.replace(*edit)
    assert edit is None or src != _MODULE, edit
    (pkg / "mod.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    fp = codehash.code_fingerprint([f"{name}.mod"], (name,))
    return fp[f"{name}/mod.py"]


@pytest.mark.parametrize("what", sorted(_SAME))
def test_docstring_and_comment_edits_keep_the_code_fingerprint(what, tmp_path, monkeypatch):
    assert _fingerprint_after(tmp_path, monkeypatch, _SAME[what]) == _fingerprint_after(tmp_path, monkeypatch)


@pytest.mark.parametrize("what", sorted(_CHANGED))
def test_code_edits_change_the_code_fingerprint(what, tmp_path, monkeypatch):
    assert _fingerprint_after(tmp_path, monkeypatch, _CHANGED[what]) != _fingerprint_after(tmp_path, monkeypatch)


def test_the_fingerprint_of_an_edited_file_follows_the_edit(tmp_path, monkeypatch):
    """The per-file cache is keyed on modification time and size: rewriting a file in place with
    a code edit changes its fingerprint, with a docstring edit not."""
    import time

    from pipeline import codehash

    pkg = tmp_path / "zs_codehash_inplace"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    mod = pkg / "mod.py"
    mod.write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))

    def fp():
        return codehash.code_fingerprint(["zs_codehash_inplace.mod"], ("zs_codehash_inplace",))

    base = fp()
    time.sleep(0.01)
    mod.write_text(_MODULE.replace("A class docstring.", "A class docstring, reworded at length."))
    assert fp() == base
    mod.write_text(_MODULE.replace("SCALE = 2.0", "SCALE = 2.5"))
    assert fp() != base


def test_a_method_that_never_reads_embed_text_is_not_rekeyed_by_it():
    """DeOP embeds class names itself (Method drops "text"): with proposals that read no text
    (class_head objectness), changing embed_text.templates changes embed_text's key but not DeOP's
    train_classifier key, which binds no embed_text; ZegFormer's changes (it reads the embeddings),
    and so does DeOP's on text-head proposals (the proposal model itself changes)."""
    change = ("embed_text.templates=imagenet_select",)
    objectness = ("pretrain_proposals.model.class_head=objectness",)
    for config, base, rekeyed in (
        ("configs/sample_deop.yaml", objectness, False),
        ("configs/sample_deop.yaml", (), True),
        ("configs/sample_zegformer.yaml", (), True),
    ):
        a, b = _plan(config, base), _plan(config, base + change)
        assert a.nodes["embed_text"].config.templates == "single"
        assert b.nodes["embed_text"].config.templates == "imagenet_select"
        assert a.keys()["embed_text"] != b.keys()["embed_text"]
        assert (a.keys()["train_classifier"] != b.keys()["train_classifier"]) is rekeyed, (config, base)
    deop = _plan("configs/sample_deop.yaml", objectness)
    assert set(deop.nodes["train_classifier"].bindings) == {"splits", "proposals"}
    assert "text" in _plan("configs/sample_zegformer.yaml").nodes["train_classifier"].bindings


# -- the key's formula and why a node is not cached --------------------------------------------
def test_the_key_is_the_sha256_of_its_components_canonical_json():
    """A key is sha256 of the sorted, separator-free JSON of {stage, config (hashed view),
    inputs ({role: upstream key}, sorted by role), code (sha256 of the file map's JSON), data}
    (recomputed here with json + hashlib): a change of this formula changes every key of a store."""
    import json

    def sha(obj):
        return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    p = _plan("configs/sample_deop.yaml")
    for n in p:
        c = n.components
        assert list(c["inputs"]) == sorted(c["inputs"])
        assert c["inputs"] == {r: p.nodes[u].key for r, u in n.bindings.items()}
        assert c["config"] == hashed_view(n.config)
        expected = {"stage": n.name, "config": c["config"], "inputs": c["inputs"], "code": sha(c["code"])}
        assert n.key == sha({**expected, "data": c["data"]}), n.name
    assert p.nodes["build_splits"].components["data"] is not None  # the data fingerprint enters
    assert p.nodes["train_classifier"].components["inputs"].keys() == {"proposals", "splits"}


class _Latest:
    def __init__(self, components):
        self.components = components

    def latest(self, stage):
        return None if self.components is None else {"components": self.components}


def test_why_not_cached_names_each_changed_component():
    from pipeline.plan import why_not_cached

    node = _plan().nodes["evaluate"]
    c = node.components
    assert why_not_cached(node, None) == "new"
    assert why_not_cached(node, _Latest(None)) == "new"
    assert why_not_cached(node, _Latest({})) == "new"
    same = {k: v for k, v in c.items()}
    assert why_not_cached(node, _Latest(same)) == "not in the store"
    old_cfg = {**c["config"], "gamma": 0.5}
    assert why_not_cached(node, _Latest({**same, "config": old_cfg})) == f"config: gamma 0.5 -> {c['config']['gamma']}"
    # a key missing on one side is <unset>; after three, a count
    nested = {**c["config"], "a": {"b": 1}, "z1": 1, "z2": 2}
    assert why_not_cached(node, _Latest({**same, "config": nested})) == (
        "config: a {'b': 1} -> <unset>, z1 1 -> <unset>, z2 2 -> <unset>"
    )
    nested["z3"] = 3
    assert why_not_cached(node, _Latest({**same, "config": nested})).endswith("z2 2 -> <unset> (+1 more)")
    long = {**c["config"], "gamma": "x" * 50}
    assert f"gamma {'x' * 37}... -> " in why_not_cached(node, _Latest({**same, "config": long}))
    role = next(iter(c["inputs"]))
    assert why_not_cached(node, _Latest({**same, "inputs": {**c["inputs"], role: "0" * 64}})) == f"input: {role}"
    files = sorted(c["code"])
    code = {**c["code"], files[0]: "old", files[1]: "old", "gone.py": "x"}
    assert why_not_cached(node, _Latest({**same, "code": code})) == "code: " + ", ".join(
        sorted([files[0], files[1], "gone.py"])
    )
    code[files[2]] = "old"
    assert why_not_cached(node, _Latest({**same, "code": code})).endswith(" (+1 more)")
    assert why_not_cached(node, _Latest({**same, "data": "other"})) == "data"
    both = {**same, "data": "other", "config": old_cfg}
    assert why_not_cached(node, _Latest(both)) == f"config: gamma 0.5 -> {c['config']['gamma']}; data"


def test_config_differences_are_dotted_down_to_the_leaves():
    from pipeline.plan import _diff

    assert _diff({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 1, "c": 3}, "d": 1}) == [("a.c", 2, 3)]
    assert _diff({"a": {"b": {"x": 1}}}, {"a": {"b": {"x": 1, "y": 2}}}) == [("a.b.y", "<unset>", 2)]
    assert _diff({"a": [1, 2]}, {"a": [1, 3]}) == [("a", [1, 2], [1, 3])]  # lists whole
    assert _diff(1, 2) == [("(all)", 1, 2)] and _diff({"k": 1}, {"k": 1}) == []
    assert _diff({"a": 1}, {"a": {"b": 1}}) == [("a", 1, {"b": 1})]
