"""MODEL.RETINANET.BBOX_REG_LOSS_TYPE (and SMOOTH_L1_LOSS_BETA): every value trains and gives the
losses of detectron2's own RetinaNet with the same weights and inputs, step after step."""

import copy

import pytest
import torch
from detectron2_pairs import build_pair

from conftest import plugin_cfg
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from retinanet_plugin import get_config_file
from retinanet_plugin.compat.private_api import dense_box_regression_loss
from retinanet_plugin.config.loading import ConfigError, load_config
from retinanet_plugin.config.option_rules import BOX_REG_LOSS_TYPES

# (BBOX_REG_LOSS_TYPE, SMOOTH_L1_LOSS_BETA): smooth-L1 with beta 0 is the L1 loss (the paper's and
# the plugin configs' setting); beta only matters for smooth_l1.
LOSSES = [("smooth_l1", 0.0), ("smooth_l1", 0.1), ("giou", 0.0), ("diou", 0.0), ("ciou", 0.0)]
# Small model, ResNet frozen: the loss, not the network, is under test.
TINY = (
    "MODEL.FPN.OUT_CHANNELS",
    "32",
    "MODEL.RETINANET.NUM_CONVS",
    "1",
    "MODEL.BACKBONE.FREEZE_AT",
    "5",
)

pytestmark = pytest.mark.usefixtures("single_thread")


def make_batch(num_classes):
    generator = torch.Generator().manual_seed(1)
    batch = []
    for h, w in [(64, 96), (96, 64)]:
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor([[8.0, 10.0, 60.0, 50.0], [30, 20, 60, 40]]))
        instances.gt_classes = torch.tensor([0, num_classes - 1])
        image = torch.randint(0, 256, (3, h, w), generator=generator).float()
        batch.append({"image": image, "instances": instances})
    return batch


def box_losses_while_training(model, reference, steps=2):
    """Trains both models with SGD on the same batch; the losses of each step, (ours, theirs)."""
    batch = make_batch(model.num_classes)
    models = (model, reference)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    history = []
    for m in models:
        m.train()
    with EventStorage():
        for _ in range(steps):
            step = []
            for m, optimizer in zip(models, optimizers):
                losses = m(copy.deepcopy(batch))
                optimizer.zero_grad()
                sum(losses.values()).backward()
                optimizer.step()
                step.append({k: v.detach() for k, v in losses.items()})
            history.append(step)
    return history


@pytest.mark.parametrize("loss_type, beta", LOSSES)
def test_box_loss_equals_detectron2_while_training(loss_type, beta):
    model, reference = build_pair(
        "R18_GN_tiny",
        *TINY,
        "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
        loss_type,
        "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA",
        str(beta),
    )
    assert (model.box_reg_loss_type, model.smooth_l1_beta) == (loss_type, beta)
    for step, (ours, theirs) in enumerate(box_losses_while_training(model, reference)):
        for key in ("loss_cls", "loss_box_reg"):
            assert torch.isfinite(ours[key]), (step, key)
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=0, msg=f"{step}")


def test_each_setting_gives_a_different_box_loss():
    """The key is honoured: on the same weights and batch the five settings all differ."""
    values = []
    for loss_type, beta in LOSSES:
        torch.manual_seed(0)
        model = build_model(
            plugin_cfg(
                "retinanet_R18_GN_tiny.yaml",
                *TINY,
                "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
                loss_type,
                "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA",
                str(beta),
            )
        )
        with EventStorage(), torch.no_grad():
            values.append(model(make_batch(model.num_classes))["loss_box_reg"].item())
    assert len(set(values)) == len(LOSSES), values


def test_loss_types_are_exactly_those_detectron2_computes():
    """Each allowed type runs in detectron2's box loss, and a type outside the list is one it
    refuses: the list matches detectron2's."""
    anchors = [Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 25.0]]))]
    deltas = [torch.randn(1, 2, 4) * 0.1]
    gt_boxes = [torch.tensor([[1.0, 1.0, 11.0, 12.0], [4.0, 6.0, 19.0, 22.0]])]
    foreground = torch.tensor([[True, True]])
    transform = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    for loss_type in BOX_REG_LOSS_TYPES:
        loss = dense_box_regression_loss()(
            anchors, transform, deltas, gt_boxes, foreground, box_reg_loss_type=loss_type
        )
        assert torch.isfinite(loss) and loss > 0, loss_type
    with pytest.raises(ValueError, match="Invalid dense box regression loss type"):
        dense_box_regression_loss()(
            anchors, transform, deltas, gt_boxes, foreground, box_reg_loss_type="l2"
        )
    cfg = plugin_cfg("retinanet_R50_FPN_1x.yaml")
    assert (cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE, cfg.MODEL.RETINANET.SMOOTH_L1_LOSS_BETA) == (
        "smooth_l1",
        0.0,  # the paper's L1 loss
    )


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "l2", "must be one of 'smooth_l1', 'giou'"),
        ("MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", "-0.1", "must be >= 0"),
    ],
)
def test_invalid_box_loss_values_are_config_errors(key, value, rule):
    with pytest.raises(ConfigError, match=f"{key} = .*{rule}"):
        load_config(get_config_file("retinanet_R50_FPN_1x.yaml"), [key, value])
