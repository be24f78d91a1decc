"""Warm start (``stages.common.warm_start`` and the ``init_from`` role): a model initialised from
another segmenter artifact's trained weights, strictly checked.

The weights a warm start must reproduce are the tensors the source artifact saved (read back
with ``torch.load``), never what ``warm_start`` itself returns.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.catalogue import Catalogue
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.dag import Stage, StageConfig
from pipeline.errors import ConfigError
from pipeline.plan import plan
from stages.common import INIT_FROM, warm_start
from zeroseg.config.clip import ClipSpec
from zeroseg.errors import DataError
from zeroseg.models import WEIGHTS_PT, WeightsMismatchError, save_segmenter
from zeroseg.models.clip import load_clip
from zeroseg.models.maskclip import MaskCLIP
from zeroseg.models.zegclip import ZegCLIP

TINY = ClipSpec(model="zeroseg-tiny-vit", random_init=True)
SMALL = {"input_size": [64, 64], "decoder_width": 32, "decoder_heads": 4, "prompt_tokens": 3}


def zegclip(seed: int, **over) -> ZegCLIP:
    torch.manual_seed(seed)
    return ZegCLIP(load_clip(TINY), {**SMALL, **over})


def saved_zegclip(path, seed: int = 0, **over):
    """A ZegCLIP artifact whose trainable weights are random draws (not the init), saved."""
    seg = zegclip(seed, **over)
    g = torch.Generator().manual_seed(100 + seed)
    state = {k: torch.randn(v.shape, generator=g) for k, v in seg.trainable_state_dict().items()}
    save_segmenter(path, seg, TINY, "zegclip", state)
    return path


def test_warm_start_loads_exactly_the_saved_weights(tmp_path):
    src = saved_zegclip(tmp_path / "src", seed=0)
    saved = torch.load(src / WEIGHTS_PT, weights_only=True)
    student = zegclip(seed=7)  # other initial prompts and head
    assert any(not torch.equal(student.trainable_state_dict()[k], v) for k, v in saved.items())
    warm_start(student, str(src))
    got = student.trainable_state_dict()
    assert sorted(got) == sorted(saved)
    for k, v in saved.items():
        assert torch.equal(got[k], v), k


def test_warm_start_refuses_mismatched_weights_naming_the_tensor(tmp_path):
    src = saved_zegclip(tmp_path / "src", seed=0, prompt_tokens=3)
    student = zegclip(seed=1, prompt_tokens=5)
    before = {k: v.clone() for k, v in student.trainable_state_dict().items()}
    with pytest.raises(WeightsMismatchError) as e:
        warm_start(student, str(src))
    assert e.value.mismatched  # the deep prompts: [layers, 3, width] saved vs [layers, 5, width] here
    assert any("prompt" in k for k in e.value.mismatched)
    assert str(src / WEIGHTS_PT) in str(e.value)
    # nothing was half-loaded
    for k, v in student.trainable_state_dict().items():
        assert torch.equal(v, before[k]), k


def test_warm_start_refuses_another_method_and_a_training_free_artifact(tmp_path):
    mask = tmp_path / "maskclip"
    save_segmenter(mask, MaskCLIP(load_clip(TINY), {"input_size": [64, 64]}), TINY, "maskclip")
    with pytest.raises(DataError, match="MaskCLIP artifact .*cannot initialise a .*ZegCLIP"):
        warm_start(zegclip(seed=0), str(mask))
    with pytest.raises(DataError, match="has no weights.pt"):
        warm_start(MaskCLIP(load_clip(TINY), {"input_size": [64, 64]}), str(mask))
    with pytest.raises(DataError, match="segmenter.json not found"):
        warm_start(zegclip(seed=0), str(tmp_path))


# ------------------------------------------------------------------ the init_from role in a DAG


class TeacherCfg(StageConfig):
    prompt_tokens: int = 3
    seed: int = 0


class Teacher(Stage):
    """Stands in for train_classifier: writes a ZegCLIP artifact with drawn weights."""

    name = "train_classifier"
    Config = TeacherCfg

    def code(self, config):
        return []

    def run(self, ctx):
        saved_zegclip(ctx.output_dir, seed=ctx.config.seed, prompt_tokens=ctx.config.prompt_tokens)
        return {}


class StudentCfg(StageConfig):
    prompt_tokens: int = 3


class Student(Stage):
    """A training stage with the warm-start role; writes the weights it starts from."""

    name = "finetune"
    Config = StudentCfg
    INPUTS = {"init_from": INIT_FROM}

    def code(self, config):
        return []

    def run(self, ctx):
        seg = zegclip(seed=7, prompt_tokens=ctx.config.prompt_tokens)
        bound = ctx.inputs.get("init_from")
        if bound is not None:
            warm_start(seg, bound.uri)
        save_segmenter(ctx.output_dir, seg, TINY, "zegclip", seg.trainable_state_dict())
        (ctx.output_dir / "bound.json").write_text(json.dumps(bound is not None))
        return {}


CATALOG = Catalogue([Teacher, Student], ())


def _config(tmp_path, finetune: str):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{name: ws, work_dir: {tmp_path / 'work'}}}\ntrain_classifier: {{}}\nfinetune: {finetune}\n")
    return cfg


def _run(tmp_path, finetune: str) -> int:
    return main(["run", "--config", str(_config(tmp_path, finetune))], catalog=CATALOG)


def _key(tmp_path, finetune: str, *overrides: str) -> str:
    return plan(load_config(_config(tmp_path, finetune), list(overrides)), CATALOG.stages).nodes["finetune"].key


def _artifact(tmp_path, stage: str):
    (m,) = [p.parent for p in (tmp_path / "work" / "store").glob("*/*/manifest.json") if p.parent.parent.name == stage]
    return m


def test_init_from_binds_only_when_named_and_is_part_of_the_key(tmp_path, ray_local):
    # unset: not inferred even though train_classifier is the only candidate present
    assert _run(tmp_path, "{}") == 0
    assert json.loads((_artifact(tmp_path, "finetune") / "bound.json").read_text()) is False

    assert _run(tmp_path, "{init_from: train_classifier}") == 0
    fin = [p.parent for p in (tmp_path / "work" / "store").glob("finetune/*/manifest.json")]
    assert len(fin) == 2  # binding the role changed the key
    warm = next(d for d in fin if json.loads((d / "bound.json").read_text()))
    teacher = torch.load(_artifact(tmp_path, "train_classifier") / WEIGHTS_PT, weights_only=True)
    got = torch.load(warm / WEIGHTS_PT, weights_only=True)
    assert sorted(got) == sorted(teacher)
    assert all(torch.equal(got[k], teacher[k]) for k in teacher)

    # a new teacher (other seed) is a new input key, so a new student key; unbound, it is not
    bound = "{init_from: train_classifier}"
    assert _key(tmp_path, bound) != _key(tmp_path, bound, "train_classifier.seed=3")
    assert _key(tmp_path, "{}") == _key(tmp_path, "{}", "train_classifier.seed=3")


def test_init_from_mismatch_fails_the_stage_naming_the_tensor(tmp_path, capsys, ray_local):
    assert _run(tmp_path, "{init_from: train_classifier, prompt_tokens: 5}") == 1
    out = capsys.readouterr().out
    assert "WeightsMismatchError" in out or "does not fit" in out, out
    assert "prompt" in out


def test_init_from_names_a_stage_that_cannot_fill_it(tmp_path, capsys):
    with pytest.raises(ConfigError, match="finetune.init_from: 'evaluate' cannot be bound"):
        _key(tmp_path, "{init_from: evaluate}")
