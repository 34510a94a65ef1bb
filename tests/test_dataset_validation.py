"""Bad dataset input: one clear DatasetError naming the file and record, or a counted warning."""

import json
import math
import os
import re
import shutil

import pytest
from PIL import Image

from conftest import plugin_cfg, warnings_of
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.samplers import TrainingSampler
from retinanet_plugin.data import (
    SHAPE_CLASSES,
    DatasetError,
    register_coco_dataset,
    register_voc_dataset,
)


@pytest.fixture
def coco(shapes_dataset, tmp_path):
    """A writable copy of the shapes train split: (coco dict, image root, write(coco) -> json)."""
    json_file, image_root = shapes_dataset["train"]
    root = tmp_path / "images"
    shutil.copytree(image_root, root)
    with open(json_file) as f:
        data = json.load(f)

    def write(content):
        path = tmp_path / "annotations.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)

    return data, str(root), write


def load_coco(request, json_file, image_root):
    name = f"coco_{request.node.name}"
    register_coco_dataset(name, json_file, image_root)
    return DatasetCatalog.get(name)


def test_coco_json_that_does_not_parse_names_file_line_and_column(coco, request):
    _, root, write = coco
    json_file = write('{"images": [],\n  "annotations": [}\n')
    expected = rf"{re.escape(json_file)} is not valid JSON: .* line 2, column 19"
    with pytest.raises(DatasetError, match=expected):
        load_coco(request, json_file, root)


def test_missing_images_are_counted_and_the_first_five_named(coco, request):
    data, root, write = coco
    for i in range(7):
        data["images"].append(dict(data["images"][0], id=1000 + i, file_name=f"gone_{i}.png"))
    with pytest.raises(DatasetError, match=r"7 of 23 images do not exist: .*gone_4.png and 2 more"):
        load_coco(request, write(data), root)


def test_unknown_category_names_annotation_image_and_id(coco, request):
    data, root, write = coco
    bad = data["annotations"][3]
    bad["category_id"] = 77
    image = next(i for i in data["images"] if i["id"] == bad["image_id"])
    with pytest.raises(
        DatasetError,
        match=rf"annotation {bad['id']} of image {bad['image_id']} \({image['file_name']}\) "
        r"has category_id 77",
    ):
        load_coco(request, write(data), root)


def test_bad_boxes_are_dropped_and_boxes_outside_clipped_with_counts(coco, request):
    data, root, write = coco
    annotations = data["annotations"]
    image_size = {i["id"]: (i["width"], i["height"]) for i in data["images"]}
    annotations[0]["bbox"][2] = 0  # no width
    annotations[1]["bbox"][3] = -4  # negative height
    annotations[2]["bbox"][0] = math.nan
    annotations[3]["bbox"][:2] = [-10, -10]  # partly outside: clipped
    width, height = image_size[annotations[4]["image_id"]]
    annotations[4]["bbox"][:2] = [width + 5, 0]  # entirely outside: dropped
    with warnings_of("retinanet_plugin.data.validation") as messages:
        dicts = load_coco(request, write(data), root)
    assert len(messages) == 3, messages
    assert "3 boxes had a NaN/inf coordinate or zero or negative width" in messages[0]
    assert "1 boxes lay entirely outside their image" in messages[1]
    assert "1 boxes reached outside their image and were clipped" in messages[2]
    boxes = {(r["image_id"], tuple(a["bbox"])) for r in dicts for a in r["annotations"]}
    assert len(boxes) == len(annotations) - 4
    clipped = annotations[3]
    x, y, w, h = clipped["bbox"]
    assert (clipped["image_id"], (0.0, 0.0, x + w, y + h)) in boxes


def test_annotated_image_size_that_differs_from_the_file_is_corrected_with_a_count(coco, request):
    """detectron2 would stop at the first such image (SizeMismatchError); the file's size is
    used, with one counted warning."""
    data, root, write = coco
    true_width = data["images"][2]["width"]
    data["images"][2]["width"] += 17
    data["images"][5]["height"] = 3
    with warnings_of("retinanet_plugin.data.validation") as messages:
        dicts = load_coco(request, write(data), root)
    sizes = {d["image_id"]: (d["width"], d["height"]) for d in dicts}
    assert sizes[data["images"][2]["id"]][0] == true_width
    assert all((d["width"], d["height"]) == Image.open(d["file_name"]).size for d in dicts)
    assert any("2 of 16 images have another width/height" in m for m in messages), messages


