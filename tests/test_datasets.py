"""Dataset registration: COCO and VOC through detectron2's loaders, class counts, errors."""

import argparse
import json
import os

import pytest

from conftest import plugin_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from retinanet_plugin import get_config_file
from retinanet_plugin.config.loading import config_sets_key
from retinanet_plugin.data import (
    SHAPE_CLASSES,
    DatasetError,
    add_dataset_arguments,
    check_datasets_before_training,
    register_coco_dataset,
    register_datasets_from_args,
    register_voc_dataset,
    resolve_num_classes,
    voc_class_names,
)

XYXY = BoxMode.XYXY_ABS


def unique(name, request):
    """A dataset name unique to this test (the catalogs are process-global)."""
    return f"{name}_{request.node.name}"


def test_voc_boxes_equal_the_coco_boxes(shapes_dataset, voc_dataset, request):
    """VOC registration with class names read from the XML: same images and boxes as COCO."""
    voc_name, coco_name = unique("voc", request), unique("coco", request)
    classes = register_voc_dataset(voc_name, voc_dataset, "train")
    register_coco_dataset(coco_name, *shapes_dataset["train"])
    with open(shapes_dataset["train"][0]) as f:
        present = {a["category_id"] for a in json.load(f)["annotations"]}
    assert classes == sorted(SHAPE_CLASSES[i - 1] for i in present)
    assert MetadataCatalog.get(voc_name).thing_classes == classes
    voc, coco = DatasetCatalog.get(voc_name), DatasetCatalog.get(coco_name)
    assert len(voc) == len(coco) == 16
    coco_classes = MetadataCatalog.get(coco_name).thing_classes
    for v, c in zip(voc, coco):
        boxes_v = [(classes[a["category_id"]], a["bbox"]) for a in v["annotations"]]
        boxes_c = [
            (coco_classes[a["category_id"]], BoxMode.convert(a["bbox"], a["bbox_mode"], XYXY))
            for a in c["annotations"]
        ]
        assert len(boxes_v) == len(boxes_c)
        for (name_v, box_v), (name_c, box_c) in zip(boxes_v, boxes_c):
            assert name_v == name_c
            assert box_v == pytest.approx(box_c, abs=1e-4)


def test_voc_splits_of_one_folder_share_class_names(voc_dataset, request):
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    train, val = unique("voc_train", request), unique("voc_val", request)
    args = parser.parse_args(
        ["--register-voc", train, voc_dataset, "train", "--register-voc", val, voc_dataset, "val"]
    )
    register_datasets_from_args(args)
    expected = sorted(
        set(voc_class_names(voc_dataset, "train")) | set(voc_class_names(voc_dataset, "val"))
    )
    assert MetadataCatalog.get(train).thing_classes == expected
    assert MetadataCatalog.get(val).thing_classes == expected


def test_missing_paths_and_duplicate_names_are_clear_errors(shapes_dataset, tmp_path, request):
    json_file, image_root = shapes_dataset["train"]
    with pytest.raises(DatasetError, match="nope.json"):
        register_coco_dataset(unique("a", request), str(tmp_path / "nope.json"), image_root)
    with pytest.raises(DatasetError, match="not a folder"):
        register_coco_dataset(unique("a", request), json_file, str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="Annotations"):
        register_voc_dataset(unique("v", request), str(tmp_path), "train")
    register_coco_dataset(unique("b", request), json_file, image_root)
    # The same registration again (a launched process registering what its parent did) is a
    # no-op; the name for other data is an error.
    register_coco_dataset(unique("b", request), json_file, image_root)
    other_json, other_root = shapes_dataset["val"]
    with pytest.raises(DatasetError, match="already registered"):
        register_coco_dataset(unique("b", request), other_json, other_root)
    with pytest.raises(DatasetError, match="already registered by detectron2"):
        register_coco_dataset("coco_2017_train", json_file, image_root)


def test_num_classes_follows_the_dataset_unless_set(shapes_dataset, request):
    name = unique("coco", request)
    register_coco_dataset(name, *shapes_dataset["train"])
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml")
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 80  # detectron2's default, not set by the config
    resolve_num_classes(cfg, name, set_by_user=False)
    assert cfg.MODEL.RETINANET.NUM_CLASSES == len(SHAPE_CLASSES)

    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", "MODEL.RETINANET.NUM_CLASSES", "3")
    with pytest.raises(ValueError, match=r"NUM_CLASSES is 3, but dataset .* has 4 classes"):
        resolve_num_classes(cfg, name, set_by_user=True)


def test_config_sets_key_reads_file_chain_and_overrides(tmp_path):
    tiny = get_config_file("retinanet_R18_GN_tiny.yaml")
    key = "MODEL.RETINANET.NUM_CLASSES"
    assert not config_sets_key(tiny, [], key)
    assert config_sets_key(tiny, [key, "3"], key)
    assert config_sets_key(tiny, [], "MODEL.RETINANET.NUM_CONVS")  # in the file
    assert config_sets_key(tiny, [], "MODEL.RETINANET.IOU_THRESHOLDS")  # in its _BASE_
    child = tmp_path / "child.yaml"
    child.write_text(f'_BASE_: "{tiny}"\nMODEL:\n  RETINANET:\n    NUM_CLASSES: 2\n')
    assert config_sets_key(str(child), [], key)


