"""Bad-input cases: datasets, annotation files and image files (see bad_input_env.py; run by
test_bad_inputs.py). Each case's dataset files are the user's: they must be left unchanged."""

import json
import os
import shutil
from typing import Callable, Dict, List

from bad_input_env import Case, Env
from PIL import Image

from conftest import write_voc_split


def _edited_train(edit: Callable[[Dict], None]) -> Callable[[Env], List[str]]:
    """train_net's command line with the shapes training set's JSON edited by ``edit``."""

    def argv(env: Env) -> List[str]:
        return _train_with(env, env.coco_copy(edit), env.train_root)

    return argv


def _train_with(env: Env, train_json: str, train_root: str, *extra: str) -> List[str]:
    """env.train() with the training set registered from ``train_json`` and ``train_root``."""
    argv = env.train(*extra)
    index = argv.index(env.train_json)
    argv[index : index + 2] = [train_json, train_root]
    return argv


def _edited(env: Env) -> List[str]:
    return [env.path("edited.json")]


def _orphan_annotation(data):
    data["annotations"][4]["image_id"] = 999
    data["annotations"][7]["image_id"] = 999


def _same_file_twice(data):
    data["images"][3]["file_name"] = data["images"][1]["file_name"]


def _same_category_name(data):
    data["categories"][2]["name"] = data["categories"][0]["name"]


def _same_category_id(data):
    data["categories"][2]["id"] = data["categories"][0]["id"]


def _numeric_file_name(data):
    data["images"][2]["file_name"] = 3


def _all_crowd(data):
    for annotation in data["annotations"]:
        annotation["iscrowd"] = 1


def _escaping_test_set(env: Env) -> List[str]:
    """The TEST set has a file name leading out of its image root (to a training image): refused
    before training, not when evaluating after it."""
    with open(env.val_json) as f:
        data = json.load(f)
    data["images"][1]["file_name"] = os.path.join("..", "train", "00001.png")
    path = env.path("val_edited.json", json.dumps(data))
    argv = env.train()
    argv[argv.index(env.val_json)] = path
    return argv


def _other_test_classes(env: Env) -> List[str]:
    with open(env.val_json) as f:
        data = json.load(f)
    data["categories"][3]["name"] = "plus"
    path = env.path("val_edited.json", json.dumps(data))
    argv = env.train()
    argv[argv.index(env.val_json)] = path
    return argv


def _image_root_copy(env: Env) -> str:
    root = str(env.tmp / "images")
    if not os.path.isdir(root):
        shutil.copytree(env.train_root, root)
    return root


def _broken_image(content: bytes) -> Callable[[Env], List[str]]:
    def argv(env: Env) -> List[str]:
        root = _image_root_copy(env)
        with open(os.path.join(root, "00004.png"), "wb") as f:
            f.write(content)
        return _train_with(env, env.train_json, root)

    return argv


def _unturned_exif(env: Env) -> List[str]:
    """A JPEG stored 128x96 whose EXIF orientation (6) turns it to 96x128 when read, annotated
    with the stored size: its boxes were drawn on the unturned pixels."""
    root = _image_root_copy(env)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (128, 96), (90, 120, 150)).save(os.path.join(root, "turned.jpg"), exif=exif)
    with open(env.train_json) as f:
        data = json.load(f)
    data["images"][0].update(file_name="turned.jpg", width=128, height=96)
    return _train_with(env, env.path("edited.json", json.dumps(data)), root)


def _voc(env: Env) -> str:
    voc_dir = str(env.tmp / "voc")
    if not os.path.isdir(voc_dir):
        write_voc_split(env.train_json, env.train_root, voc_dir, "train")
    return voc_dir


def _voc_train(env: Env, *extra: str) -> List[str]:
    """train_net's command line training on the shapes training set in VOC layout."""
    argv = env.train("--register-voc", f"{env.name}_voc", _voc(env), "train", *extra)
    argv[argv.index(f"('{env.name}_train',)")] = f"('{env.name}_voc',)"
    argv[argv.index(f"('{env.name}_val',)")] = "()"
    return argv


def _voc_file(env: Env, *parts: str) -> str:
    return os.path.join(_voc(env), *parts)


def _first_xml(env: Env) -> str:
    return _voc_file(env, "Annotations", "train_00001.xml")


def _edit_first_xml(env: Env, old: str, new: str) -> None:
    with open(_first_xml(env)) as f:
        xml = f.read()
    with open(_first_xml(env), "w") as f:
        f.write(xml.replace(old, new, 1))


def _voc_without_name(env: Env) -> List[str]:
    _voc(env)
    _edit_first_xml(env, "<name>", "<label>")
    _edit_first_xml(env, "</name>", "</label>")
    return _voc_train(env)


def _voc_name_with_spaces(env: Env) -> List[str]:
    _voc(env)
    _edit_first_xml(env, "</name>", " </name>")
    return _voc_train(env)


def _voc_split_twice(env: Env) -> List[str]:
    with open(_voc_file(env, "ImageSets", "Main", "train.txt"), "a") as f:
        f.write("train_00003\n")
    return _voc_train(env)


