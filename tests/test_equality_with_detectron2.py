"""The plugin's RetinaNet equals detectron2's built-in RetinaNet: weights, losses, detections."""

import copy

import pytest
import torch
from detectron2_pairs import PAIRS, assert_detections_match, build_pair, make_batch

from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_state_dict_keys_and_shapes_equal(name):
    """Same parameter/buffer names and shapes: checkpoints are interchangeable."""
    plugin, reference = build_pair(name)
    ours, theirs = plugin.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_checkpoint_loads_both_ways():
    """A detectron2 RetinaNet state_dict loads strictly into the plugin's model and back."""
    plugin, reference = build_pair("R50_FPN_1x")
    with torch.no_grad():
        for p in plugin.parameters():
            p.add_(0.5)
    result = reference.load_state_dict(plugin.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (k, a), b in zip(plugin.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_training_losses_and_gradients_equal(name, box_loss):
    """Losses over two iterations (EMA normalizer included) agree to 1e-5, gradients too."""
    plugin, reference = build_pair(name, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", box_loss)
    num_classes = plugin.num_classes
    plugin.train()
    reference.train()
    with EventStorage():
        for step in range(2):
            batch = make_batch(num_classes, with_empty_image=step == 1)
            ours = plugin(copy.deepcopy(batch))
            theirs = reference(copy.deepcopy(batch))
            assert set(ours) == set(theirs) == {"loss_cls", "loss_box_reg"}
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=0)
            plugin.zero_grad()
            reference.zero_grad()
            sum(ours.values()).backward()
            sum(theirs.values()).backward()
            for (k, a), b in zip(plugin.named_parameters(), reference.parameters()):
                if a.grad is None:
                    assert b.grad is None, k
                    continue
                # Summation order differs (fused vs plain loss): compare relative to the scale.
                scale = b.grad.abs().max().item()
                assert (a.grad - b.grad).abs().max().item() <= 1e-4 * scale + 1e-12, k


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("grad_enabled", [False, True], ids=["no_grad", "grad"])
def test_inference_equal(name, grad_enabled):
    """Same boxes, scores and classes after thresholding, top-k, NMS and rescaling, also for an
    eval-mode model called without ``torch.no_grad()`` (as detectron2's ``test_empty_data``
    does: detectron2 rescales the boxes in place)."""
    plugin, reference = build_pair(name)
    with torch.no_grad():
        # Zero classification bias: with the prior bias, random weights score below 0.05.
        for model in (plugin, reference):
            model.head.cls_score.bias.zero_()
    plugin.eval()
    reference.eval()
    batch = make_batch(plugin.num_classes)
    for item, (h, w) in zip(batch, [(300, 400), (448, 320)]):
        item["height"], item["width"] = h, w  # exercise the output rescaling
    with torch.set_grad_enabled(grad_enabled):
        ours = plugin(batch)
        theirs = reference(batch)
    # The inference speed-ups (on by default) change the rounding: the tolerances of
    # tests/test_inference_optimization.py.
    assert_detections_match(ours, theirs, score_atol=1e-4, box_atol=5e-3)


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_infinite_or_nan_head_outputs_give_what_detectron2_gives(value):
    """Head outputs that are all inf or all NaN (detectron2's ``test_inf_nan_data``): the same
    number of detections as detectron2's RetinaNet, none with a finite box coordinate."""
    plugin, reference = build_pair("R18_GN_tiny")
    counts = []
    for model in (plugin, reference):
        model.eval()
        model.test_score_thresh = 0.0
        images = ImageList(torch.full((1, 3, 256, 256), value), [(250, 250)])
        features = [torch.full((1, 128, 32 >> i, 32 >> i), value) for i in range(5)]
        logits, deltas = model.head(features)
        logits = [torch.full_like(x, value) for x in logits]
        deltas = [torch.full_like(x, value) for x in deltas]
        with torch.no_grad():
            (detections,) = model.forward_inference(images, features, [logits, deltas])
        assert torch.isfinite(detections.pred_boxes.tensor).sum() == 0
        counts.append(len(detections))
    assert counts[0] == counts[1]
