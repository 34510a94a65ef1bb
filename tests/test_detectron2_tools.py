"""detectron2's tools with the plugin (docs/detectron2_tools.md): the plugin's ``get_cfg`` reads
its configs, ``DefaultPredictor`` gives the plugin's detections, every dataset the plugin
registers names its evaluator, the keys only the plugin's Trainer honours are warned about under
detectron2's trainer, and ``detectron2.export`` (tools/analyze_model.py) imports."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import cv2
import pytest
import torch

import detectron2
from conftest import REPO, plugin_cfg, warnings_of
from detectron2.config import get_cfg as get_detectron2_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor, DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.events import EventStorage
from retinanet_plugin import get_cfg
from retinanet_plugin.cli.predict import BatchPredictor
from retinanet_plugin.config import load_config
from retinanet_plugin.config.trainer_keys import trainer_only_settings
from retinanet_plugin.data import register_voc_dataset
from retinanet_plugin.engine.trainer import Trainer

# The main configs and the backbones' (the ablations' set only keys of these).
YAML_CONFIGS = sorted(
    glob.glob(os.path.join(REPO, "configs", "*.yaml"))
    + glob.glob(os.path.join(REPO, "configs", "backbones", "*.yaml"))
)


@pytest.mark.parametrize("path", YAML_CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_get_cfg_reads_every_config_as_the_plugin_does(path):
    """A config file merges into the plugin's ``get_cfg()`` as detectron2's tools merge it,
    giving the config the plugin's own loader gives; detectron2's ``get_cfg()`` lacks keys."""
    cfg = get_cfg()
    cfg.merge_from_file(path)
    assert cfg.dump() == load_config(path).dump()
    with pytest.raises(KeyError):
        get_detectron2_cfg().merge_from_file(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An untrained tiny model's checkpoint (4 classes)."""
    torch.manual_seed(0)
    model = build_model(plugin_cfg("retinanet_R18_GN_tiny.yaml", "MODEL.RETINANET.NUM_CLASSES", 4))
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def test_default_predictor_gives_the_plugins_detections(weights, shapes_dataset):
    """detectron2's DefaultPredictor (demo/demo.py's) on the plugin's config from ``get_cfg``
    detects what the plugin's predict does on the same image."""
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", weights, "MODEL.RETINANET.NUM_CLASSES", "4"])
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # untrained: every score is about 0.01
    cfg.freeze()
    val_root = shapes_dataset["val"][1]
    image = cv2.imread(os.path.join(val_root, sorted(os.listdir(val_root))[0]))  # BGR
    theirs = DefaultPredictor(cfg)(image)["instances"]
    (ours,) = BatchPredictor(cfg)([image])
    assert len(theirs) == cfg.TEST.DETECTIONS_PER_IMAGE
    torch.testing.assert_close(ours.pred_boxes.tensor, theirs.pred_boxes.tensor)
    torch.testing.assert_close(ours.scores, theirs.scores)
    assert torch.equal(ours.pred_classes, theirs.pred_classes)


def test_voc_dataset_names_the_evaluator_detectron2s_tools_build(voc_dataset, tmp_path):
    """A VOC split the plugin registers has evaluator_type "coco" (tools/plain_train_net.py's
    get_evaluator picks COCOEvaluator by it), and COCOEvaluator evaluates it: its ground truth
    as detections scores AP 100."""
    name = "tools_voc_val"
    register_voc_dataset(name, voc_dataset, "val")
    try:
        assert MetadataCatalog.get(name).evaluator_type == "coco"
        # As plain_train_net.py's get_evaluator builds it (with an output folder).
        evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False, output_dir=tmp_path)
        evaluator.reset()
        for record in DatasetCatalog.get(name):
            instances = Instances((record["height"], record["width"]))
            boxes = [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in record["annotations"]
            ]
            instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            instances.scores = torch.ones(len(boxes))
            instances.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]])
            evaluator.process([record], [{"instances": instances}])
        assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _first_training_step_warnings(model):
    batch = [{"image": torch.zeros(3, 64, 64), "instances": Instances((64, 64))}]
    batch[0]["instances"].gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
    batch[0]["instances"].gt_classes = torch.tensor([0])
    messages = []
    with EventStorage(), warnings_of("retinanet_plugin.modeling.meta_arch") as first:
        model.train()(batch)
    messages.append(list(first))
    with EventStorage(), warnings_of("retinanet_plugin.modeling.meta_arch") as second:
        model(batch)
    messages.append(list(second))
    return messages


def test_keys_only_the_plugins_trainer_honours_are_warned_about_under_detectron2s():
    """The tiny config's AdamW and a MixUp setting: detectron2's trainer (its build_model)
    trains the model with a warning naming both, once; the plugin's Trainer without one."""
    opts = ["INPUT.AUG.MIXUP.ENABLED", "True", "MODEL.RETINANET.NUM_CLASSES", "2"]
    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", *opts)
    expected = ["SOLVER.OPTIMIZER = 'AdamW'", "INPUT.AUG.MIXUP.ENABLED = True"]
    assert trainer_only_settings(cfg) == expected
    first, second = _first_training_step_warnings(DefaultTrainer.build_model(cfg))
    assert len(first) == 1 and all(setting in first[0] for setting in expected)
    assert second == []
    assert _first_training_step_warnings(Trainer.build_model(cfg)) == [[], []]
    # detectron2's own values of the keys: nothing to warn about.
    defaults = plugin_cfg("retinanet_R50_FPN_1x.yaml", "SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR")
    assert trainer_only_settings(defaults) == []
    assert trainer_only_settings(get_detectron2_cfg()) == []


def _built_fixes():
    """The source fixes of a detectron2 built by tools/install_detectron2.py, else None."""
    record = os.path.join(os.path.dirname(detectron2.__file__), "PURE_PYTHON_BUILD.json")
    if not os.path.isfile(record):
        return None
    with open(record) as f:
        return json.load(f)["fixes"]


def test_detectron2_export_imports_for_analyze_model():
    """tools/analyze_model.py imports detectron2.export (through detectron2.utils.analysis),
    which detectron2 0.6 built by tools/install_detectron2.py imports without caffe2: a fresh
    interpreter counts a convolution's flops as hand-computed (16 * 16 * 8 outputs, 3 * 3 * 3
    multiply-adds each)."""
    fixes = _built_fixes()
    if fixes is not None and not any(
        "detectron2.export imports without caffe2" in f for f in fixes
    ):
        pytest.skip("this detectron2 build predates the fix: rerun tools/install_detectron2.py")
    code = textwrap.dedent(
        """
        import torch
        from detectron2.utils.analysis import FlopCountAnalysis
        conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        print(FlopCountAnalysis(conv, torch.zeros(1, 3, 16, 16)).total())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) == 16 * 16 * 8 * 3 * 3 * 3
