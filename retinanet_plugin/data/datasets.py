"""Registering users' datasets in detectron2's DatasetCatalog / MetadataCatalog.

COCO files are loaded by detectron2's ``load_coco_json``, VOC splits by
:func:`.validation.load_voc_split` (detectron2's ``load_voc_instances`` records, which that loader
cannot give for a split of one image), both wrapped in the checks of :mod:`.validation`; this
module checks the paths up front, reads VOC class names from the XML files when none are given,
and works out the number of classes a training set has.
"""

import difflib
import logging
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .validation import (
    DatasetError,
    check_coco_json,
    clean_boxes,
    coco_categories,
    correct_image_sizes,
    forget_coco_json,
    load_voc_split,
    mark_voc_difficult,
    parse_voc_xml,
    resolve_inside,
    voc_object_names,
)

__all__ = [
    "DatasetError",
    "register_coco_dataset",
    "register_voc_dataset",
    "voc_class_names",
    "dataset_class_names",
    "resolve_num_classes",
    "add_dataset_arguments",
    "register_datasets_from_args",
    "check_datasets_before_training",
]

logger = logging.getLogger(__name__)


# name -> the arguments it was registered with by this module.
_REGISTRATIONS: Dict[str, tuple] = {}

# name -> (registration and annotation file stamp, records): a dataset loaded and checked before
# training, handed to the next load of it in this process (the trainer's) instead of loading it
# again.
_CHECKED: Dict[str, Tuple[tuple, List[Dict]]] = {}


def _stamp(registration: tuple) -> tuple:
    """``registration`` and the modification time of its annotation (or split) file."""
    if registration[0] == "coco":
        path = registration[1]
    else:
        path = os.path.join(registration[1], "ImageSets", "Main", f"{registration[2]}.txt")
    return registration + (os.stat(path).st_mtime_ns,)


def _claim_name(name: str, registration: tuple) -> bool:
    """Whether ``name`` still has to be registered: False if it already is, with the same
    arguments (e.g. registered again in the same process by a launched training function).

    Raises:
        DatasetError: ``name`` is registered with other data.
    """
    if name not in DatasetCatalog.list():
        return True
    if _REGISTRATIONS.get(name) == registration:
        return False
    raise DatasetError(
        f"dataset name {name!r} is already registered"
        + (f" (as {_REGISTRATIONS[name]})" if name in _REGISTRATIONS else " by detectron2")
        + "; choose another name"
    )


def _checked_records(name: str, registration: tuple) -> Optional[List[Dict]]:
    """The records :func:`check_datasets_before_training` loaded for ``name``, once."""
    stamp_and_records = _CHECKED.pop(name, None)
    if stamp_and_records and stamp_and_records[0] == _stamp(registration):
        return stamp_and_records[1]
    return None


def _load_coco(name: str, json_file: str, image_root: str) -> List[Dict]:
    checked = _checked_records(name, ("coco", json_file, image_root))
    if checked is not None:
        return checked
    try:
        check_coco_json(json_file, image_root)
    finally:
        forget_coco_json()  # detectron2's loader parses the file itself
    return clean_boxes(name, correct_image_sizes(name, load_coco_json(json_file, image_root, name)))


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """Registers a COCO-format detection dataset under ``name`` (detectron2's COCO loader).

    The annotations are checked when the dataset is loaded (see :mod:`.validation`): a broken
    file, a missing image, an image outside ``image_root`` or an unknown category raise
    :class:`DatasetError`; unusable boxes are dropped and boxes reaching outside their image are
    clipped, with counts in the log.

    Args:
        name: the name to use in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        json_file: COCO instances annotation file.
        image_root: folder the annotation's ``file_name`` entries are relative to.
    """
    if os.path.isdir(json_file):
        raise DatasetError(
            f"dataset {name!r}: annotation file {json_file} is a folder; name the COCO JSON file"
        )
    if not os.path.isfile(json_file):
        raise DatasetError(f"dataset {name!r}: annotation file {json_file} does not exist")
    if not os.path.isdir(image_root):
        raise DatasetError(f"dataset {name!r}: image root {image_root} is not a folder")
    registration = ("coco", json_file, image_root)
    if not _claim_name(name, registration):
        return
    _REGISTRATIONS[name] = registration
    DatasetCatalog.register(name, lambda: _load_coco(name, json_file, image_root))
    # The metadata detectron2's register_coco_instances sets, which COCOEvaluator reads.
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
    logger.info("Registered COCO dataset %r: %s, images in %s", name, json_file, image_root)


