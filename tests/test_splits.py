"""Unseen-pixel policies, deterministic splits, skip counting, stats and the manifest guard."""

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from zeroseg.data.classes import resolve_split
from zeroseg.data.coco import read_coco
from zeroseg.data.mask_folder import read_mask_folder
from zeroseg.data.split_files import label_path, manifest_schema, write_manifest
from zeroseg.data.splits import assign_val, make_records, process_batch, process_record, split_unit, summarize, truncate
from zeroseg.errors import BadImageError, DataError

W, H = 8, 6
PERSON, CAR, DOG = 0, 1, 2


def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def ann(aid, image, cat, seg, crowd=0):
    return {"id": aid, "image_id": image, "category_id": cat, "segmentation": seg, "iscrowd": crowd}


@pytest.fixture
def coco(tmp_path):
    """Five 8x6 images; vocabulary person, car, dog (COCO ids 1, 3, 18); dog is unseen.

    1: person + car (no dog)       2: person with a dog on top    3: only a dog
    4: person + crowd of dogs      5: no annotations
    """
    img = tmp_path / "images"
    img.mkdir()
    for i in range(1, 6):
        Image.new("RGB", (W, H), (i, i, i)).save(img / f"{i:04d}.png")
    anns = [
        ann(1, 1, 1, rect(0, 0, 4, 6)),
        ann(2, 1, 3, rect(4, 0, 8, 3)),
        ann(3, 2, 1, rect(0, 0, 8, 6)),
        ann(4, 2, 18, rect(2, 2, 4, 4)),
        ann(5, 3, 18, rect(0, 0, 2, 2)),
        ann(6, 4, 1, rect(0, 0, 2, 6)),
        ann(7, 4, 18, rect(4, 0, 8, 6), crowd=1),
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i:04d}.png", "width": W, "height": H} for i in range(1, 6)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    lst = read_coco(tmp_path / "ann.json", img)
    vocab = resolve_split(lst.names, dataset="toy", unseen=["dog"])
    return lst, vocab


def run(lst, vocab, policy, split="train"):
    recs = make_records(
        lst.records, split=split, dataset="toy", policy=policy, unseen=vocab.unseen, num_classes=len(vocab.names)
    )
    out = {}
    for r in recs:
        res, png = process_record(r)
        label = np.asarray(Image.open(io.BytesIO(png))) if png else None
        out[res["image_id"]] = (res, label)
    return out


def test_ignore_policy_keeps_images_and_blanks_unseen_pixels(coco):
    lst, vocab = coco
    assert vocab.unseen == (DOG,)
    out = run(lst, vocab, "ignore")
    status = {k: (r["status"], r["reason"]) for k, (r, _) in out.items()}
    assert status == {
        "0001": ("kept", None),
        "0002": ("kept", None),
        "0003": ("dropped", "no_labelled_pixels"),
        "0004": ("kept", None),
        "0005": ("dropped", "no_labelled_pixels"),
    }
    res, label = out["0002"]
    want = np.zeros((H, W), np.uint8)
    want[2:4, 2:4] = 255  # the dog on top of the person
    np.testing.assert_array_equal(label, want)
    assert res["classes"] == [PERSON] and res["unseen_pixels"] == 4 and res["pixels"] == {"0": 44}
    res, label = out["0001"]
    want = np.full((H, W), 255, np.uint8)
    want[:, 0:4] = PERSON
    want[0:3, 4:8] = CAR
    np.testing.assert_array_equal(label, want)
    assert res["classes"] == [PERSON, CAR] and (res["height"], res["width"]) == (H, W)
    res, label = out["0004"]  # crowd dogs are ignore anyway
    assert (label[:, 4:] == 255).all() and (label[:, :2] == PERSON).all() and res["unseen_pixels"] == 24


def test_drop_policy_drops_every_image_with_an_unseen_pixel(coco):
    lst, vocab = coco
    out = run(lst, vocab, "drop")
    status = {k: (r["status"], r["reason"]) for k, (r, _) in out.items()}
    assert status == {
        "0001": ("kept", None),
        "0002": ("dropped", "unseen_pixels"),
        "0003": ("dropped", "unseen_pixels"),
        "0004": ("dropped", "unseen_pixels"),
        "0005": ("dropped", "no_labelled_pixels"),
    }
    assert out["0002"][1] is None  # no PNG for a dropped image
    stats = summarize([r for r, _ in out.values()], vocab, policy="drop")
    assert stats["kept"] == 1 and stats["dropped"] == {"no_labelled_pixels": 1, "unseen_pixels": 3}
    assert stats["no_annotations"] == 1 and stats["images_with_unseen"] == 3
    assert stats["pixels_per_class"] == {"person": 24, "car": 12, "dog": 0} and stats["unseen_present"] == []


