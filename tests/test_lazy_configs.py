"""The LazyConfig (.py) configs of configs/lazy build the models of their YAML configs, with the
same schedules and optimizers, and train through the plugin's lazyconfig_train_net front end;
the plugin's components take the omegaconf ListConfig arguments a LazyConfig passes."""

import copy
import json
import os

import pytest
import torch
from omegaconf import DictConfig, ListConfig
from train_runs import coco_args

from conftest import REPO, plugin_cfg, pycocotools_ap, run_main
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from retinanet_plugin import FocalLossHead, RetinaNetAnchorGenerator, octave_scaled_sizes
from retinanet_plugin.engine.solver import build_lr_scheduler, build_optimizer
from retinanet_plugin.modeling.backbone import TimmBackbone

LAZY = os.path.join(REPO, "configs", "lazy")
# LazyConfig -> the YAML config it reproduces.
PAIRS = {
    "retinanet_R50_FPN_1x.py": "retinanet_R50_FPN_1x.yaml",
    "retinanet_R50_FPN_3x.py": "retinanet_R50_FPN_3x.yaml",
    "retinanet_R101_FPN_3x.py": "retinanet_R101_FPN_3x.yaml",
    "finetune_R50_FPN.py": "finetune_R50_FPN.yaml",
    "retinanet_R18_GN_tiny.py": "retinanet_R18_GN_tiny.yaml",
}
NUM_CLASSES = 5


def _lazy(name):
    return LazyConfig.load(os.path.join(LAZY, name))


def _small_batch():
    """Two small images with boxes of several sizes (small: R101 runs them in a second)."""
    generator = torch.Generator().manual_seed(1)
    batch = []
    for h, w in [(96, 128), (112, 80)]:
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 70.0, 90.0], [5, 5, 30, 25]]))
        instances.gt_classes = torch.tensor([0, NUM_CLASSES - 1])
        image = torch.randint(0, 256, (3, h, w), generator=generator).float()
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