def _voc_split_ids(voc_dir: str, split: str) -> List[str]:
    split_file = os.path.join(voc_dir, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(split_file):
        raise DatasetError(f"VOC split file {split_file} does not exist")
    with open(split_file, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    # An id listed twice would be trained on twice and evaluated as two images.
    repeated = sorted(i for i, count in Counter(ids).items() if count > 1)
    if repeated:
        raise DatasetError(
            f"VOC split file {split_file}: {len(ids) - len(set(ids))} ids are listed more than "
            f"once ({', '.join(repr(i) for i in repeated[:5])}"
            f"{', ...' if len(repeated) > 5 else ''}); list each image once"
        )
    return ids


def _load_voc(name: str, voc_dir: str, split: str, class_names: List[str]) -> List[Dict]:
    checked = _checked_records(name, ("voc", voc_dir, split, tuple(class_names)))
    if checked is not None:
        return checked
    records, difficult = load_voc_split(voc_dir, _voc_split_ids(voc_dir, split), class_names)
    records = mark_voc_difficult(name, records, difficult)
    return clean_boxes(name, correct_image_sizes(name, records))


def voc_class_names(voc_dir: str, split: str) -> List[str]:
    """Sorted object class names found in the XML annotations of a VOC split."""
    names = set()
    annotation_dir = os.path.join(voc_dir, "Annotations")
    for file_id in _voc_split_ids(voc_dir, split):
        what = f"VOC split entry {file_id!r}"
        xml_file = resolve_inside(annotation_dir, f"{file_id}.xml", what)
        names.update(voc_object_names(xml_file, parse_voc_xml(xml_file)))
    if not names:
        raise DatasetError(f"VOC split {split!r} in {voc_dir} has no annotated objects")
    return sorted(names)


def register_voc_dataset(
    name: str, voc_dir: str, split: str, class_names: Optional[Sequence[str]] = None
) -> List[str]:
    """Registers a Pascal VOC split (``Annotations/``, ``JPEGImages/``,
    ``ImageSets/Main/<split>.txt``) under ``name`` with detectron2's VOC loader.

    The split is checked when it is loaded (see :mod:`.validation`): an XML file that does not
    parse, a class not in ``class_names``, a missing image, an id listed twice or leading
    outside the folder raise :class:`DatasetError`; unusable boxes are dropped and boxes
    reaching outside their image are clipped, with counts in the log. Objects marked
    ``<difficult>`` are ignored in evaluation, as by VOC's, and kept in training, as by
    detectron2 (see :func:`.validation.mark_voc_difficult`).

    Args:
        name: the dataset name for ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        voc_dir: the VOC folder.
        split: split file name without ``.txt`` (e.g. "train", "val", "trainval").
        class_names: class names in label order; if None, the sorted names found in the
            split's XML files (register validation splits with the training split's names).

    Returns:
        The class names used.
    """
    for sub in ("Annotations", "JPEGImages"):
        if not os.path.isdir(os.path.join(voc_dir, sub)):
            raise DatasetError(f"dataset {name!r}: {voc_dir} has no {sub}/ folder")
    if class_names is None:
        class_names = voc_class_names(voc_dir, split)
    class_names = list(class_names)
    unusable = [n for n in class_names if not isinstance(n, str) or not n or n != n.strip()]
    if unusable or len(set(class_names)) < len(class_names):
        raise DatasetError(
            f"dataset {name!r}: class names {class_names} must be distinct non-empty strings "
            "without spaces around them"
        )
    registration = ("voc", voc_dir, split, tuple(class_names))
    if not _claim_name(name, registration):
        return class_names
    _REGISTRATIONS[name] = registration
    DatasetCatalog.register(name, lambda: _load_voc(name, voc_dir, split, class_names))
    # The metadata detectron2's register_pascal_voc sets; year only selects the VOC2007
    # 11-point metric of PascalVOCDetectionEvaluator. evaluator_type "coco": the plugin evaluates
    # every dataset with COCOEvaluator (difficult objects as crowd regions), and detectron2's
    # tools (plain_train_net.py) choose their evaluator by it.
    MetadataCatalog.get(name).set(
        thing_classes=class_names, dirname=voc_dir, year=2012, split=split, evaluator_type="coco"
    )
    logger.info(
        "Registered VOC dataset %r: %s split %r, classes %s", name, voc_dir, split, class_names
    )
    return list(class_names)


def dataset_class_names(name: str) -> List[str]:
    """Class names of a registered dataset: its metadata's, else those of its COCO file's
    categories, else loaded with the dataset.

    The COCO categories are read without loading the images' records (which may have no
    annotations, e.g. a test set to predict on), and set the metadata detectron2's COCO loader
    sets: the names ordered by category id and the id-to-label map."""
    metadata = MetadataCatalog.get(name)
    if not hasattr(metadata, "thing_classes") and _REGISTRATIONS.get(name, ("",))[0] == "coco":
        categories = sorted(coco_categories(metadata.json_file), key=lambda c: c["id"])
        metadata.thing_classes = [c["name"] for c in categories]
        metadata.thing_dataset_id_to_contiguous_id = {
            c["id"]: label for label, c in enumerate(categories)
        }
    if not hasattr(metadata, "thing_classes"):
        DatasetCatalog.get(name)  # detectron2's loaders set thing_classes when loading
    return list(metadata.thing_classes)


def resolve_num_classes(cfg, dataset_name: str, set_by_user: bool) -> None:
    """Makes ``cfg.MODEL.RETINANET.NUM_CLASSES`` match the classes of ``dataset_name``.

    Not set by the user: it follows the dataset, with a log line. Set by the user and different:
    a clear error now, instead of a shape error inside the loss later.

    Args:
        cfg: a mutable config.
        dataset_name: a registered dataset (usually ``DATASETS.TRAIN[0]``).
        set_by_user: whether the config file or the command line set NUM_CLASSES.
    """
    classes = dataset_class_names(dataset_name)
    configured = cfg.MODEL.RETINANET.NUM_CLASSES
    if configured == len(classes):
        return
    if set_by_user:
        raise DatasetError(
            f"MODEL.RETINANET.NUM_CLASSES is {configured}, but dataset {dataset_name!r} has "
            f"{len(classes)} classes ({', '.join(classes[:10])}"
            f"{', ...' if len(classes) > 10 else ''}); fix the value or leave it unset to "
            "follow the dataset"
        )
    logger.info(
        "MODEL.RETINANET.NUM_CLASSES set to %d, the number of classes of dataset %r (was %d)",
        len(classes),
        dataset_name,
        configured,
    )
    cfg.MODEL.RETINANET.NUM_CLASSES = len(classes)


def add_dataset_arguments(parser) -> None:
    """Adds ``--register-coco``, ``--register-voc`` and ``--voc-classes`` to an argparse parser."""
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    parser.add_argument(
        "--register-voc",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "VOC_DIR", "SPLIT"),
        help="register the Pascal VOC split VOC_DIR/ImageSets/Main/SPLIT.txt as NAME (repeatable)",
    )
    parser.add_argument(
        "--voc-classes",
        default=None,
        help="comma-separated VOC class names in label order (default: the sorted names found "
        "in the XML files of all splits registered from the same VOC_DIR)",
    )


def _given_voc_classes(text: str) -> List[str]:
    """The class names of ``--voc-classes``, stripped of spaces around them.

    Raises:
        DatasetError: an empty name (e.g. "tree," or "tree,,bush") or a name given twice.
    """
    names = [name.strip() for name in text.split(",")]
    if "" in names:
        raise DatasetError(
            f"--voc-classes {text!r}: class {names.index('') + 1} of {len(names)} is named '' "
            "(a comma too many?); give the class names separated by commas, e.g. tree,bush"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetError(
            f"--voc-classes {text!r}: {', '.join(map(repr, repeated))} given more than once; "
            "give each class once"
        )
    return names


def _check_voc_classes(given: List[str], voc_dir: str, splits: List[str]) -> None:
    """The classes of ``--voc-classes`` are exactly those of the XML files of a VOC folder's
    registered splits: a name found in no XML file is a typo (or a class the model would never
    see), an XML name not given cannot be loaded.

    Raises:
        DatasetError: naming the unknown names on both sides and the given list.
    """
    found = {name for split in splits for name in voc_class_names(voc_dir, split)}
    not_in_files = [name for name in given if name not in found]
    not_given = sorted(found - set(given))
    if not (not_in_files or not_given):
        return
    problems = []
    if not_given:
        problems.append(f"the XML files have classes not in it: {', '.join(map(repr, not_given))}")
    for name in not_in_files:
        close = difflib.get_close_matches(name, sorted(found), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"class {name!r} is in no XML file{hint}")
    raise DatasetError(
        f"--voc-classes {','.join(given)}: for the splits {', '.join(splits)} of {voc_dir}, "
        f"{'; '.join(problems)} (classes in the XML files: {', '.join(sorted(found))}); fix "
        "the list, or leave --voc-classes out to use the classes found (a class only in "
        "another split: register that split too)"
    )


def register_datasets_from_args(args) -> None:
    """Registers the datasets named by :func:`add_dataset_arguments`' options.

    Raises:
        DatasetError: bad files or names (see the ``register_*`` functions), or
            ``--voc-classes`` that are not the classes of the XML files of the VOC splits.
    """
    for name, json_file, image_root in args.register_coco:
        register_coco_dataset(name, json_file, image_root)
    given = _given_voc_classes(args.voc_classes) if args.voc_classes is not None else None
    classes_per_dir = {}
    for name, voc_dir, split in args.register_voc:
        if voc_dir not in classes_per_dir:
            # One class list for all splits of a folder, so train and val labels agree.
            splits = [s for _, d, s in args.register_voc if d == voc_dir]
            if given is None:
                names = {c for s in splits for c in voc_class_names(voc_dir, s)}
                classes_per_dir[voc_dir] = sorted(names)
            else:
                _check_voc_classes(given, voc_dir, splits)
                classes_per_dir[voc_dir] = given
        register_voc_dataset(name, voc_dir, split, classes_per_dir[voc_dir])


def _check_same_classes(names: Sequence[str]) -> None:
    """All of ``names`` have the same class names in the same label order: a model trained on
    one set of labels and evaluated on another gets nan or wrong AP per class."""
    reference = dataset_class_names(names[0])
    for name in names[1:]:
        classes = dataset_class_names(name)
        if classes == reference:
            continue
        only_first = [c for c in reference if c not in classes]
        only_other = [c for c in classes if c not in reference]
        if only_first or only_other:
            detail = (
                f"only in {names[0]!r}: {', '.join(map(repr, only_first)) or 'none'}; only in "
                f"{name!r}: {', '.join(map(repr, only_other)) or 'none'}"
            )
        else:
            detail = f"the same names in another order: {reference} and {classes}"
        raise DatasetError(
            f"datasets {names[0]!r} and {name!r} have different classes ({detail}); the "
            "training and test datasets must have the same categories (the same names, with "
            "ids in the same order)"
        )


def check_datasets_before_training(train: Sequence[str], test: Sequence[str]) -> None:
    """Checks the datasets of a run before it starts, rather than when the trainer (the training
    sets) or the evaluator (the test sets, after training) loads them: the datasets registered by
    this module are loaded with all their checks, and all datasets must have the same classes.

    The records of a training set loaded here are handed to the trainer's first load of it in
    this process, so that it is read once.

    Args:
        train, test: registered dataset names (``DATASETS.TRAIN``, ``DATASETS.TEST``).

    Raises:
        DatasetError: see :func:`register_coco_dataset`, :func:`register_voc_dataset` and
            :func:`_check_same_classes`.
    """
    _CHECKED.clear()  # left by an earlier run in this process that stopped before training
    names = list(dict.fromkeys([*train, *test]))
    if names:
        _check_same_classes(names)  # first: it reads the categories only
    for name in names:
        if name in _REGISTRATIONS:
            records = DatasetCatalog.get(name)
            if name in train:  # test sets are loaded again when evaluated, not kept till then
                _CHECKED[name] = (_stamp(_REGISTRATIONS[name]), records)