def test_duplicate_annotation_ids_are_an_error(coco, request):
    data, root, write = coco
    data["annotations"][3]["id"] = data["annotations"][0]["id"]
    with pytest.raises(DatasetError, match="2 annotations have id .* must be unique"):
        load_coco(request, write(data), root)


def test_dataset_left_without_boxes_is_an_error_naming_it(coco, request):
    data, root, write = coco
    for annotation in data["annotations"]:
        annotation["bbox"][2] = 0
    with pytest.raises(DatasetError, match=rf"dataset 'coco_{request.node.name}' is empty"):
        load_coco(request, write(data), root)


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "link.png"])
def test_coco_file_names_outside_the_image_root_are_rejected(coco, request, entry):
    data, root, write = coco
    os.symlink("/etc/passwd", os.path.join(root, "link.png"))
    data["images"][2]["file_name"] = entry
    expected = rf"{re.escape(repr(entry))} points outside the folder {re.escape(root)}"
    with pytest.raises(DatasetError, match=expected):
        load_coco(request, write(data), root)


@pytest.fixture
def voc(voc_dataset, tmp_path):
    """A writable copy of the VOC-layout shapes dataset; returns its folder."""
    voc_dir = tmp_path / "voc"
    shutil.copytree(voc_dataset, voc_dir)
    return str(voc_dir)


_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def first_train_xml(voc_dir):
    with open(os.path.join(voc_dir, "ImageSets", "Main", "train.txt")) as f:
        return os.path.join(voc_dir, "Annotations", f.readline().strip() + ".xml")


def test_voc_records_are_detectron2s(voc):
    """The plugin reads VOC splits itself (detectron2's loader fails on one-image splits); its
    records equal those of detectron2's ``load_voc_instances`` on a split of many images."""
    from detectron2.data.datasets import load_voc_instances
    from retinanet_plugin.data.validation import load_voc_split

    with open(os.path.join(voc, "ImageSets", "Main", "train.txt")) as f:
        ids = f.read().split()
    records, difficult = load_voc_split(voc, ids, list(SHAPE_CLASSES))
    assert records == load_voc_instances(voc, "train", list(SHAPE_CLASSES))
    assert len(records) == 16 and difficult == [[False] * len(r["annotations"]) for r in records]


def test_voc_split_of_one_image_loads(voc, request):
    """A split file listing one image (a 0-d array for detectron2's np.loadtxt) gives that
    image's record, its boxes 0-based as VOC's 1-based corners minus one."""
    with open(first_train_xml(voc)) as f:
        xml = f.read()
    file_id = os.path.basename(first_train_xml(voc))[: -len(".xml")]
    with open(os.path.join(voc, "ImageSets", "Main", "one.txt"), "w") as f:
        f.write(file_id + "\n")
    name = f"voc_{request.node.name}"
    register_voc_dataset(name, voc, "one", list(SHAPE_CLASSES))
    (record,) = DatasetCatalog.get(name)
    first_box = [float(re.search(f"<{k}>([^<]+)</{k}>", xml).group(1)) for k in _CORNERS]
    expected = [first_box[0] - 1, first_box[1] - 1, first_box[2], first_box[3]]
    assert record["image_id"] == file_id
    assert record["annotations"][0]["bbox"] == pytest.approx(expected)


def test_voc_xml_that_does_not_parse_names_file_and_line(voc, request):
    xml_file = first_train_xml(voc)
    with open(xml_file, "a") as f:
        f.write("\n<annotation>")
    with pytest.raises(DatasetError, match=rf"{re.escape(xml_file)} is not valid XML: .*line 2"):
        register_voc_dataset(f"voc_{request.node.name}", voc, "train")


