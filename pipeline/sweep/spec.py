"""The sweep file (``configs/sweeps/*.yaml``): its schema (:class:`SweepFile`, :class:`Dist`,
:class:`AshaSection`) and :func:`load_sweep`, which fills in the stage catalogue's defaults
(``SWEEP_DEFAULTS``: the metric, its mode and eval set, the seed key)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from pipeline.catalogue import SweepDefaults, load_catalogue
from pipeline.config import explain, read_yaml
from pipeline.errors import ConfigError


class Dist(BaseModel):
    """One searched key: exactly one of ``grid`` (every value, crossed with the other grids),
    ``choice`` (one value drawn per sample), ``uniform: [low, high]`` or ``loguniform: [low,
    high]`` (low > 0)."""

    model_config = ConfigDict(extra="forbid")
    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> Dist:
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of grid, choice, uniform, loguniform (got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        if kind in ("grid", "choice") and not getattr(self, kind):
            raise ValueError(f"{kind}: an empty list")
        if kind in ("uniform", "loguniform"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind}: [low, high] with low < high, got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {lo}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None)

    def probes(self) -> list[Any]:
        """Values that show which nodes the key re-keys: every listed value, or both bounds."""
        v = getattr(self, self.kind)
        return list(v)

    def tune(self) -> Any:
        """The Tune search-space object."""
        from ray import tune

        v = getattr(self, self.kind)
        return {
            "grid": tune.grid_search,
            "choice": tune.choice,
            "uniform": lambda b: tune.uniform(*b),
            "loguniform": lambda b: tune.loguniform(*b),
        }[self.kind](list(v))


class AshaSection(BaseModel):
    """ASHA (``ray.tune.schedulers.ASHAScheduler``). ``time_attr``: with the sweep's
    ``asha_metric`` (``<stage>/loss``) the stage's training steps (``<stage>/step``), ``max_t``
    defaulting to the stage's ``train.max_steps``; without it, Tune's ``training_iteration`` (the
    count of a trial's results) and ``max_t`` 100. A trial that reaches ``max_t`` is not stopped
    by ASHA (``stop_last_trials=False``): it ends itself, after its evaluation."""

    model_config = ConfigDict(extra="forbid")
    max_t: int | None = Field(None, gt=0)
    grace_period: int = Field(1, gt=0)
    reduction_factor: float = Field(4, gt=1)


class SweepFile(BaseModel):
    """A sweep (``configs/sweeps/*.yaml``).

    Attributes:
        name: the sweep's name (Tune experiment and MLflow run name).
        description: a line for people.
        set: ``key=value`` overrides applied to the base config for every trial (e.g. tune on a
            held-out split of the seen classes).
        space: ``{dotted.config.key: Dist}``: what is searched.
        metric: a trial's reported metric to optimise (``<stage>/<metric>``); default: the stage
            catalogue's (``SWEEP_DEFAULTS["metric"]``, ``pipeline.catalogue.SweepDefaults``)
            with ``{eval_set}`` filled in.
        eval_set: the eval set of the default metric (default: the catalogue's).
        mode: ``max`` or ``min`` (default: the catalogue's, else ``max``).
        asha_metric: the intermediate result ASHA compares trials on, ``<training stage>/loss``
            (or ``/lr``), reported every ``log_every`` steps while that stage trains; None: ASHA
            uses ``metric``, which only a trial's final result carries (so it stops no trial
            mid-training).
        asha_mode: ``min`` or ``max`` for ``asha_metric`` (default ``min``).
        scheduler: ``asha`` (default) or ``none`` (FIFO: every trial runs to its end).
        asha: ASHA's settings.
        num_samples: Tune's ``num_samples`` (each grid point is sampled that often).
        seeds: values of ``seed_key`` each configuration runs with (a grid axis); results are
            aggregated into mean and standard deviation per configuration.
        seed_key: the config key the seeds set (default: the catalogue's; required with seeds).
        resources: a trial's resources (``{"CPU": 1, "GPU": 0.5, "<custom>": 1}``): the trial's
            driver; a training stage's workers ask for their own (``scaling``).
        max_concurrent_trials: at most this many trials at once (default: as many as leave CPUs
            for one trial's largest stage besides the trials themselves: :func:`trial_concurrency`).
        max_failures: times Tune retries a failed trial.
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    set: list[str] = []
    space: dict[str, Dist]
    metric: str | None = None
    eval_set: str | None = None
    mode: Literal["max", "min"] = "max"
    asha_metric: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+/(loss|lr)$")
    asha_mode: Literal["max", "min"] = "min"
    scheduler: Literal["asha", "none"] = "asha"
    asha: AshaSection = AshaSection()
    num_samples: int = Field(1, gt=0)
    seeds: list[int] = []
    seed_key: str | None = None
    resources: dict[str, float] = {"CPU": 1.0}
    max_concurrent_trials: int | None = Field(None, gt=0)
    max_failures: int = Field(0, ge=0)
    _metric_template: str | None = PrivateAttr(None)  # the catalogue's default metric (load_sweep)

    @property
    def target(self) -> str:
        """The metric trials are ranked on: ``metric``, else the catalogue's default metric with
        this file's ``eval_set`` (:func:`load_sweep` checks that there is one).

        Raises:
            ConfigError: neither is there (a sweep file not read by :func:`load_sweep`).
        """
        if self.metric:
            return self.metric
        if self._metric_template is None:
            raise ConfigError(f"sweep {self.name}: no metric (metric: <stage>/<metric>)")
        return self._metric_template.format(eval_set=self.eval_set)


def load_sweep(path: str | os.PathLike, defaults: SweepDefaults | None = None) -> SweepFile:
    """Read and validate a sweep file; what it does not say comes from ``defaults`` (the stage
    catalogue's ``SWEEP_DEFAULTS``: ``load_catalogue().sweep_defaults`` when None).

    Raises:
        ConfigError: missing file, not YAML, or an invalid field (named, with the nearest valid
            key for a typo), no metric (neither the file's nor a default one), seeds without a
            seed key, or a seed key that is also searched.
    """
    if defaults is None:
        defaults = load_catalogue().sweep_defaults
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {str(p)!r} does not exist (sweeps live in configs/sweeps/*.yaml)")
    raw = read_yaml(p, "(a sweep file: name, space, metric, ...)")
    given = {"mode": defaults.mode, "eval_set": defaults.eval_set, "seed_key": defaults.seed_key}
    raw = {**{k: v for k, v in given.items() if v is not None}, **raw}
    try:
        sw = SweepFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(explain(e, SweepFile, "sweep", p)) from None
    sw._metric_template = defaults.metric
    template = defaults.metric
    if sw.metric is None and (template is None or ("{eval_set}" in template and sw.eval_set is None)):
        hint = f" (or an eval_set for the default metric {template})" if template else ""
        raise ConfigError(f"{p}: no metric to rank trials on: give metric: <stage>/<metric>{hint}")
    if sw.seeds and sw.seed_key is None:
        raise ConfigError(f"{p}: seeds without seed_key: name the config key the seeds set (seed_key: <stage>.<key>)")
    if sw.seeds and sw.seed_key in sw.space:
        raise ConfigError(f"{p}: {sw.seed_key} is both searched (space) and the seed key; drop one")
    return sw


__all__ = ["AshaSection", "Dist", "SweepFile", "load_sweep"]
