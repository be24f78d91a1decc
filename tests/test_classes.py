"""Built-in class splits, configured splits and cross-dataset class mapping."""

import json

import pytest

from zeroseg.data.builtin_splits import BUILTIN_SPLITS, COCO_STUFF_171, PASCAL_CONTEXT_59, VOC20
from zeroseg.data.classes import Vocabulary, eval_vocabulary, resolve_split
from zeroseg.errors import ConfigError

CAMVID = [
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "signsymbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
]


def test_builtin_lists_match_the_shared_class_names(shared_data):
    names = json.loads((shared_data / "clip-text-embeddings" / "class_names.json").read_text())
    assert list(COCO_STUFF_171) == names["coco_stuff171"]
    assert list(VOC20) == names["voc20"]
    assert len(PASCAL_CONTEXT_59) == len(set(PASCAL_CONTEXT_59)) == 59
    sizes = {k: (len(b.names), len(b.unseen)) for k, b in BUILTIN_SPLITS.items()}
    assert sizes == {"coco_stuff171": (171, 15), "voc20": (20, 5), "pascal_context59": (59, 10)}
    for b in BUILTIN_SPLITS.values():
        assert set(b.unseen) <= set(b.names), b.name


def test_builtin_coco_stuff_split_ids():
    v = resolve_split(COCO_STUFF_171, dataset="cocostuff", builtin="coco_stuff171")
    assert len(v.seen) == 156 and len(v.unseen) == 15
    assert set(v.unseen_names) == {
        "cow",
        "giraffe",
        "suitcase",
        "frisbee",
        "skateboard",
        "carrot",
        "scissors",
        "cardboard",
        "clouds",
        "grass",
        "playingfield",
        "river",
        "road",
        "tree",
        "wall-concrete",
    }
    assert v.unseen[0] == COCO_STUFF_171.index("cow") == 19
    assert set(v.seen) | set(v.unseen) == set(range(171))


def test_builtin_context_split_uses_dataset_spellings():
    v = resolve_split(PASCAL_CONTEXT_59, dataset="context", builtin="pascal_context59")
    assert {"tvmonitor", "aeroplane", "motorbike"} <= set(v.unseen_names)
    assert len(v.seen) == 49


def test_builtin_split_requires_the_full_vocabulary():
    coco80 = COCO_STUFF_171[:80]
    with pytest.raises(ConfigError, match=r"lacks 91.*'banner'"):
        resolve_split(coco80, dataset="coco128", builtin="coco_stuff171")
    # extra classes are allowed and seen (e.g. VOC with background), with a warning naming them
    with pytest.warns(
        UserWarning, match=r"1 class\(es\) outside the benchmark's 20, counted as seen: \['background'\]"
    ):
        v = resolve_split(("background", *VOC20), dataset="voc", builtin="voc20")
    assert 0 in v.seen and v.unseen_names == ("pottedplant", "sheep", "sofa", "train", "tvmonitor")


def test_unknown_split_class_names_dataset_and_nearest():
    with pytest.raises(ConfigError) as e:
        resolve_split(COCO_STUFF_171[:80], dataset="coco128", unseen=["girafe", "cow"])
    msg = str(e.value)
    assert "'girafe'" in msg and "'coco128'" in msg and "'giraffe'" in msg
    with pytest.raises(ConfigError, match=r"'tv monitor'.*nearest.*'tvmonitor'"):
        resolve_split(VOC20, dataset="voc", unseen=["tv monitor"])


def test_configured_split_forms():
    names = ["a", "b", "c", "d"]
    assert resolve_split(names, dataset="x", unseen=["c"]).seen == (0, 1, 3)
    v = resolve_split(names, dataset="x", seen=["a", "d"])
    assert v.unseen == (1, 2)
    v = resolve_split(names, dataset="x", unseen=["b"], seen=["a", "c", "d"])
    assert (v.seen, v.unseen) == ((0, 2, 3), (1,))
    assert resolve_split(names, dataset="x", unseen=[]).unseen == ()
    with pytest.raises(ConfigError, match="neither seen nor unseen"):
        resolve_split(names, dataset="x", unseen=["b"], seen=["a"])
    with pytest.raises(ConfigError, match="both seen and unseen"):
        resolve_split(names, dataset="x", unseen=["b"], seen=["a", "b", "c", "d"])
    with pytest.raises(ConfigError, match="either builtin"):
        resolve_split(VOC20, dataset="x", builtin="voc20", unseen=["cow"])
    with pytest.raises(ConfigError, match="did you mean 'voc20'"):
        resolve_split(VOC20, dataset="x", builtin="voc21")


def test_class_map_resolves_seen_and_unseen_by_prompt_name():
    train = resolve_split(COCO_STUFF_171[:80], dataset="coco128", unseen=["bicycle", "giraffe"])
    ev = eval_vocabulary(
        CAMVID, dataset="camvid", train=train, class_map={"pedestrian": "person", "bicyclist": "bicycle"}
    )
    assert ev.prompt_names[9:] == ("person", "bicycle") and ev.prompt_names[:9] == tuple(CAMVID[:9])
    # car is a seen COCO class, pedestrian -> person is seen, bicyclist -> bicycle is unseen in training,
    # sky/road/... are not training classes at all -> unseen
    assert ev.seen_names == ("car", "pedestrian")
    assert ev.unseen == tuple(i for i in range(11) if CAMVID[i] not in ("car", "pedestrian"))
    # the same dataset evaluated against itself keeps the training split
    val = eval_vocabulary(train.names, dataset="coco128", train=train)
    assert (val.seen, val.unseen) == (train.seen, train.unseen)


def test_class_map_errors_name_the_nearest_class():
    train = resolve_split(COCO_STUFF_171[:80], dataset="coco128", unseen=["giraffe"])
    with pytest.raises(ConfigError, match=r"'pedestrain'.*camvid.*'pedestrian'"):
        eval_vocabulary(CAMVID, dataset="camvid", train=train, class_map={"pedestrain": "person"})
    with pytest.raises(ConfigError, match=r"'persons'.*coco128.*'person'"):
        eval_vocabulary(CAMVID, dataset="camvid", train=train, class_map={"pedestrian": "persons"})


def test_vocabulary_json_round_trip_and_checks():
    v = resolve_split(VOC20, dataset="voc", builtin="voc20")
    assert Vocabulary.from_json(json.loads(json.dumps(v.to_json()))) == v
    assert v.to_json()["ignore_index"] == 255
    with pytest.raises(ValueError, match=r"x: classes both seen and unseen: \[1\]"):
        Vocabulary("x", ("a", "b"), ("a", "b"), seen=(0, 1), unseen=(1,))
    with pytest.raises(ConfigError, match="more than once"):
        resolve_split(["a", "a"], dataset="x", unseen=[])
