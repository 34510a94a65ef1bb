"""Checks on users' COCO and VOC datasets, made around detectron2's own loaders.

A bad dataset stops with one :class:`DatasetError` that names the file, the record and what is
wrong, before training starts, instead of a traceback from inside detectron2 at some later step.
Problems that only cost a few boxes (degenerate or out-of-image boxes) are fixed or dropped, and
image sizes that differ from the files are corrected, with one warning per kind giving the count
and an example.
"""

import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Sequence, Tuple

from detectron2.structures import BoxMode

from ..errors import UserError
from .images import TRANSPOSING_ORIENTATIONS, ImageReadError, image_size, trained_on

__all__ = [
    "DatasetError",
    "correct_image_sizes",
    "resolve_inside",
    "forget_coco_json",
    "read_coco_json",
    "coco_categories",
    "check_coco_json",
    "parse_voc_xml",
    "voc_object_names",
    "load_voc_split",
    "mark_voc_difficult",
    "clean_boxes",
]

logger = logging.getLogger(__name__)

# How many missing files an error lists; the count covers all of them.
_MAX_LISTED = 5


class DatasetError(UserError, ValueError):
    """A dataset's files or annotations cannot be used as they are."""


def resolve_inside(root: str, entry: str, what: str) -> str:
    """The path of ``entry`` inside ``root``, refusing entries that lead out of it.

    Symbolic links are followed, so neither ``..``, an absolute path nor a link can make the
    loader read files outside the folder the user named.

    Args:
        root: the folder entries are relative to.
        entry: a relative path from the annotations.
        what: where the entry comes from, for the error message.

    Returns:
        ``os.path.join(root, entry)``.

    Raises:
        DatasetError: the entry resolves to a path outside ``root``.
    """
    path = os.path.join(root, entry)
    real_root = os.path.realpath(root)
    real_path = os.path.realpath(path)
    if os.path.commonpath([real_root, real_path]) != real_root:
        raise DatasetError(
            f"{what}: {entry!r} points outside the folder {root} (resolves to {real_path})"
        )
    return path


def _listed(items: Sequence[str]) -> str:
    """The first few of ``items``, and how many more there are."""
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _check_files_exist(paths: Sequence[str], what: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"{what}: {len(missing)} of {len(paths)} images do not exist: {_listed(missing)}"
        )


# The last COCO file read, keyed by (path, modification time, size): the class names read when a
# run is set up and the checks made when the dataset is loaded share one parse of a file that
# can take tens of seconds to parse; forget_coco_json() drops it once the dataset is loaded.
_last_read: Dict[Tuple[str, int, int], dict] = {}


def read_coco_json(json_file: str) -> dict:
    """Reads a COCO annotation file, with the file and the position of a JSON syntax error.
    The result is shared with the next call for the same unchanged file (do not modify it).

    Raises:
        DatasetError: the file is not valid JSON or lacks the COCO ``images`` /
            ``categories`` lists (``annotations`` may be missing: an image-only test set).
    """
    stat = os.stat(json_file)
    key = (os.path.abspath(json_file), stat.st_mtime_ns, stat.st_size)
    if key not in _last_read:
        forget_coco_json()
        _last_read[key] = _parse_coco_json(json_file)
    return _last_read[key]


def forget_coco_json() -> None:
    """Drops the COCO file :func:`read_coco_json` keeps."""
    _last_read.clear()


def _parse_coco_json(json_file: str) -> dict:
    try:
        with open(json_file, encoding="utf-8") as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{json_file} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{json_file} is not valid JSON: not UTF-8 text ({e})") from e
    if not isinstance(coco, dict):
        raise DatasetError(f"{json_file}: expected a JSON object, found {type(coco).__name__}")
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise DatasetError(f"{json_file}: no {key!r} list, so not a COCO instances file")
    # Test sets to predict on may have no annotations at all.
    if not isinstance(coco.setdefault("annotations", []), list):
        raise DatasetError(f"{json_file}: 'annotations' is not a list")
    return coco


