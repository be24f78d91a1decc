"""Ray Data's private pass counter (``DataContext._execution_idx``), which the training feed's
per-epoch seeds and the resumed epoch rely on: this test fails loudly if a Ray upgrade removes,
renames or changes it (then update ``pipeline/raycompat.py``)."""

from __future__ import annotations

import sys

import numpy as np
import ray.cloudpickle

from pipeline.raycompat import ATTRIBUTE, pass_index, set_pass_index

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray Data tasks cannot import this module


def _tag_pass(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"pass": np.full(len(batch["id"]), pass_index())}


def passes_seen(ds, times: int) -> list[list[int]]:
    return [sorted({int(r["pass"]) for r in ds.iter_rows()}) for _ in range(times)]


def test_ray_data_pass_counter_exists_and_advances_once_per_pass(ray_local):
    import ray.data
    from ray.data import DataContext, Dataset

    assert hasattr(DataContext.get_current(), ATTRIBUTE), (
        f"ray.data.DataContext has no {ATTRIBUTE!r} any more (Ray {ray_local.__version__}): per-epoch data seeds and "
        "exact resume depend on it; find Ray's new pass counter and update pipeline/raycompat.py"
    )
    ds = ray.data.range(8, override_num_blocks=2).map_batches(_tag_pass, batch_format="numpy")
    # the UDF sees the dataset's own counter, which advances after every complete pass
    assert passes_seen(ds, 3) == [[0], [1], [2]]
    assert pass_index(ds.context) == 3

    resumed = Dataset.copy(ds, _deep_copy=True)
    assert set_pass_index(resumed.context, 5) is True
    assert passes_seen(resumed, 2) == [[5], [6]]  # a resumed run starts at its epoch


def test_missing_counter_warns_and_falls_back():
    class NoCounter:
        pass

    import warnings

    import pipeline.raycompat as dp

    dp._warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pass_index(NoCounter()) == 0 and set_pass_index(NoCounter(), 3) is False
    assert len(caught) == 1 and "Ray upgrade" in str(caught[0].message)


def test_train_v2_context_still_names_its_controller():
    # pipeline.raycompat.train_run_handles reads TrainContext.controller_actor (private, Ray 2.60)
    # so a stopped sweep trial can abort its fit; a Ray upgrade that moves it must fail here
    import dataclasses

    from ray.train.v2._internal.execution import context

    assert "controller_actor" in {f.name for f in dataclasses.fields(context.TrainContext)}, (
        "Ray Train's TrainContext has no controller_actor any more: update pipeline/raycompat.py"
    )
    assert callable(context.get_train_context)


def test_train_run_handles_outside_a_fit_are_empty(ray_local):
    from pipeline.raycompat import train_run_handles

    assert train_run_handles() == {"controller": None, "placement_group": None}
