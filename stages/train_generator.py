"""Stage ``train_generator``: PADing's feature generator and the retrained class head (PADing
Sec. 3, Algorithm 1 steps 3-4), a Ray Train job on the feature artifact, written as a segmenter
artifact that evaluate binds like any other (``evaluate.model: train_generator``).

Reads build_splits (``splits``: classes.json's seen / unseen training classes), embed_text
(``text``: the training vocabulary's class embeddings, the generator's input), extract_features
(``features``: the real query embeddings and their labels) and pretrain_proposals (``proposals``:
the mask model and its ``linear`` head, which initialises the new head)::

    features/{embeddings,labels}.npy (each worker, in memory) <- Ray Data range(N images), shuffled
      -> per step, a batch of B images' Q query embeddings:
         generator step (Adam, WarmupPolyLR): matched (seen) embeddings vs synthetic ones of their
           classes: MMD (Eq. 2) + 0.001 CE + lambda (alignment Eq. 6 + disentanglement Eqs. 3-5)
         classifier step (SGD): all B x Q real embeddings (class or no-object) + synthetic unseen
      -> zeroseg.models.pading.PADing: the mask model + the retrained head (segmenter.json,
         weights.pt) and generator.pt (the generator, projection and heads)

``schedule: joint`` is the released code (``SimpleMULTISTEPTrainer.run_step``: a generator step
then a classifier step in every iteration); ``sequential`` is Algorithm 1 (``generator_steps``
generator steps, then the classifier alone for the rest). The four ablations of Tables 1-2 differ
only in ``model`` (generator, align, disentangle), so they share every upstream artifact.

Wiring only; networks and losses are ``zeroseg.models.pading``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.dag import Input, StageConfig, StageContext
from pipeline.training import ScalingSection, TrainSection
from stages.common import JobStage, random_weights_notice
from zeroseg.config.clip import ClipSpec, model_embed_dim
from zeroseg.config.pading import GeneratorConfig, RetrainConfig
from zeroseg.errors import ConfigError

GENERATOR_PT = "generator.pt"


class TrainGeneratorConfig(StageConfig):
    """``train_generator`` config section.

    ``clip`` (shared): the CLIP model of the text embeddings (its embedding size must be
    ``model.text_dim``). ``model``: :class:`GeneratorConfig`; ``classifier``: :class:`RetrainConfig`.
    ``schedule``: ``joint`` (released) or ``sequential`` (Algorithm 1) with ``generator_steps``
    (default half of ``train.max_steps``). ``generator_lr``: the generator's Adam lr (released
    ``GENERATOR_LR`` 5e-4; paper 2e-4), scaled like ``train.lr`` (the head's SGD lr, released
    ``BASE_LR`` 1e-3); ``poly_power`` / ``warmup_steps`` / ``warmup_factor``: the generator's
    detectron2 ``WarmupPolyLR`` (released 0.9, 10 iterations). ``train``: released semantic
    setting, batch 12 images, 2000 iterations. ``train.clip_grad_norm`` and ``grad_accum_steps``
    are not supported (two optimisers step themselves).
    """

    clip: ClipSpec
    model: GeneratorConfig = GeneratorConfig()
    classifier: RetrainConfig = RetrainConfig()
    schedule: Literal["joint", "sequential"] = "joint"
    generator_steps: int | None = Field(None, ge=1)
    generator_lr: float = Field(5e-4, gt=0)
    poly_power: float = Field(0.9, ge=0)
    warmup_steps: int = Field(10, ge=0)
    warmup_factor: float = Field(1.0, gt=0, le=1)
    train: TrainSection = TrainSection(
        max_steps=2000, batch_size=12, lr=1e-3, reference_batch_size=12, precision="fp32", shuffle_buffer=256
    )
    scaling: ScalingSection = ScalingSection()

    @model_validator(mode="after")
    def _consistent(self) -> TrainGeneratorConfig:
        t = self.train
        if t.clip_grad_norm is not None or t.grad_accum_steps > 1:
            raise ValueError(
                "train_generator: train.clip_grad_norm and train.grad_accum_steps are not supported (the generator "
                "and the classifier step their own optimisers, released code: neither)"
            )
        if self.schedule == "sequential" and self.generator_steps is not None and self.generator_steps >= t.max_steps:
            raise ValueError(
                f"train_generator.generator_steps {self.generator_steps} leaves no classifier step in "
                f"train.max_steps {t.max_steps} (schedule sequential)"
            )
        if self.schedule == "joint" and self.generator_steps is not None:
            raise ValueError("train_generator.generator_steps applies to schedule: sequential only")
        return self

    def generator_phase(self) -> int:
        """Steps with a generator step: all (joint) or the first ``generator_steps`` (sequential)."""
        if self.schedule == "joint":
            return self.train.max_steps
        return self.generator_steps or max(1, self.train.max_steps // 2)


class TrainGenerator(JobStage):
    """PADing's generator and retrained classifier (see module docstring)."""

    job = "stages.jobs.train_generator:train_generator"

    name = "train_generator"
    Config = TrainGeneratorConfig
    INPUTS = {
        "splits": Input(("build_splits",), doc="classes.json (seen / unseen training classes)"),
        "text": Input(("embed_text",), doc="class text embeddings (the generator's input)"),
        "features": Input(("extract_features",), doc="real query embeddings matched to seen segments"),
        "proposals": Input(("pretrain_proposals",), doc="the mask model with the linear head (PADing's backbone)"),
    }
    shared = ("clip",)

    def check(self, config: TrainGeneratorConfig) -> None:
        """Plan time: the text embeddings' size (the CLIP model's) must be ``model.text_dim``."""
        dim = model_embed_dim(config.clip)
        if dim != config.model.text_dim:
            raise ConfigError(
                f"train_generator.model.text_dim is {config.model.text_dim} but CLIP model {config.clip.model!r} "
                f"embeds text into {dim}: set train_generator.model.text_dim: {dim}"
            )

    def notices(self, config: TrainGeneratorConfig) -> list[str]:
        return random_weights_notice(config.clip)

    def run(self, ctx: StageContext) -> dict[str, float]:
        """Check the config again (the job runs where the data is), then train (the job:
        :attr:`job`)."""
        self.check(ctx.config)
        return super().run(ctx)

    def note(self, metrics: Mapping[str, Any]) -> str:
        if "steps" not in metrics:
            return ""
        return f"steps={int(metrics['steps'])}, synthetic unseen acc {metrics.get('synthetic_unseen_acc', float('nan')):.2f}"


__all__ = ["GENERATOR_PT", "TrainGenerator", "TrainGeneratorConfig"]