def test_eval_sets_keep_all_classes_and_empty_images(coco):
    lst, vocab = coco
    out = run(lst, vocab, "eval", split="val")
    assert all(r["status"] == "kept" for r, _ in out.values())
    assert out["0002"][0]["classes"] == [PERSON, DOG] and (out["0002"][1][2:4, 2:4] == DOG).all()
    assert out["0005"][0]["empty"] and (out["0005"][1] == 255).all()
    stats = summarize([r for r, _ in out.values()], vocab, policy="eval")
    assert stats["unseen_present"] == ["dog"] and stats["no_labelled_pixels"] == 1 and stats["dropped"] == {}


def test_split_is_deterministic_seeded_and_order_free():
    ids = [f"{i:012d}" for i in range(400)]
    a = assign_val(ids, 0.25, seed=0)
    assert a == assign_val(list(reversed(ids)), 0.25, seed=0) == assign_val(sorted(ids, key=hash), 0.25, seed=0)
    assert a == assign_val(ids, 0.25, seed=0)
    assert a != assign_val(ids, 0.25, seed=1)
    # len(a) ~ Binomial(400, 0.25): mean 100, sigma = sqrt(400 * 0.25 * 0.75) ~ 8.7, so +-4 sigma ~ [65, 135]
    assert 65 <= len(a) <= 135
    # a subset keeps its members' assignment (stable when images are added or removed)
    assert assign_val(ids[:100], 0.25, seed=0) == {i for i in a if i in set(ids[:100])}
    assert assign_val(ids, 0.0, seed=0) == set()
    # the documented formula, computed independently: sha256(f"{seed}:{id}"), first 8 bytes big-endian / 2**64
    for image_id, seed in (("x", 3), ("000000000009", 0), ("img/007", 42)):
        want = int.from_bytes(hashlib.sha256(f"{seed}:{image_id}".encode()).digest()[:8], "big") / 2**64
        assert split_unit(image_id, seed) == want and 0.0 <= want < 1.0
    assert split_unit("x", 3) != split_unit("x", 4) and split_unit("x", 3) != split_unit("y", 3)
    # assign_val is exactly the ids whose unit falls below the fraction
    assert a == {i for i in ids if split_unit(i, 0) < 0.25}


def test_truncate_takes_first_ids_in_sorted_order():
    recs = [{"image_id": i} for i in ("c", "a", "d", "b")]
    assert [r["image_id"] for r in truncate(recs, 2)] == ["a", "b"]
    assert len(truncate(recs, None)) == 4


def test_bad_image_error_or_skip_with_counting(coco, tmp_path):
    lst, vocab = coco
    bad = lst.records[0]["image_path"]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H * 8, W * 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    with open(bad, "wb") as f:  # a truncated JPEG under the .png name
        f.write(buf.getvalue()[:200])
    recs = make_records(lst.records, split="train", dataset="toy", policy="ignore", unseen=vocab.unseen, num_classes=3)
    with pytest.raises(BadImageError, match=r"0001\.png is corrupt or truncated"):
        process_record(recs[0], on_bad_image="error")
    results = [process_record(r, on_bad_image="skip")[0] for r in recs]
    assert results[0]["status"] == "skipped"
    stats = summarize(results, vocab, policy="ignore")
    assert stats["skipped"] == 1 and stats["skipped_files"][0]["file"] == bad
    assert "truncated" in stats["skipped_files"][0]["error"]
    assert stats["images_total"] == 5 and stats["kept"] == 2


def test_size_mismatch_is_a_bad_image(coco):
    lst, vocab = coco
    Image.new("RGB", (W + 1, H)).save(lst.records[1]["image_path"])
    recs = make_records(lst.records, split="val", dataset="toy", policy="eval", unseen=(), num_classes=3)
    with pytest.raises(BadImageError, match="is 9x6 but its annotation says 8x6"):
        process_record(recs[1])