def test_voc_split_of_a_single_image_loads(voc_dataset, request):
    """detectron2's loader reads split files with np.loadtxt, which makes one id a 0-d array."""
    ids = os.path.join(voc_dataset, "ImageSets", "Main", "train.txt")
    with open(ids) as f:
        first = f.readline().strip()
    with open(os.path.join(voc_dataset, "ImageSets", "Main", "one.txt"), "w") as f:
        f.write(first + "\n")
    name = unique("voc_one", request)
    register_voc_dataset(name, voc_dataset, "one", class_names=list(SHAPE_CLASSES))
    records = DatasetCatalog.get(name)
    assert [os.path.basename(r["file_name"]) for r in records] == [first + ".jpg"]


def test_a_coco_file_is_parsed_once_by_the_plugin_and_once_by_detectron2(
    shapes_dataset, request, monkeypatch
):
    """Setting up a run (class count) and loading the dataset (checks, then detectron2's own
    loader) parse the annotation file twice in all, not four times."""
    import json as json_module

    from retinanet_plugin.data.validation import forget_coco_json

    json_file, image_root = shapes_dataset["train"]
    parsed = []
    original = json_module.load

    def counting_load(f, *args, **kwargs):
        parsed.append(os.path.abspath(getattr(f, "name", "")))
        return original(f, *args, **kwargs)

    monkeypatch.setattr(json_module, "load", counting_load)
    forget_coco_json()  # another test may have read this file last
    name = unique("parsed", request)
    register_coco_dataset(name, json_file, image_root)
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml")
    resolve_num_classes(cfg, name, set_by_user=False)  # what train_net's setup does
    records = DatasetCatalog.get(name)  # what the training loader does
    assert len(records) == 16
    assert parsed.count(os.path.abspath(json_file)) == 2


def test_a_training_set_checked_before_training_is_loaded_once(
    shapes_dataset, request, monkeypatch
):
    """The check before launching loads the training set; the trainer's load gets those
    records instead of loading them again; a later load reads the files again."""
    from retinanet_plugin.data import datasets

    name = unique("checked", request)
    register_coco_dataset(name, *shapes_dataset["train"])
    loads = []
    original = datasets.load_coco_json

    def counting(*args, **kwargs):
        loads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_coco_json", counting)
    check_datasets_before_training([name], [])
    assert len(loads) == 1
    records = DatasetCatalog.get(name)
    assert len(loads) == 1 and len(records) == 16
    assert DatasetCatalog.get(name) == records and len(loads) == 2


def test_test_set_escaping_its_image_root_is_refused_before_training(shapes_dataset, tmp_path):
    """Found when the run is checked, not by the evaluation after training: no checkpoint."""
    from conftest import run_main
    from retinanet_plugin.cli import train

    val_json, val_root = shapes_dataset["val"]
    with open(val_json) as f:
        data = json.load(f)
    data["images"][0]["file_name"] = "../train/00001.png"
    edited = tmp_path / "val.json"
    edited.write_text(json.dumps(data))
    out = tmp_path / "out"
    status, log = run_main(
        train.main,
        [
            "--config-file",
            get_config_file("retinanet_R18_GN_tiny.yaml"),
            "--register-coco",
            "t",
            *shapes_dataset["train"],
            "--register-coco",
            "v",
            edited,
            val_root,
            "DATASETS.TRAIN",
            "('t',)",
            "DATASETS.TEST",
            "('v',)",
            "SOLVER.MAX_ITER",
            "1",
            "OUTPUT_DIR",
            out,
        ],
    )
    assert status == 2 and "'../train/00001.png' points outside the folder" in log
    assert not out.exists() or not any(p.suffix == ".pth" for p in out.iterdir())


def test_test_set_with_the_classes_in_another_order_is_refused(shapes_dataset, tmp_path, request):
    """Labels follow the order of the category ids: the same names in another order would
    evaluate every class against another one."""
    json_file, image_root = shapes_dataset["val"]
    with open(json_file) as f:
        data = json.load(f)
    data["categories"][0]["name"], data["categories"][1]["name"] = "rectangle", "ellipse"
    (tmp_path / "val.json").write_text(json.dumps(data))
    train, test = unique("train", request), unique("test", request)
    register_coco_dataset(train, *shapes_dataset["train"])
    register_coco_dataset(test, str(tmp_path / "val.json"), image_root)
    with pytest.raises(DatasetError, match=r"the same names in another order: \['ellipse', 're"):
        check_datasets_before_training([train], [test])
    check_datasets_before_training([train], [train])


def test_voc_classes_are_stripped_of_spaces_around_them(voc_dataset, request):
    """`--voc-classes ' cross , ellipse,rectangle ,triangle'` means those four classes."""
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    name = unique("voc", request)
    args = parser.parse_args(
        ["--register-voc", name, voc_dataset, "train", "--voc-classes", " cross , ellipse,"]
        + ["--voc-classes", " cross , ellipse,rectangle ,triangle "]
    )
    register_datasets_from_args(args)
    assert MetadataCatalog.get(name).thing_classes == ["cross", "ellipse", "rectangle", "triangle"]