CASES: Dict[str, Case] = {
    # -- COCO annotation files -------------------------------------------------------------
    "data-coco-orphan-annotation": Case(
        "train_net.py",
        "COCO annotation whose `image_id` is not in `images`",
        _edited_train(_orphan_annotation),
        ["edited.json", "2 annotations refer to 1 image ids that are not in 'images'", "999"],
        _edited,
    ),
    "data-coco-file-twice": Case(
        "train_net.py",
        "COCO JSON listing one image file under two ids",
        _edited_train(_same_file_twice),
        ["edited.json", "1 images are listed twice", "'00002.png' (ids 2 and 4)"],
        _edited,
    ),
    "data-coco-category-name-twice": Case(
        "train_net.py",
        "COCO JSON with two categories of one name",
        _edited_train(_same_category_name),
        ["edited.json", "'ellipse': ids [1, 3]"],
        _edited,
    ),
    "data-coco-category-id-twice": Case(
        "train_net.py",
        "COCO JSON with two categories of one id",
        _edited_train(_same_category_id),
        ["edited.json", "2 categories have id 1", "must be unique"],
        _edited,
    ),
    "data-coco-file-name-number": Case(
        "train_net.py",
        "COCO image whose `file_name` is a number",
        _edited_train(_numeric_file_name),
        ["edited.json", "image 3: file_name 3 is not a file name"],
        _edited,
    ),
    "data-coco-all-crowd": Case(
        "train_net.py",
        "COCO JSON whose boxes are all `iscrowd`",
        _edited_train(_all_crowd),
        ["_train'", "all its 60 boxes are marked iscrowd"],
        _edited,
    ),
    "data-coco-json-folder": Case(
        "train_net.py",
        "`--register-coco` JSON that is a folder",
        lambda e: _train_with(e, e.train_root, e.train_root),
        ["annotation file", "is a folder"],
        lambda e: [e.train_root],
    ),
    "data-coco-escaping-test-set": Case(
        "train_net.py",
        "`file_name` with `..` leading out of the image root, in the test set",
        _escaping_test_set,
        ["val_edited.json", "'../train/00001.png' points outside the folder"],
        lambda e: [e.path("val_edited.json"), e.train_root],
    ),
    "data-train-test-classes": Case(
        "train_net.py",
        "test set with other categories than the training set",
        _other_test_classes,
        ["_train' and", "_val' have different classes", "'cross'", "'plus'"],
        lambda e: [e.path("val_edited.json")],
    ),
    # -- image files ----------------------------------------------------------------------
    "data-image-empty": Case(
        "train_net.py",
        "empty image file in a dataset",
        _broken_image(b""),
        ["1 of 16 images cannot be read", "00004.png", "the file is empty"],
        lambda e: [_image_root_copy(e)],
    ),
    "data-image-corrupt": Case(
        "train_net.py",
        "image file that is not an image, in a dataset",
        _broken_image(b"<html>not found</html>"),
        ["00004.png", "not in an image format PIL knows"],
        lambda e: [_image_root_copy(e)],
    ),
    "data-image-exif-unturned": Case(
        "train_net.py",
        "JPEG turned by its EXIF orientation, annotated with its unturned size",
        _unturned_exif,
        ["1 images have an EXIF orientation", "turned.jpg (annotated 128x96, shown 96x128)"],
        lambda e: [_image_root_copy(e), e.path("edited.json")],
    ),
    # -- Pascal VOC -----------------------------------------------------------------------
    "data-voc-class-typo": Case(
        "train_net.py",
        "`--voc-classes` with a misspelled class",
        lambda e: _voc_train(e, "--voc-classes", "cross,ellipse,rectangel,triangle"),
        ["--voc-classes", "'rectangel' is in no XML file (did you mean 'rectangle'?)", "not in it"],
        lambda e: [_voc(e)],
    ),
    "data-voc-classes-empty-name": Case(
        "train_net.py",
        "`--voc-classes` with an empty name (`tree,`)",
        lambda e: _voc_train(e, "--voc-classes", "cross,ellipse,rectangle,triangle,"),
        ["--voc-classes", "class 5 of 5 is named ''"],
        lambda e: [_voc(e)],
    ),
    "data-voc-split-twice": Case(
        "train_net.py",
        "VOC split file listing an id twice",
        _voc_split_twice,
        ["train.txt", "1 ids are listed more than once ('train_00003')"],
        lambda e: [_voc(e)],
    ),
    "data-voc-object-without-name": Case(
        "train_net.py",
        "VOC object without `<name>`",
        _voc_without_name,
        ["train_00001.xml", "object 1 has no <name>"],
        lambda e: [_voc(e)],
    ),
    "data-voc-name-spaces": Case(
        "train_net.py",
        "VOC object name with spaces around it",
        _voc_name_with_spaces,
        ["train_00001.xml", "with spaces around it"],
        lambda e: [_voc(e)],
    ),
}
