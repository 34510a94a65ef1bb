"""Mixed precision: bfloat16 inference option, autocast training with float32 loss math, and
detectron2's AMP trainer on GPU (runs only where CUDA is present)."""

import copy

import pytest
import torch
from detectron2_pairs import make_batch

from conftest import plugin_cfg
from detectron2.engine import AMPTrainer
from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou
from detectron2.utils.events import EventStorage

TINY = "retinanet_R18_GN_tiny.yaml"


def _model(*opts):
    torch.manual_seed(0)
    model = build_model(plugin_cfg(TINY, "MODEL.RETINANET.NUM_CLASSES", "3", *opts))
    with torch.no_grad():
        # Random weights with the prior bias score below 0.05: give them detections to compare.
        model.head.cls_score.bias.fill_(-1.0)
    return model


def _capture_postprocessing(model):
    """Records the head outputs reaching ``forward_inference`` and what it returned."""
    captured = {}
    original = model.forward_inference

    def capture(images, features, predictions):
        captured["inputs"] = (images, features, predictions)
        results = original(images, features, predictions)
        captured["results"] = copy.deepcopy(results)  # detector_postprocess clips in place
        return results

    model.forward_inference = capture
    return captured, original


def test_bfloat16_inference_close_to_float32_and_postprocessed_in_float32():
    model32 = _model().eval()
    model16 = _model("MODEL.INFERENCE_DTYPE", "bfloat16").eval()
    model16.load_state_dict(model32.state_dict())
    batch = [{"image": x["image"]} for x in make_batch(3)]
    captured32, _ = _capture_postprocessing(model32)
    captured16, postprocess = _capture_postprocessing(model16)
    with torch.no_grad():
        model32(batch)
        model16(batch)
        images, features, (logits, deltas) = captured16["inputs"]
        # Backbone and head ran in bfloat16 ...
        assert logits[0].dtype == deltas[0].dtype == torch.bfloat16
        # ... and post-processing them equals float32 post-processing of the same values.
        reference = postprocess(
            images, features, ([x.float() for x in logits], [x.float() for x in deltas])
        )
    for a, b in zip(captured16["results"], reference):
        assert a.scores.dtype == a.pred_boxes.tensor.dtype == torch.float32
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    # Head outputs agree with float32 to bfloat16 precision (8 bits of mantissa, through ~30
    # layers): within 5% of the logits' range.
    for x16, x32 in zip(logits, captured32["inputs"][2][0]):
        assert (x16.float() - x32).abs().max() <= 0.05 * x32.abs().max()
    # Detections: at least 80% of the float32 top 20 have a bfloat16 twin (same class, IoU > 0.8).
    for a, b in zip(captured32["results"], captured16["results"]):
        a = a[:20]
        assert len(a) == 20
        iou = pairwise_iou(a.pred_boxes, b.pred_boxes)
        same_class = a.pred_classes[:, None] == b.pred_classes[None, :]
        matched = ((iou > 0.8) & same_class).any(dim=1).float().mean()
        assert matched >= 0.8, matched


def test_bad_inference_dtype_is_named():
    with pytest.raises(ValueError, match="MODEL.INFERENCE_DTYPE.*'float16'"):
        _model("MODEL.INFERENCE_DTYPE", "float16")


def _losses_under(model, batch, autocast_device=None, dtype=None):
    seen = {}
    original = model.classification_loss

    def record(logits, labels):
        seen["logits_dtype"] = logits.dtype
        return original(logits, labels)

    model.classification_loss = record
    with EventStorage(), torch.autocast(
        autocast_device or "cpu", dtype=dtype, enabled=autocast_device is not None
    ):
        losses = model(batch)
    return losses, seen["logits_dtype"]


def test_cpu_bfloat16_autocast_training_keeps_loss_math_in_float32():
    model = _model().train()
    batch = make_batch(3)
    reference, ref_dtype = _losses_under(copy.deepcopy(model), batch)
    losses, logits_dtype = _losses_under(model, batch, "cpu", torch.bfloat16)
    assert ref_dtype == torch.float32 and logits_dtype == torch.bfloat16
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, reference[name], rtol=0.05, atol=1e-3)
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.cuda
def test_detectron2_amp_trainer_on_gpu():
    """SOLVER.AMP.ENABLED's trainer: float16 autocast, float32 losses, weights updated."""
    model = _model("MODEL.DEVICE", "cuda").train()
    batch = make_batch(3)
    reference, _ = _losses_under(copy.deepcopy(model), batch)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    trainer = AMPTrainer(model, iter([batch] * 3), optimizer)
    with EventStorage() as storage:
        trainer.storage = storage
        losses, logits_dtype = _losses_under(model, batch, "cuda", torch.float16)
        for _ in range(3):
            trainer.run_step()
    assert logits_dtype == torch.float16
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, reference[name], rtol=0.05, atol=1e-3)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(p).all() for p in model.parameters())