def test_voc_class_not_in_the_list_names_file_class_and_list(voc, request):
    name = f"voc_{request.node.name}"
    known = list(SHAPE_CLASSES[:1])
    register_voc_dataset(name, voc, "train", known)
    with pytest.raises(
        DatasetError, match=rf"\.xml: class '\w+' is not in the class list {re.escape(str(known))}"
    ):
        DatasetCatalog.get(name)


def test_voc_split_entry_outside_the_folder_is_rejected(voc, request):
    with open(os.path.join(voc, "ImageSets", "Main", "train.txt"), "a") as f:
        f.write("../../../escape\n")
    name = f"voc_{request.node.name}"
    register_voc_dataset(name, voc, "train", list(SHAPE_CLASSES))
    expected = r"'\.\./\.\./\.\./escape\.xml' points outside the folder .*Annotations"
    with pytest.raises(DatasetError, match=expected):
        DatasetCatalog.get(name)


def test_truncated_image_is_skipped_with_a_warning_naming_it(coco, request):
    """The plugin's training loader skips an image it cannot read, naming it with a count, and
    fills the batch with another (detectron2's MapDataset retry; its Python 3.11 crash on 0.6
    is fixed where tools/install_detectron2.py builds it)."""
    from retinanet_plugin.data import build_train_mapper
    from retinanet_plugin.data.resumable import ResumableTrainLoader

    data, root, write = coco
    bad = os.path.join(root, data["images"][5]["file_name"])
    with open(bad, "rb") as f:
        content = f.read()
    with open(bad, "wb") as f:
        f.write(content[: len(content) // 2])
    dicts = load_coco(request, write(data), root)
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml")
    loader = ResumableTrainLoader(
        dicts,
        build_train_mapper(cfg),
        TrainingSampler(len(dicts), seed=0),
        batch_size=2,
        num_workers=0,
    )
    with warnings_of("retinanet_plugin.data.resumable") as messages:
        # 16 images in batches of 2: 10 batches pass every image at least once.
        for _, batch in zip(range(10), loader):
            assert len(batch) == 2
    skips = [m for m in messages if m.startswith("Skipped")]
    assert skips, "the truncated image was not read"
    assert f"Skipped {bad}: cannot read it (ImageReadError: {bad}: cannot decode" in skips[0]
    assert "1 images skipped so far" in skips[0]


def test_voc_difficult_objects_are_ignored_in_evaluation_and_kept_in_training(voc, request):
    """As VOC's evaluation ignores them: crowd regions in the COCO ground truth that COCO
    evaluation is given; as detectron2's VOC loader keeps them: boxes the training mapper
    gives the model."""
    from detectron2.data.datasets.coco import convert_to_coco_dict
    from retinanet_plugin.data import build_train_mapper

    xml_file = first_train_xml(voc)
    with open(xml_file) as f:
        xml = f.read()
    with open(xml_file, "w") as f:
        f.write(xml.replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    name = f"voc_{request.node.name}"
    register_voc_dataset(name, voc, "train", list(SHAPE_CLASSES))
    records = DatasetCatalog.get(name)
    record = next(
        r for r in records if r["file_name"].endswith(os.path.basename(xml_file)[:-4] + ".jpg")
    )
    assert [a.get("iscrowd", 0) for a in record["annotations"]][0] == 1
    assert sum(a.get("iscrowd", 0) for r in records for a in r["annotations"]) == 1

    coco = convert_to_coco_dict(name)
    image_id = next(i["id"] for i in coco["images"] if i["file_name"] == record["file_name"])
    crowd = [a["iscrowd"] for a in coco["annotations"] if a["image_id"] == image_id]
    assert crowd[0] == 1 and sum(a["iscrowd"] for a in coco["annotations"]) == 1

    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", "INPUT.RANDOM_FLIP", "none")
    instances = build_train_mapper(cfg)(record)["instances"]
    assert len(instances) == len(record["annotations"])
    # detectron2's mapper leaves crowd boxes out: the difficult one is the extra box.
    assert len(DatasetMapper(cfg, is_train=True)(record)["instances"]) == len(instances) - 1