def _check_keys(json_file: str, kind: str, record: dict, keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DatasetError(
            f"{json_file}: {kind} {record.get('id', '(without id)')} has no "
            f"{', '.join(repr(k) for k in missing)}"
        )


def _check_unique_ids(json_file: str, kind: str, records: Sequence[dict], detail: str) -> None:
    """detectron2 would silently keep one of two images with the same id (and assert on
    annotations with the same id)."""
    seen: Dict[object, dict] = {}
    for record in records:
        if "id" not in record:
            continue
        first = seen.setdefault(record["id"], record)
        if first is not record:
            count = sum(1 for r in records if r.get("id") == record["id"])
            plural = "categories" if kind == "category" else f"{kind}s"
            raise DatasetError(
                f"{json_file}: {count} {plural} have id {record['id']!r} ({detail} "
                f"{first.get(detail)!r} and {record.get(detail)!r}); {kind} ids must be unique"
            )


def _check_unique_names(json_file: str, categories: Sequence[dict]) -> None:
    """Two categories of one name would be two classes the model cannot tell apart, and one
    name for two labels in every result."""
    ids: Dict[str, List[object]] = {}
    for category in categories:
        ids.setdefault(category["name"], []).append(category["id"])
    repeated = {name: found for name, found in ids.items() if len(found) > 1}
    if repeated:
        listed = "; ".join(f"{name!r}: ids {found}" for name, found in repeated.items())
        raise DatasetError(
            f"{json_file}: {len(repeated)} category names are used by several categories "
            f"({listed}); give each category its own name, or merge them into one id"
        )


def _check_unique_files(json_file: str, images: Sequence[dict], paths: Sequence[str]) -> None:
    """One file under two image ids would be trained on twice and evaluated as two images, each
    with half of the ground truth."""
    first: Dict[str, dict] = {}
    repeated = []
    for image, path in zip(images, paths):
        real = os.path.realpath(path)
        if first.setdefault(real, image) is not image:
            repeated.append(f"{image['file_name']!r} (ids {first[real]['id']} and {image['id']})")
    if repeated:
        raise DatasetError(
            f"{json_file}: {len(repeated)} images are listed twice, under two ids: "
            f"{_listed(repeated)}; list each file once, with all its annotations"
        )


def _check_annotated_images_exist(json_file: str, coco: dict) -> None:
    """detectron2's loader silently drops annotations of an image id not in ``images``."""
    image_ids = {image["id"] for image in coco["images"]}
    orphans = [a for a in coco["annotations"] if a["image_id"] not in image_ids]
    if orphans:
        examples = [
            f"annotation {a.get('id', '(without id)')} of image_id {a['image_id']!r}"
            for a in orphans
        ]
        missing = len({repr(a["image_id"]) for a in orphans})
        raise DatasetError(
            f"{json_file}: {len(orphans)} annotations refer to {missing} image ids that are not "
            f"in 'images' ({_listed(examples)}); add the images or remove the annotations"
        )


def coco_categories(json_file: str) -> List[Dict]:
    """The categories of a COCO file, checked: each has an id and a name, and no two share
    either.

    Raises:
        DatasetError: naming the file and the categories.
    """
    categories = read_coco_json(json_file)["categories"]
    for category in categories:
        _check_keys(json_file, "category", category, ("id", "name"))
    if not categories:
        raise DatasetError(f"{json_file}: the 'categories' list is empty")
    _check_unique_ids(json_file, "category", categories, "name")
    _check_unique_names(json_file, categories)
    return categories


def check_coco_json(json_file: str, image_root: str) -> None:
    """Checks what detectron2's ``load_coco_json`` would otherwise fail on deep inside, or
    silently get wrong.

    Checks that categories have unique ids and names, that every image has a unique id, a file
    name and a size, that its file is inside ``image_root``, exists and is listed once, that
    annotation ids are unique and that every annotation's image is in ``images`` and its
    category in ``categories``.

    Raises:
        DatasetError: naming the file and the offending images or annotations (counted).
    """
    coco = read_coco_json(json_file)
    category_ids = {c["id"] for c in coco_categories(json_file)}
    paths = []
    for image in coco["images"]:
        _check_keys(json_file, "image", image, ("id", "file_name", "height", "width"))
        what = f"{json_file}: image {image['id']}"
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise DatasetError(f"{what}: file_name {image['file_name']!r} is not a file name")
        paths.append(resolve_inside(image_root, image["file_name"], what))
    _check_files_exist(paths, f"{json_file} (image root {image_root})")
    _check_unique_ids(json_file, "image", coco["images"], "file_name")
    _check_unique_files(json_file, coco["images"], paths)
    _check_unique_ids(json_file, "annotation", coco["annotations"], "image_id")
    for annotation in coco["annotations"]:
        _check_keys(json_file, "annotation", annotation, ("image_id", "category_id", "bbox"))
    _check_annotated_images_exist(json_file, coco)
    file_names = {image["id"]: image["file_name"] for image in coco["images"]}
    for annotation in coco["annotations"]:
        bbox = annotation["bbox"]
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        ):
            raise DatasetError(
                f"{json_file}: annotation {annotation.get('id', '(without id)')} of image "
                f"{annotation['image_id']}: bbox {bbox!r} is not 4 numbers [x, y, width, height]"
            )
        if annotation["category_id"] not in category_ids:
            image = file_names[annotation["image_id"]]
            raise DatasetError(
                f"{json_file}: annotation {annotation.get('id', '(without id)')} of image "
                f"{annotation['image_id']} ({image}) has category_id {annotation['category_id']}"
                f", which is not in 'categories' (ids {sorted(category_ids)})"
            )