def _models(name):
    """(the YAML config's model, the LazyConfig's model) with NUM_CLASSES classes, the second
    holding the first's (random) weights."""
    torch.manual_seed(0)
    cfg = plugin_cfg(PAIRS[name], "MODEL.RETINANET.NUM_CLASSES", str(NUM_CLASSES))
    yaml_model = build_model(cfg)
    lazy = _lazy(name)
    lazy.model.num_classes = NUM_CLASSES
    lazy_model = instantiate(lazy.model)
    # strict: the same parameter and buffer names, shapes checked by load_state_dict too.
    lazy_model.load_state_dict(yaml_model.state_dict(), strict=True)
    return yaml_model, lazy_model


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.usefixtures("single_thread")
def test_lazy_config_builds_the_yaml_configs_model(name):
    """Same parameter names, shapes and frozen parameters; with the same weights, the same
    training losses (anchors, matching, focal loss, normalizer) and detections."""
    yaml_model, lazy_model = _models(name)
    ours, theirs = lazy_model.state_dict(), yaml_model.state_dict()
    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in theirs.items()]
    trainable = {k for k, p in yaml_model.named_parameters() if p.requires_grad}
    assert {k for k, p in lazy_model.named_parameters() if p.requires_grad} == trainable
    batch = _small_batch()
    with EventStorage():
        losses = [model.train()(copy.deepcopy(batch)) for model in (yaml_model, lazy_model)]
    assert losses[0].keys() == losses[1].keys() == {"loss_cls", "loss_box_reg"}
    for key in losses[0]:
        assert torch.equal(losses[0][key], losses[1][key]), key
    with torch.no_grad():
        raw = []
        for model in (yaml_model, lazy_model):
            model.eval().test_score_thresh = 0.0  # random weights: every score is about 0.01
            images = model.preprocess_image(batch)
            features = model.backbone(images.tensor)
            raw.append(model.head([features[f] for f in model.head_in_features]))
        outputs = [model(copy.deepcopy(batch)) for model in (yaml_model, lazy_model)]
    for expected, got in zip(*raw):  # per level logits, then per level box deltas
        for a, b in zip(expected, got):
            assert a.abs().max() > 0 and torch.equal(a, b)
    for expected, got in zip(*outputs):
        expected, got = expected["instances"], got["instances"]
        assert torch.equal(expected.pred_boxes.tensor, got.pred_boxes.tensor)
        assert torch.equal(expected.scores, got.scores)
        assert torch.equal(expected.pred_classes, got.pred_classes)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_lazy_schedule_equals_the_yaml_configs(name):
    """The LR multiplier (of the plugin's trainer for the YAML config) at every iteration, or
    every 54th of the long schedules plus those around each step, and the length of training."""
    cfg = plugin_cfg(PAIRS[name])
    lazy = _lazy(name)
    assert lazy.train.max_iter == cfg.SOLVER.MAX_ITER
    assert lazy.train.checkpointer.period == cfg.SOLVER.CHECKPOINT_PERIOD
    assert lazy.dataloader.train.total_batch_size == cfg.SOLVER.IMS_PER_BATCH
    param = torch.nn.Parameter(torch.zeros(1))
    yaml_schedule = build_lr_scheduler(cfg, torch.optim.SGD([param], lr=1.0))
    lazy_schedule = instantiate(lazy.lr_multiplier)
    max_iter = cfg.SOLVER.MAX_ITER
    step = max(1, max_iter // 5000)  # every iteration of the short schedules
    iters = sorted({*range(0, max_iter, step), *(s + d for s in cfg.SOLVER.STEPS for d in (-1, 0))})
    assert [yaml_schedule._multiplier(i / max_iter) for i in iters] == pytest.approx(
        [lazy_schedule(i / max_iter) for i in iters], rel=1e-12, abs=1e-15
    )


@pytest.mark.parametrize("name", ["retinanet_R18_GN_tiny.py", "retinanet_R50_FPN_1x.py"])
def test_lazy_optimizer_equals_the_yaml_configs(name):
    """The optimizer class and, per parameter, its learning rate, weight decay (none on norm
    and bias parameters with AdamW, none on norm layers with SGD) and momentum or betas."""
    yaml_model, lazy_model = _models(name)
    cfg = plugin_cfg(PAIRS[name])
    expected = build_optimizer(cfg, yaml_model)
    lazy = _lazy(name)
    lazy.optimizer.params.model = lazy_model
    got = instantiate(lazy.optimizer)
    # The YAML config's class may be detectron2's subclass clipping gradients (the tiny one).
    assert isinstance(expected, type(got)) and type(got) in (torch.optim.SGD, torch.optim.AdamW)

    def per_parameter(optimizer, model):
        names = {id(p): n for n, p in model.named_parameters()}
        settings = {}
        for group in optimizer.param_groups:
            options = {
                k: group[k] for k in ("lr", "weight_decay", "momentum", "betas") if k in group
            }
            settings.update({names[id(p)]: options for p in group["params"]})
        return settings

    assert per_parameter(got, lazy_model) == per_parameter(expected, yaml_model)


def test_list_config_arguments_build_the_same_components():
    """ListConfig and DictConfig arguments, as detectron2's ``instantiate`` passes a LazyConfig's
    lists and dicts, give the components that plain lists give."""
    sizes, ratios = [[32], [64], [128]], [[0.5, 1.0, 2.0]]
    assert octave_scaled_sizes(ListConfig(sizes), 3) == octave_scaled_sizes(sizes, 3)
    assert octave_scaled_sizes(ListConfig([16, 32]), 2) == [[16, 16 * 2**0.5, 32, 32 * 2**0.5]]
    arguments = dict(sizes=sizes, scales_per_octave=3, aspect_ratios=ratios, strides=[8, 16, 32])
    plain = RetinaNetAnchorGenerator(**arguments)
    listconfig = RetinaNetAnchorGenerator(
        **{k: ListConfig(v) for k, v in arguments.items() if k != "scales_per_octave"},
        scales_per_octave=3,
    )
    features = [torch.zeros(1, 8, 64 // s, 64 // s) for s in (8, 16, 32)]
    for a, b in zip(plain(features), listconfig(features)):
        assert torch.equal(a.tensor, b.tensor)

    head_arguments = dict(num_classes=3, num_anchors=9, conv_dims=[32, 32], norm="GN")
    shapes = [ShapeSpec(channels=32)] * 3
    torch.manual_seed(0)
    plain_head = FocalLossHead(input_shape=shapes, **head_arguments)
    torch.manual_seed(0)
    listconfig_head = FocalLossHead(
        input_shape=ListConfig(shapes, flags={"allow_objects": True}),
        **{**head_arguments, "conv_dims": ListConfig([32, 32])},
    )
    for (k, a), b in zip(plain_head.state_dict().items(), listconfig_head.state_dict().values()):
        assert torch.equal(a, b), k

    pytest.importorskip("timm")
    plain_backbone = TimmBackbone(
        "resnet10t", [2, 3, 4], norm="BN", model_args={"channels": [8, 16, 32, 64]}
    )
    listconfig_backbone = TimmBackbone(
        "resnet10t",
        ListConfig([2, 3, 4]),
        norm="BN",
        model_args=DictConfig({"channels": [8, 16, 32, 64]}),
    )
    assert listconfig_backbone.output_shape() == plain_backbone.output_shape()


def test_lazy_training_of_the_tiny_config(tmp_path, shapes_dataset):
    """tools/lazyconfig_train_net.py trains configs/lazy/retinanet_R18_GN_tiny.py on a registered
    COCO dataset: model.num_classes follows the dataset, the checkpoint loads strictly into the
    YAML tiny config's model, and the evaluation's AP is pycocotools' AP of its results file."""
    from retinanet_plugin.cli import lazy_train

    output = tmp_path / "lazy"
    argv = [
        "--config-file",
        os.path.join(LAZY, "retinanet_R18_GN_tiny.py"),
        *coco_args(shapes_dataset),
        # Strings quoted: detectron2 main without hydra-core reads values as Python literals.
        "dataloader.train.dataset.names='shapes_train'",
        "dataloader.test.dataset.names='shapes_val'",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        f"dataloader.evaluator.output_dir='{output / 'inference'}'",
        "model.test_score_thresh=0.0",
        "train.max_iter=1",
        "train.eval_period=1",
        "train.log_period=1",
        f"train.output_dir='{output}'",
    ]
    status, log = run_main(lazy_train.main, argv)
    assert status == 0, log[-5000:]
    assert "model.num_classes set to 4" in log
    with open(output / "metrics.json") as f:
        rows = [json.loads(line) for line in f]
    assert [row["iteration"] for row in rows if "total_loss" in row] == [0]

    cfg = plugin_cfg("retinanet_R18_GN_tiny.yaml", "MODEL.RETINANET.NUM_CLASSES", "4")
    state = torch.load(output / "model_final.pth", weights_only=True)["model"]
    result = build_model(cfg).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    ap = [row["bbox/AP"] for row in rows if "bbox/AP" in row]
    results_file = output / "inference" / "coco_instances_results.json"
    assert ap == [pytest.approx(pycocotools_ap(shapes_dataset["val"][0], str(results_file)))]
