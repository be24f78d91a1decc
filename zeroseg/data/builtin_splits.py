"""Built-in splits: the published benchmarks' class lists (label-id order) and unseen classes.

Built-in splits (``BUILTIN_SPLITS``), unseen classes from ZegCLIP (Zhou et al., CVPR 2023)
Appendix E, Table 10, which follows SPNet / ZS3 / ZegFormer:

* ``coco_stuff171``: COCO-Stuff 164K, 171 classes (the 80 COCO things in category-id order,
  then the 91 stuff classes, as in ``../shared/data/clip-text-embeddings/class_names.json``),
  15 unseen (Table 10 writes "wall concrete"; the dataset spells it ``wall-concrete``).
* ``voc20``: PASCAL VOC 2012 without background, 20 classes, 5 unseen.
* ``pascal_context59``: PASCAL Context 59 classes (the standard list without background, mmseg
  ``PascalContextDataset59`` spellings: ``aeroplane``, ``pottedplant``, ``tvmonitor``), 10 unseen
  (Table 10 writes "tv monitor"; the dataset spells it ``tvmonitor``).

Data only (no helpers); ``zeroseg.data.classes.resolve_split`` resolves ``split.builtin`` against
``BUILTIN_SPLITS``. Nothing here imports Ray or the pipeline.
"""

from __future__ import annotations

import dataclasses

#: COCO-Stuff-171 in label-id order (== class_names.json "coco_stuff171").
COCO_STUFF_171: tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
    "banner",
    "blanket",
    "branch",
    "bridge",
    "building-other",
    "bush",
    "cabinet",
    "cage",
    "cardboard",
    "carpet",
    "ceiling-other",
    "ceiling-tile",
    "cloth",
    "clothes",
    "clouds",
    "counter",
    "cupboard",
    "curtain",
    "desk-stuff",
    "dirt",
    "door-stuff",
    "fence",
    "floor-marble",
    "floor-other",
    "floor-stone",
    "floor-tile",
    "floor-wood",
    "flower",
    "fog",
    "food-other",
    "fruit",
    "furniture-other",
    "grass",
    "gravel",
    "ground-other",
    "hill",
    "house",
    "leaves",
    "light",
    "mat",
    "metal",
    "mirror-stuff",
    "moss",
    "mountain",
    "mud",
    "napkin",
    "net",
    "paper",
    "pavement",
    "pillow",
    "plant-other",
    "plastic",
    "platform",
    "playingfield",
    "railing",
    "railroad",
    "river",
    "road",
    "rock",
    "roof",
    "rug",
    "salad",
    "sand",
    "sea",
    "shelf",
    "sky-other",
    "skyscraper",
    "snow",
    "solid-other",
    "stairs",
    "stone",
    "straw",
    "structural-other",
    "table",
    "tent",
    "textile-other",
    "towel",
    "tree",
    "vegetable",
    "wall-brick",
    "wall-concrete",
    "wall-other",
    "wall-panel",
    "wall-stone",
    "wall-tile",
    "wall-wood",
    "water-other",
    "waterdrops",
    "window-blind",
    "window-other",
    "wood",
)

#: ZegCLIP Table 10, COCO row (SPNet's 15 unseen COCO-Stuff classes).
COCO_STUFF_UNSEEN: tuple[str, ...] = (
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
)

#: SPNet's 12 validation classes of COCO-Stuff (subhc/SPNet ``splits.ipynb``: "Training classes:
#: 155+12", the ``seenval_cls`` after the seen ones in its training class list), all seen in
#: ``coco_stuff171``: the seen-class validation split that ZegFormer Sec. 4.1 refers to ("a subset of
#: the training classes as a validation set, following the cross-validation procedure [54, 55]";
#: [54] = SPNet). ``build_splits.split.pseudo_unseen`` of configs/sweeps/zegformer_gamma_lambda.yaml.
COCO_STUFF_SPNET_VAL: tuple[str, ...] = (
    "motorcycle",
    "elephant",
    "baseball bat",
    "wine glass",
    "banana",
    "chair",
    "keyboard",
    "refrigerator",
    "branch",
    "light",
    "napkin",
    "pavement",
)

#: PASCAL VOC 2012 object classes in label-id order, background excluded (== class_names.json "voc20").
VOC20: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

#: ZegCLIP Table 10, VOC row.
VOC_UNSEEN: tuple[str, ...] = ("pottedplant", "sheep", "sofa", "train", "tvmonitor")

#: PASCAL Context 59 (background excluded), mmseg ``PascalContextDataset59`` order and spellings.
PASCAL_CONTEXT_59: tuple[str, ...] = (
    "aeroplane",
    "bag",
    "bed",
    "bedclothes",
    "bench",
    "bicycle",
    "bird",
    "boat",
    "book",
    "bottle",
    "building",
    "bus",
    "cabinet",
    "car",
    "cat",
    "ceiling",
    "chair",
    "cloth",
    "computer",
    "cow",
    "cup",
    "curtain",
    "dog",
    "door",
    "fence",
    "floor",
    "flower",
    "food",
    "grass",
    "ground",
    "horse",
    "keyboard",
    "light",
    "motorbike",
    "mountain",
    "mouse",
    "person",
    "plate",
    "platform",
    "pottedplant",
    "road",
    "rock",
    "sheep",
    "shelves",
    "sidewalk",
    "sign",
    "sky",
    "snow",
    "sofa",
    "table",
    "track",
    "train",
    "tree",
    "truck",
    "tvmonitor",
    "wall",
    "water",
    "window",
    "wood",
)

#: ZegCLIP Table 10, Context row ("tv monitor" spelled as the dataset does).
PASCAL_CONTEXT_UNSEEN: tuple[str, ...] = (
    "cow",
    "motorbike",
    "sofa",
    "cat",
    "boat",
    "fence",
    "bird",
    "tvmonitor",
    "keyboard",
    "aeroplane",
)


@dataclasses.dataclass(frozen=True)
class BuiltinSplit:
    """A published benchmark split.

    Attributes:
        name: the ``split.builtin`` value.
        names: the benchmark's full class list (label-id order).
        unseen: the unseen class names.
        source: where the split comes from.
    """

    name: str
    names: tuple[str, ...]
    unseen: tuple[str, ...]
    source: str


BUILTIN_SPLITS: dict[str, BuiltinSplit] = {
    "coco_stuff171": BuiltinSplit(
        "coco_stuff171", COCO_STUFF_171, COCO_STUFF_UNSEEN, "ZegCLIP Table 10 (COCO-Stuff 164K, 156 seen / 15 unseen)"
    ),
    "voc20": BuiltinSplit("voc20", VOC20, VOC_UNSEEN, "ZegCLIP Table 10 (PASCAL VOC 2012, 15 seen / 5 unseen)"),
    "pascal_context59": BuiltinSplit(
        "pascal_context59",
        PASCAL_CONTEXT_59,
        PASCAL_CONTEXT_UNSEEN,
        "ZegCLIP Table 10 (PASCAL Context 59, 49 seen / 10 unseen)",
    ),
}