def parse_voc_xml(xml_file: str) -> ET.ElementTree:
    """Parses a VOC annotation file.

    Raises:
        DatasetError: the file cannot be read or is not well-formed XML (with the parser's
            line and column).
    """
    try:
        return ET.parse(xml_file)
    except ET.ParseError as e:
        raise DatasetError(f"VOC annotation {xml_file} is not valid XML: {e}") from e
    except OSError as e:
        raise DatasetError(f"VOC annotation {xml_file} cannot be read: {e}") from e


_VOC_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def _is_number(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def voc_object_names(xml_file: str, tree: ET.ElementTree) -> List[str]:
    """The class names of the objects of a parsed VOC annotation file, in order.

    Raises:
        DatasetError: an object has no ``<name>``, or one with spaces around it (detectron2's
            loader looks names up as written, so " tree " is not "tree").
    """
    names = []
    for number, obj in enumerate(tree.findall("object"), 1):
        name = obj.findtext("name")
        if not name or not name.strip():
            raise DatasetError(f"VOC annotation {xml_file}: object {number} has no <name>")
        if name != name.strip():
            raise DatasetError(
                f"VOC annotation {xml_file}: object {number} has the name {name!r}, with "
                "spaces around it; remove them"
            )
        names.append(name)
    return names


def _is_difficult(obj: ET.Element) -> bool:
    return (obj.findtext("difficult") or "0").strip() not in ("0", "")


def load_voc_split(
    voc_dir: str, file_ids: Sequence[str], class_names: Sequence[str]
) -> Tuple[List[Dict], List[List[bool]]]:
    """The records of a VOC split, checked, as detectron2's ``load_voc_instances`` makes them.

    Read here rather than by detectron2's loader, which reads the split file with
    ``np.loadtxt`` and fails on a file of one id (a 0-d array; not fixed upstream), and which
    fails deep inside on what is checked here: each id's XML and JPEG are inside
    ``Annotations/`` and ``JPEGImages/`` and exist, the XML parses and has a size, and every
    object has a name in ``class_names`` and a numeric box.

    Returns:
        The records (``file_name``, ``image_id`` = the file id, ``height``, ``width``,
        ``annotations`` with ``category_id``, an XYXY_ABS ``bbox`` whose VOC 1-based
        xmin/ymin are made 0-based, as detectron2 does); and per record, per annotation, whether
        the object is marked ``<difficult>``.

    Raises:
        DatasetError: naming the file and what is wrong.
    """
    annotation_dir = os.path.join(voc_dir, "Annotations")
    image_dir = os.path.join(voc_dir, "JPEGImages")
    records, difficult = [], []
    for file_id in file_ids:
        what = f"VOC split entry {file_id!r}"
        xml_file = resolve_inside(annotation_dir, file_id + ".xml", what)
        tree = parse_voc_xml(xml_file)
        size = {}
        for field in ("width", "height"):
            text = tree.findtext(f"./size/{field}")
            if text is None or not text.strip().isdigit():
                raise DatasetError(f"VOC annotation {xml_file}: size/{field} missing or not an int")
            size[field] = int(text)
        annotations = []
        for name, obj in zip(voc_object_names(xml_file, tree), tree.findall("object")):
            if name not in class_names:
                raise DatasetError(
                    f"VOC annotation {xml_file}: class {name!r} is not in the class list "
                    f"{list(class_names)} (set them with --voc-classes)"
                )
            box = obj.find("bndbox")
            corners = [None] if box is None else [box.findtext(k) for k in _VOC_CORNERS]
            if not all(_is_number(text) for text in corners):
                raise DatasetError(
                    f"VOC annotation {xml_file}: object {name!r} has no bndbox with numeric "
                    f"{', '.join(_VOC_CORNERS)}"
                )
            x1, y1, x2, y2 = (float(text) for text in corners)
            annotations.append(
                {
                    "category_id": list(class_names).index(name),
                    "bbox": [x1 - 1.0, y1 - 1.0, x2, y2],
                    "bbox_mode": BoxMode.XYXY_ABS,
                }
            )
        records.append(
            {
                "file_name": resolve_inside(image_dir, file_id + ".jpg", what),
                "image_id": file_id,
                **size,
                "annotations": annotations,
            }
        )
        difficult.append([_is_difficult(obj) for obj in tree.findall("object")])
    _check_files_exist([r["file_name"] for r in records], f"VOC folder {image_dir}")
    return records, difficult


def mark_voc_difficult(
    dataset_name: str, dicts: List[Dict], difficult: Sequence[Sequence[bool]]
) -> List[Dict]:
    """Marks the boxes of VOC objects flagged ``<difficult>`` as crowd regions, in place, with a
    count in the log: COCO evaluation then ignores them, as VOC's evaluation does (a detection
    on one is neither a true nor a false positive), instead of counting them as ordinary ground
    truth. Training keeps them, as detectron2's VOC loader does (``"difficult": 1`` tells the
    plugin's mapper to keep these crowd boxes: :func:`.images.trained_on`).

    Args:
        dicts: the records of a VOC split (:func:`load_voc_split`).
        difficult: per record, per annotation, whether it is difficult (:func:`load_voc_split`).

    Returns:
        ``dicts``.
    """
    count = 0
    for record, flags in zip(dicts, difficult):
        for annotation, flag in zip(record["annotations"], flags):
            if flag:
                annotation["iscrowd"], annotation["difficult"] = 1, 1
                count += 1
    if count:
        logger.info(
            "Dataset %r: %d difficult objects are ignored in evaluation (as by VOC's), kept in "
            "training (as by detectron2)",
            dataset_name,
            count,
        )
    return dicts


def _box_xyxy(annotation: dict) -> List[float]:
    # Plain Python instead of BoxMode.convert: that builds a tensor per box, which takes
    # seconds on COCO-sized datasets.
    x0, y0, a, b = (float(v) for v in annotation["bbox"])
    if annotation["bbox_mode"] == BoxMode.XYWH_ABS:
        return [x0, y0, x0 + a, y0 + b]
    return [x0, y0, a, b]


def _from_xyxy(box: List[float], mode: BoxMode) -> List[float]:
    if mode == BoxMode.XYWH_ABS:
        return [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    return box


def clean_boxes(dataset_name: str, dicts: List[Dict]) -> List[Dict]:
    """Drops unusable boxes and clips boxes to their image, in place, with counts in the log.

    Boxes with a NaN/inf coordinate or no area would give NaN or infinite regression targets;
    boxes entirely outside the image can never be matched by an anchor. Both are dropped. Boxes
    partly outside are clipped to the image, which detectron2's transforms would otherwise do
    only after augmentation.

    Args:
        dataset_name: for the log and the error.
        dicts: records in detectron2's standard format, with ``width`` and ``height``.

    Returns:
        ``dicts``.

    Raises:
        DatasetError: no image or no box is left, or every box left is a crowd region (which
            training and evaluation ignore).
    """
    # kind -> [count, example]
    found = {"invalid": [0, None], "outside": [0, None], "clipped": [0, None]}

    def note(kind, record, box):
        found[kind][0] += 1
        if found[kind][1] is None:
            found[kind][1] = f"{box} in {record['file_name']}"

    num_boxes = num_crowd = 0
    for record in dicts:
        width, height = record["width"], record["height"]
        kept = []
        for annotation in record.get("annotations", []):
            if annotation["bbox_mode"] not in (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS):
                kept.append(annotation)  # the COCO and VOC loaders make only these two
                continue
            x0, y0, x1, y1 = box = _box_xyxy(annotation)
            if not all(math.isfinite(v) for v in box) or x1 <= x0 or y1 <= y0:
                note("invalid", record, annotation["bbox"])
                continue
            clipped = [
                min(max(x0, 0), width),
                min(max(y0, 0), height),
                min(max(x1, 0), width),
                min(max(y1, 0), height),
            ]
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                note("outside", record, annotation["bbox"])
                continue
            if clipped != box:
                note("clipped", record, annotation["bbox"])
                annotation["bbox"] = _from_xyxy(clipped, annotation["bbox_mode"])
            kept.append(annotation)
        record["annotations"] = kept
        num_boxes += len(kept)
        num_crowd += sum(1 for a in kept if not trained_on(a))

    messages = {
        "invalid": "had a NaN/inf coordinate or zero or negative width/height and were dropped",
        "outside": "lay entirely outside their image and were dropped",
        "clipped": "reached outside their image and were clipped to it",
    }
    for kind, (count, example) in found.items():
        if count:
            logger.warning(
                "Dataset %r: %d boxes %s (e.g. %s)", dataset_name, count, messages[kind], example
            )
    if not dicts or num_boxes == 0:
        dropped = found["invalid"][0] + found["outside"][0]
        raise DatasetError(
            f"dataset {dataset_name!r} is empty: {len(dicts)} images, no usable boxes "
            f"({dropped} dropped as invalid or outside their image)"
        )
    if num_crowd == num_boxes:
        raise DatasetError(
            f"dataset {dataset_name!r} has nothing to train on or evaluate: all its {num_boxes} "
            "boxes are marked iscrowd (crowd regions, which training and evaluation ignore); "
            "set iscrowd to 0 for the boxes of single objects"
        )
    return dicts


def _header_sizes(dataset_name: str, dicts: Sequence[Dict]) -> List[Tuple[int, int, int]]:
    """(width, height, EXIF orientation) per record's image, as it is read for training.

    Raises:
        DatasetError: images that cannot be read, counted and the first ones named.
    """
    sizes, unreadable = [], []
    for record in dicts:
        try:
            sizes.append(image_size(record["file_name"]))
        except ImageReadError as e:
            unreadable.append(str(e))
    if unreadable:
        raise DatasetError(
            f"dataset {dataset_name!r}: {len(unreadable)} of {len(dicts)} images cannot be read: "
            f"{_listed(unreadable)}; replace or remove them"
        )
    return sizes


def correct_image_sizes(dataset_name: str, dicts: List[Dict]) -> List[Dict]:
    """Sets each record's ``width``/``height`` to its image's as it is read (EXIF orientation
    applied, as detectron2's ``read_image`` does), in place, with a count in the log:
    detectron2 stops training at the first image whose annotated size is wrong
    (``SizeMismatchError``), and scales test detections to the annotated size.

    The images carrying an EXIF orientation are counted in the log. One that the orientation
    turns by 90 degrees while its annotated size is the file's unturned size is refused: its
    boxes were most likely drawn on the unturned pixels and would land in the wrong place.

    Returns:
        ``dicts``.

    Raises:
        DatasetError: images that cannot be read, or annotated as if not turned by their EXIF
            orientation (counted, the first ones named).
    """
    corrected, example = 0, None
    oriented, unturned = [], []
    for record, (width, height, orientation) in zip(dicts, _header_sizes(dataset_name, dicts)):
        annotated = (record.get("width"), record.get("height"))
        if orientation != 1:
            oriented.append(f"{record['file_name']} (orientation {orientation})")
            if orientation in TRANSPOSING_ORIENTATIONS and width != height:
                if annotated == (height, width):
                    unturned.append(
                        f"{record['file_name']} (annotated {height}x{width}, shown {width}x"
                        f"{height})"
                    )
                    continue
        if annotated != (width, height):
            corrected += 1
            if example is None:
                example = (
                    f"{record['file_name']}: annotated {annotated[0]}x{annotated[1]}, file "
                    f"{width}x{height}"
                )
            record["width"], record["height"] = width, height
    if unturned:
        raise DatasetError(
            f"dataset {dataset_name!r}: {len(unturned)} images have an EXIF orientation that "
            "turns them by 90 degrees (as detectron2 reads them), but are annotated with the "
            f"size of the unturned file: {_listed(unturned)}; their boxes would be misplaced: "
            "if the boxes were drawn on the unturned image, remove the EXIF orientation from "
            "these files (e.g. exiftool -Orientation= FILE), else correct their width/height"
        )
    if oriented:
        logger.info(
            "Dataset %r: %d of %d images carry an EXIF orientation, applied when they are read "
            "(sizes and boxes are taken as of the turned image), e.g. %s",
            dataset_name,
            len(oriented),
            len(dicts),
            oriented[0],
        )
    if corrected:
        logger.warning(
            "Dataset %r: %d of %d images have another width/height in the annotations than in "
            "the image file; using the file's (e.g. %s)",
            dataset_name,
            corrected,
            len(dicts),
            example,
        )
    return dicts