def test_process_batch_raises_label_errors_and_skips_only_bad_images(tmp_path):
    """A label error always raises (a DataError, whatever ``on_bad_image``: the stage carries it
    to the driver with ``pipeline.errors.carry_user_errors``); a bad image file is skipped and
    reported as such with ``on_bad_image: skip``."""
    img, lbl = tmp_path / "img", tmp_path / "lbl"
    img.mkdir()
    lbl.mkdir()
    for stem, v in (("bad", 9), ("ok", 1), ("trunc", 0)):
        Image.new("RGB", (4, 3)).save(img / f"{stem}.jpg")
        Image.fromarray(np.full((3, 4), v, np.uint8), mode="L").save(lbl / f"{stem}.png")
    data = (img / "trunc.jpg").read_bytes()
    (img / "trunc.jpg").write_bytes(data[: len(data) // 2])
    lst = read_mask_folder(img, lbl, ["a", "b"], dataset="m")
    recs = {
        r["image_id"]: json.dumps(r)
        for r in make_records(lst.records, split="m", dataset="m", policy="eval", unseen=[], num_classes=2)
    }
    assert set(recs) == {"bad", "ok", "trunc"}
    for on_bad_image in ("skip", "error"):  # label errors are never skipped
        with pytest.raises(DataError, match=r"value\(s\) \[9\] outside the class list: 2 classes") as e:
            process_batch({"record": np.array([recs["ok"], recs["bad"]], dtype=object)}, on_bad_image=on_bad_image)
        assert not isinstance(e.value, BadImageError)
    with pytest.raises(BadImageError, match=r"trunc\.jpg is corrupt or truncated"):
        process_batch({"record": np.array([recs["trunc"]], dtype=object)}, on_bad_image="error")
    out = process_batch({"record": np.array([recs["trunc"], recs["ok"]], dtype=object)}, on_bad_image="skip")
    res = [json.loads(x) for x in out["result"]]
    assert [(r["image_id"], r["status"]) for r in res] == [("trunc", "skipped"), ("ok", "kept")]
    assert "truncated" in res[0]["reason"] and res[1]["classes"] == [1] and res[1]["pixels"] == {"1": 12}
    assert out["png"][0] == b"" and np.asarray(Image.open(io.BytesIO(out["png"][1]))).tolist() == [[1] * 4] * 3


def _row(image_id, classes):
    return {
        "image_id": image_id,
        "image": f"sub/{image_id}.jpg",
        "label": f"labels/train/{image_id}.png",
        "height": 6,
        "width": 8,
        "classes": classes,
        "dataset": "toy",
    }


def test_write_manifest_schema_and_inductive_guard(tmp_path, coco):
    _, vocab = coco
    p = tmp_path / "m" / "train.parquet"
    write_manifest(p, [_row("a", [0, 1]), _row("b", [])], vocab, inductive_train=True)
    t = pq.read_table(p)
    assert pa.types.is_list(t.schema.field("classes").type)
    assert t.schema.field("classes").type.value_type == pa.int32() == t.schema.field("height").type
    assert t.column_names == ["image_id", "image", "label", "height", "width", "classes", "dataset"]
    assert t.schema.equals(manifest_schema())
    assert t.to_pylist()[0] == {
        "image_id": "a",
        "image": "sub/a.jpg",
        "label": "labels/train/a.png",
        "height": 6,
        "width": 8,
        "classes": [0, 1],
        "dataset": "toy",
    }
    assert [(f.name, str(f.type)) for f in manifest_schema()] == [
        ("image_id", "string"),
        ("image", "string"),
        ("label", "string"),
        ("height", "int32"),
        ("width", "int32"),
        ("classes", "list<item: int32>"),
        ("dataset", "string"),
    ]
    with pytest.raises(DataError, match=r"image 'leaky' carries unseen class\(es\) \['dog'\]"):
        write_manifest(p, [_row("a", [0]), _row("leaky", [0, DOG])], vocab, inductive_train=True)
    write_manifest(tmp_path / "val.parquet", [_row("leaky", [0, DOG])], vocab, inductive_train=False)
    with pytest.raises(DataError, match="outside the 3 classes"):
        write_manifest(tmp_path / "val.parquet", [_row("x", [7])], vocab, inductive_train=False)
    with pytest.raises(DataError, match="appears twice"):
        write_manifest(tmp_path / "val.parquet", [_row("x", [0]), _row("x", [1])], vocab, inductive_train=False)


def test_label_path_is_relative_to_the_output_dir(tmp_path):
    assert label_path(tmp_path, "val", "000000000025") == tmp_path / "labels" / "val" / "000000000025.png"
    assert label_path("", "camvid", "0001TP_008550").as_posix() == "labels/camvid/0001TP_008550.png"


def test_seen_class_validation_under_drop_and_transductive_policies(coco):
    """Seen-class validation (pseudo_unseen_split) on the toy: dog (the benchmark's unseen class) is
    excluded, car plays unseen. By hand from the fixture's rectangles."""
    from zeroseg.data.split_rules import pseudo_unseen_split
    from zeroseg.data.splits import process_record_heldout

    lst, vocab = coco
    work, excluded = pseudo_unseen_split(vocab, pseudo_unseen=["car"])
    assert (work.names, work.seen, work.unseen, excluded) == (("person", "car"), (PERSON,), (CAR,), (DOG,))

    def go(policy):
        recs = make_records(
            lst.records,
            split="train",
            dataset="toy",
            policy=policy,
            unseen=work.unseen,
            num_classes=3,
            excluded=excluded,
        )
        return {r["image_id"]: process_record_heldout(r) for r in recs}

    # drop (PADing): an image with a dog pixel, its crowd region included, is dropped as the benchmark
    # run drops it; one with a car pixel (pseudo-unseen) as an unseen image
    out = go("drop")
    assert {k: (r["status"], r["reason"], r.get("excluded_pixels")) for k, (r, _, _) in out.items()} == {
        "0001": ("dropped", "unseen_pixels", 0),
        "0002": ("dropped", "excluded_pixels", 4),
        "0003": ("dropped", "excluded_pixels", 4),
        "0004": ("dropped", "excluded_pixels", 24),  # the crowd of dogs, rect 4x6
        "0005": ("dropped", "no_labelled_pixels", 0),
    }
    # transductive: car pixels carry the unlabelled marker 254 and go to the held-out label; dog
    # pixels are plain ignore and in no held-out label (self-training never learns where they are)
    out = go("unlabeled")
    res, png, held = out["0001"]
    label, held = (np.asarray(Image.open(io.BytesIO(b))) for b in (png, held))
    want = np.full((H, W), 255, np.uint8)
    want[:, 0:4] = PERSON
    want[0:3, 4:8] = 254
    np.testing.assert_array_equal(label, want)
    assert (held[0:3, 4:8] == CAR).all() and (held == 255).sum() == H * W - 12 and res["unlabeled_pixels"] == 12
    res, png, held = out["0002"]
    label, held = (np.asarray(Image.open(io.BytesIO(b))) for b in (png, held))
    assert (label[2:4, 2:4] == 255).all() and (held == 255).all() and res["excluded_pixels"] == 4


def test_exclude_classes_renumbers_and_narrows_the_labels():
    from zeroseg.data.label_policy import exclude_classes

    # 5 classes, class 1 excluded: 0 -> 0, 1 -> ignore, 2 -> 1, 3 -> 2, 4 -> 3; crowd ids follow
    label = np.array([[0, 1, 2, 3, 4, 255]], np.uint8)
    got, crowd, n = exclude_classes(label, [1], 5, crowd=[(1, 7), (3, 2), (255, 5)])
    np.testing.assert_array_equal(got, [[0, 255, 1, 2, 3, 255]])
    assert got.dtype == np.uint8 and crowd == [(2, 2)] and n == 1 + 7
    # 300 classes (16-bit labels, 65535 ignore) less 100 -> 200 classes: 8-bit labels, 255 ignore
    label = np.array([[0, 99, 100, 199, 200, 299, 65535]], np.uint16)
    got, _, n = exclude_classes(label, range(100, 200), 300)
    np.testing.assert_array_equal(got, [[0, 99, 255, 255, 100, 199, 255]])
    assert got.dtype == np.uint8 and n == 2


# ------------------------------------------------------------------------------------------
# zeroseg.data.split_rules: the seeded pseudo-unseen draw at several seeds and counts against a
# brute-force sha256 reference, seen-class validation vocabularies and their errors, the records
# of classes.json, and the frequency rule's messages and counting edges.
# ------------------------------------------------------------------------------------------
from zeroseg.data.split_rules import (  # noqa: E402
    PSEUDO_UNSEEN_PROTOCOL,
    draw_pseudo_unseen,
    frequency_record,
    frequency_split,
    images_per_class,
    pseudo_unseen_record,
    pseudo_unseen_split,
)
from zeroseg.errors import ConfigError  # noqa: E402

NAMES = ["wall", "sky", "lamp", "tiara", "yurt", "road", "cat", "dog", "bus", "tree"]


def _unit(name, seed):
    """The documented hash: sha256(f"{seed}:{name}"), first 8 bytes big-endian / 2**64."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") / 2**64


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
@pytest.mark.parametrize("count", [0, 1, 3, 9])
def test_draw_pseudo_unseen_is_the_smallest_hashes_in_names_order(seed, count):
    ranked = sorted(NAMES, key=lambda n: _unit(n, seed))
    want = [n for n in NAMES if n in set(ranked[:count])]
    got = draw_pseudo_unseen(NAMES, count, seed)
    assert got == want and len(got) == count
    # the same draw for any order of the names (returned in the order given)
    rev = list(reversed(NAMES))
    assert draw_pseudo_unseen(rev, count, seed) == [n for n in rev if n in set(want)]


def test_draws_differ_across_seeds_and_nest_across_counts():
    draws = {seed: draw_pseudo_unseen(NAMES, 3, seed) for seed in range(6)}
    assert len({tuple(d) for d in draws.values()}) > 1  # the seed matters
    for seed in (0, 5):
        small, big = set(draw_pseudo_unseen(NAMES, 2, seed)), set(draw_pseudo_unseen(NAMES, 5, seed))
        assert small < big  # a larger count adds classes, keeps the drawn ones
    # a name's draw does not depend on the rest of the vocabulary: drawing from a subset that holds
    # the full draw gives the same classes
    d = draw_pseudo_unseen(NAMES, 3, 11)
    sub = [n for n in NAMES if n in d or n in ("wall", "tree", "cat")]
    assert set(draw_pseudo_unseen(sub, 3, 11)) == set(d)


def _train():
    # 6 classes, unseen (benchmark) ids 1 and 4 in the middle, not at the end
    names = ["a", "b", "c", "d", "e", "f"]
    return resolve_split(names, dataset="toy", unseen=["b", "e"])


def test_pseudo_unseen_split_by_names_renumbers_around_the_excluded_classes():
    train = _train()
    assert train.seen == (0, 2, 3, 5) and train.unseen == (1, 4)
    vocab, excluded = pseudo_unseen_split(train, pseudo_unseen=["f", "c"])
    # keep a, c, d, f -> new ids 0, 1, 2, 3; pseudo-unseen c (1) and f (3); seen a (0), d (2)
    assert excluded == (1, 4)
    assert vocab.names == ("a", "c", "d", "f") and vocab.prompt_names == ("a", "c", "d", "f")
    assert vocab.seen == (0, 2) and vocab.unseen == (1, 3) and vocab.dataset == "toy"
    assert vocab.ignore_index == 255
    rec = pseudo_unseen_record(vocab, train, {"pseudo_unseen": ["f", "c"], "seed": 0})
    assert rec == {
        "protocol": PSEUDO_UNSEEN_PROTOCOL,
        "how": {"pseudo_unseen": ["f", "c"], "seed": 0},
        "pseudo_unseen": ["c", "f"],
        "excluded": ["b", "e"],
        "benchmark_classes": 6,
    }


@pytest.mark.parametrize("seed", [0, 3, 9])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_pseudo_unseen_split_by_count_draws_among_the_seen_classes(seed, count):
    train = _train()
    seen_names = ["a", "c", "d", "f"]
    drawn = sorted(seen_names, key=lambda n: _unit(n, seed))[:count]
    vocab, excluded = pseudo_unseen_split(train, count=count, seed=seed)
    assert excluded == (1, 4) and vocab.names == ("a", "c", "d", "f")
    assert vocab.unseen_names == tuple(n for n in seen_names if n in drawn)
    assert vocab.seen_names == tuple(n for n in seen_names if n not in drawn)


def test_pseudo_unseen_split_errors_name_the_key():
    train = _train()
    with pytest.raises(ConfigError, match="exactly one"):
        pseudo_unseen_split(train)
    with pytest.raises(ConfigError, match="exactly one"):
        pseudo_unseen_split(train, pseudo_unseen=["a"], count=1)
    with pytest.raises(ConfigError, match=r"k\.pseudo_unseen: 'cc' is not a class of dataset 'toy'; nearest: 'c'"):
        pseudo_unseen_split(train, pseudo_unseen=["cc"], key="k")
    with pytest.raises(ConfigError, match=r"names \['a'\] more than once"):
        pseudo_unseen_split(train, pseudo_unseen=["a", "c", "a"])
    with pytest.raises(ConfigError, match=r"\['b'\] is an unseen class .* remove it \(seen classes: a, c, d, f\)"):
        pseudo_unseen_split(train, pseudo_unseen=["a", "b"])
    with pytest.raises(ConfigError, match=r"\['b', 'e'\] are unseen classes .* remove them"):
        pseudo_unseen_split(train, pseudo_unseen=["b", "e"])
    # all 4 seen classes: refused; 3 of 4 is the largest legal choice
    with pytest.raises(ConfigError, match="names all 4 seen classes"):
        pseudo_unseen_split(train, pseudo_unseen=["a", "c", "d", "f"])
    assert pseudo_unseen_split(train, pseudo_unseen=["a", "c", "d"])[0].seen_names == ("f",)
    with pytest.raises(ConfigError, match=r"pseudo_unseen_count = 4, but .* has 4 seen classes.*below 4"):
        pseudo_unseen_split(train, count=4)
    assert pseudo_unseen_split(train, count=3)[0].seen != ()
    # more than 8 seen classes: the list in the message is cut with ", ..."
    big = resolve_split([f"c{i}" for i in range(12)], dataset="big", unseen=["c11"])
    with pytest.raises(ConfigError, match=r"seen classes: c0, c1, c2, c3, c4, c5, c6, c7, \.\.\.\)"):
        pseudo_unseen_split(big, pseudo_unseen=["c11"])
    with pytest.raises(ConfigError, match=r"seen classes: a, c, d, f\)"):
        pseudo_unseen_split(train, pseudo_unseen=["e"])


def test_frequency_rule_messages_and_record():
    names, counts = ["a", "b", "c", "d"], [7, 2, 9, 0]
    # the threshold just below and at a count: 8 -> c seen (9 > 8); 9 -> nobody
    v = frequency_split(names, counts, min_images=8, dataset="toy", images=12)
    assert v.seen_names == ("c",) and v.unseen_names == ("a", "b", "d")
    with pytest.raises(
        ConfigError, match=r"in more than 9 of its 12 training images \(the most frequent class is in 9\).*below 9"
    ):
        frequency_split(names, counts, min_images=9, dataset="toy", images=12)
    # every class in more than min_images: -1 (0 > -1) -> the rarest is in 0
    with pytest.raises(ConfigError, match=r"\(the rarest class is in 0\).*set k to at least 0"):
        frequency_split(names, counts, min_images=-1, dataset="toy", images=12, key="k")
    with pytest.raises(ConfigError, match="0 class counts for 4 classes"):
        frequency_split(names, [], min_images=1, dataset="toy", images=0)
    rec = frequency_record(v, counts, min_images=8, images=12)
    assert rec["rule"] == "frequency" and rec["min_images"] == 8 and rec["counted_images"] == 12
    assert rec["images_per_class"] == {"a": 7, "b": 2, "c": 9, "d": 0}
    assert list(rec["images_per_class"]) == names and "training images" in rec["counted"]


def test_images_per_class_counts_a_repeated_class_once():
    results = [
        {"status": "kept", "classes": [3, 3, 0]},
        {"status": "dropped", "classes": [0]},
        {"status": "skipped", "classes": [1]},
        {"status": "kept", "classes": [3]},
    ]
    assert images_per_class(results, 5) == ([2, 0, 0, 2, 0], 3)
    assert images_per_class([], 2) == ([0, 0], 0)


# ------------------------------------------------------------------------------------------
# zeroseg.data.label_policy by hand: each policy on a label with unseen pixels and crowd regions,
# uint8 and uint16, and the transductive vocabulary limits just below and at the limit
# ------------------------------------------------------------------------------------------
def test_unseen_policies_by_hand_with_crowd_regions():
    from zeroseg.data.label_policy import apply_unseen_policy, heldout_label

    label = np.array([[0, 2, 255], [3, 2, 1]], np.uint8)  # unseen {2, 3}: 3 pixels
    before = label.copy()
    out, n = apply_unseen_policy(label, [2, 3], "ignore", crowd=[(2, 5), (1, 4)])
    assert out.tolist() == [[0, 255, 255], [255, 255, 1]] and n == 3 + 5  # the unseen crowd region counts
    np.testing.assert_array_equal(label, before)  # the input is not modified
    out, n = apply_unseen_policy(label, [2, 3], "unlabeled")
    assert out.tolist() == [[0, 254, 255], [254, 254, 1]] and n == 3
    out, n = apply_unseen_policy(label, [2, 3], "eval", crowd=[(3, 2)])
    assert out is label and n == 5
    assert apply_unseen_policy(label, [2, 3], "drop") == (None, 3)
    # only an unseen crowd region, no unseen pixel: drop drops, ignore keeps the label as it is
    seen_only = np.array([[0, 1]], np.uint8)
    assert apply_unseen_policy(seen_only, [2], "drop", crowd=[(2, 1)]) == (None, 1)
    out, n = apply_unseen_policy(seen_only, [2], "ignore", crowd=[(2, 1), (0, 9)])
    assert out.tolist() == [[0, 1]] and n == 1
    assert apply_unseen_policy(seen_only, [2], "drop", crowd=[(0, 9)])[0] is seen_only
    assert apply_unseen_policy(seen_only, [], "drop") == (seen_only, 0)
    # uint16 labels: ignore 65535, unlabelled 65534
    wide = np.array([[300, 2, 65535]], np.uint16)
    assert apply_unseen_policy(wide, [300], "ignore")[0].tolist() == [[65535, 2, 65535]]
    assert apply_unseen_policy(wide, [300], "unlabeled")[0].tolist() == [[65534, 2, 65535]]
    assert heldout_label(wide, [300]).tolist() == [[300, 65535, 65535]]
    assert heldout_label(label, []).tolist() == [[255] * 3] * 2
    assert heldout_label(label, [3]).dtype == np.uint8


def test_transductive_vocabulary_limit_and_label_ignore():
    from zeroseg.data.label_policy import check_transductive_vocabulary, label_ignore, unlabeled_index

    assert unlabeled_index(255) == 254 and unlabeled_index(65535) == 65534
    assert check_transductive_vocabulary(1, "toy") == 254
    assert check_transductive_vocabulary(254, "toy") == 254
    with pytest.raises(ConfigError, match=r"k: dataset 'toy' has 255 classes, so label value 254 is a class id"):
        check_transductive_vocabulary(255, "toy", key="k")
    assert check_transductive_vocabulary(256, "toy") == 65534
    assert check_transductive_vocabulary(65534, "toy") == 65534
    with pytest.raises(ConfigError, match="65535 classes, so label value 65534"):
        check_transductive_vocabulary(65535, "toy")
    assert label_ignore(np.zeros(2, np.uint8)) == 255 and label_ignore(np.zeros(2, np.uint16)) == 65535
    for dt in (np.int32, np.int64, np.uint32, np.int16):
        with pytest.raises(ValueError, match="uint8 or uint16"):
            label_ignore(np.zeros(2, dt))


def test_exclude_classes_counts_excluded_crowd_and_keeps_16_bit_when_needed():
    from zeroseg.data.label_policy import exclude_classes

    # 4 classes, 0 and 2 excluded: 1 -> 0, 3 -> 1; pixels of 0 and 2 -> ignore; crowd (2, 6) counts
    label = np.array([[0, 1, 2], [3, 255, 0]], np.uint8)
    got, crowd, n = exclude_classes(label, [2, 0, 2], 4, crowd=[(2, 6), (3, 1), (9, 4)])
    assert got.tolist() == [[255, 0, 255], [1, 255, 255]] and n == 3 + 6 and crowd == [(1, 1)]
    # nothing excluded: same ids, no count
    got, crowd, n = exclude_classes(label, [], 4, crowd=[(1, 2)])
    assert got.tolist() == label.tolist() and n == 0 and crowd == [(1, 2)]
    # 400 classes less 100 -> 300 classes: still 16-bit, ignore 65535
    wide = np.array([[0, 150, 399, 65535]], np.uint16)
    got, _, n = exclude_classes(wide, range(100, 200), 400)
    assert got.dtype == np.uint16 and got.tolist() == [[0, 65535, 299, 65535]] and n == 1
    # 256 classes less 1 -> 255 classes: 8-bit
    got, _, _ = exclude_classes(np.array([[0, 255, 1]], np.uint16), [0], 256)
    assert got.dtype == np.uint8 and got.tolist() == [[255, 254, 0]]


# ------------------------------------------------------------------------------------------
# zeroseg.data.split_files: classes.json round trip and errors, the transductive entry, the
# heldout column, class id boundaries of the manifest check
# ------------------------------------------------------------------------------------------
def test_classes_json_round_trip_and_its_optional_entries(tmp_path):
    from zeroseg.data.split_files import read_classes_json, read_transductive, write_classes_json

    train = resolve_split(["a", "b", "c"], dataset="toy", unseen=["b"])
    ev = resolve_split(["a", "b", "c", "d"], dataset="other", unseen=["d"])
    p = tmp_path / "classes.json"
    write_classes_json(p, train, {"val": train, "other": ev})
    assert p.read_text().endswith("}\n")
    d = json.loads(p.read_text())
    assert set(d) == {"train", "eval"}  # no optional entry unless given
    t, e = read_classes_json(p)
    assert t == train and e == {"val": train, "other": ev} and list(e) == ["val", "other"]
    assert read_transductive(p) is None
    write_classes_json(
        p,
        train,
        {},
        split={"rule": "frequency"},
        transductive={"unlabeled_index": 254, "heldout": "heldout"},
        pseudo_unseen={"pseudo_unseen": ["a"]},
    )
    d = json.loads(p.read_text())
    assert d["split"] == {"rule": "frequency"} and d["pseudo_unseen"] == {"pseudo_unseen": ["a"]}
    assert read_transductive(p) == {"unlabeled_index": 254, "heldout": "heldout"}
    assert read_classes_json(p) == (train, {})
    # errors
    with pytest.raises(DataError, match="does not exist"):
        read_classes_json(tmp_path / "nope.json")
    with pytest.raises(DataError, match="does not exist"):
        read_transductive(tmp_path / "nope.json")
    for text, err in (
        ("{", "JSONDecodeError"),
        ('{"train": {}}', "KeyError"),
        ('{"eval": {}}', "KeyError"),
        ("[1]", "TypeError"),
    ):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(DataError, match=f"is malformed.*{err}"):
            read_classes_json(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="is malformed .JSONDecodeError"):
        read_transductive(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(DataError, match="is malformed .AttributeError"):
        read_transductive(tmp_path / "bad.json")
    for entry in (
        {"heldout": "h"},
        {"unlabeled_index": "x", "heldout": "h"},
        {"unlabeled_index": None, "heldout": "h"},
    ):
        (tmp_path / "bad.json").write_text(json.dumps({"transductive": entry}))
        with pytest.raises(DataError, match="malformed 'transductive' entry"):
            read_transductive(tmp_path / "bad.json")


def test_manifest_heldout_column_and_class_id_edges(tmp_path, coco):
    from zeroseg.data.split_files import heldout_path

    _, vocab = coco  # 3 classes, dog (2) unseen
    rows = [dict(_row("a", [0, 2]), heldout="heldout/train/a.png"), dict(_row("b", []), heldout="heldout/train/b.png")]
    p = tmp_path / "t.parquet"
    write_manifest(p, rows, vocab, inductive_train=False)
    t = pq.read_table(p)
    assert t.column_names[-1] == "heldout" and t.schema.equals(manifest_schema(heldout=True))
    assert t.column("heldout").to_pylist() == ["heldout/train/a.png", "heldout/train/b.png"]
    # one row without it: no column
    write_manifest(p, [rows[0], _row("c", [1])], vocab, inductive_train=False)
    assert "heldout" not in pq.read_table(p).column_names
    write_manifest(p, [], vocab, inductive_train=True)
    assert pq.read_table(p).num_rows == 0 and "heldout" not in pq.read_table(p).column_names
    # class ids 0 and C - 1 = 2 are in the vocabulary, -1 and 3 are not
    for bad in (-1, 3):
        with pytest.raises(DataError, match=rf"image 'x' has class ids \[{bad}\] outside the 3 classes of 'toy'"):
            write_manifest(p, [_row("x", [0, bad])], vocab, inductive_train=False)
    # the inductive guard names the ids and the names, sorted
    with pytest.raises(DataError, match=r"\['dog'\] \(ids \[2\]\)"):
        write_manifest(p, [_row("x", [2, 0, 2])], vocab, inductive_train=True)
    assert heldout_path(tmp_path, "train", "007") == tmp_path / "heldout" / "train" / "007.png"


# ------------------------------------------------------------------------------------------
# zeroseg.data.splits: summarize on synthetic results by hand, the argument checks at their bounds
# ------------------------------------------------------------------------------------------
def _res(image_id, status, reason=None, pixels=None, unseen=0, **extra):
    return {
        "image_id": image_id,
        "image_uri": f"/img/{image_id}.jpg",
        "status": status,
        "reason": reason,
        "pixels": pixels or {},
        "unseen_pixels": unseen,
        **extra,
    }


def test_summarize_by_hand():
    vocab = resolve_split(["person", "car", "dog", "cat"], dataset="toy", unseen=["dog", "cat"])
    results = [
        _res("a", "kept", pixels={"0": 5, "2": 3}, unseen=3),
        _res("b", "kept", pixels={"0": 2, "1": 7}, no_annotations=True),
        _res("c", "dropped", "unseen_pixels", unseen=4),
        _res("d", "dropped", "no_labelled_pixels", empty=True),
        _res("e", "skipped", "corrupt", unseen=9),  # a skipped image counts nowhere else
        _res("0", "skipped", "missing"),
        _res("f", "kept", empty=True),
        _res("g", "dropped", "excluded_pixels", unseen=0, excluded_pixels=6),
        _res("h", "dropped", "unseen_pixels", pixels={"3": 100}, unseen=1),  # dropped pixels do not count
    ]
    s = summarize(results, vocab, policy="ignore")
    assert s == {
        "dataset": "toy",
        "policy": "ignore",
        "images_total": 9,
        "kept": 3,
        "dropped": {"excluded_pixels": 1, "no_labelled_pixels": 1, "unseen_pixels": 2},
        "dropped_total": 4,
        "skipped": 2,
        "skipped_files": [{"file": "/img/0.jpg", "error": "missing"}, {"file": "/img/e.jpg", "error": "corrupt"}],
        "no_annotations": 1,
        "no_labelled_pixels": 1,  # f only: d is dropped
        "images_with_unseen": 3,  # a, c, h (e is skipped)
        "unseen_pixels": 3 + 4 + 1,
        "excluded_pixels": 6,
        "pixels_per_class": {"person": 7, "car": 7, "dog": 3, "cat": 0},
        "unseen_present": ["dog"],
    }
    assert list(s["dropped"]) == sorted(s["dropped"])
    # no result carries excluded_pixels: no such entry
    assert "excluded_pixels" not in summarize(results[:3], vocab, policy="eval")


def test_split_argument_checks_at_their_bounds():
    from zeroseg.errors import ConfigError

    ids = [f"{i:03d}" for i in range(50)]
    assert assign_val(ids, 0.0, seed=1) == set()
    assert len(assign_val(ids, 0.999999, seed=1)) >= 45
    for bad in (1.0, -0.01, 1.5):
        with pytest.raises(ConfigError, match="val_fraction must be in"):
            assign_val(ids, bad, seed=1)
    recs = [{"image_id": i} for i in ("b", "c", "a")]
    assert truncate(recs, None) == [{"image_id": "a"}, {"image_id": "b"}, {"image_id": "c"}]
    assert truncate(recs, 0) == [] and truncate(recs, 2) == [{"image_id": "a"}, {"image_id": "b"}]
    with pytest.raises(ConfigError, match="unseen_policy 'keep' is unknown"):
        make_records(recs, split="train", dataset="t", policy="keep", unseen=[], num_classes=3)
    for policy in ("ignore", "drop", "unlabeled", "eval"):
        out = make_records(recs[:1], split="s", dataset="t", policy=policy, unseen=(2, 0), num_classes="3")
        assert out == [
            {"image_id": "b", "split": "s", "dataset": "t", "policy": policy, "unseen": [0, 2], "num_classes": 3}
        ]
    out = make_records(recs[:1], split="s", dataset="t", policy="drop", unseen=[1], num_classes=4, excluded=(3, 0))
    assert out[0]["excluded"] == [0, 3]
    with pytest.raises(ConfigError, match="on_bad_image 'ignore' is unknown"):
        process_record({"image_id": "x"}, on_bad_image="ignore")
