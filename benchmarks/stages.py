"""Per-stage inference times (pre-processing, backbone, head, post-processing) and candidate
counts, for detectron2's RetinaNet and the plugin's alike.

The stages run the model's own parts in the order ``model(inputs)`` runs them; for the plugin,
backbone and head are those its inference runner built (folded, compiled), on the layout it
feeds them. A compiled backbone and head run as one stage.
"""

import contextlib
import time
from typing import Callable, Dict, List

import torch

from benchmarks.calibration import candidate_counts
from benchmarks.measure import synchronize
from detectron2.modeling.postprocessing import detector_postprocess

__all__ = ["stage_timer"]


def stage_timer(model, inputs: List[dict], device: torch.device) -> Callable[[], Dict[str, float]]:
    """A function that runs one inference of ``inputs`` stage by stage and returns seconds per
    stage, plus the candidates per image ("above_threshold", "after_topk") and "detections"
    per image."""
    runner = getattr(model, "inference_runner", None)
    dtype = getattr(model, "inference_dtype", torch.float32)

    def stages() -> Dict[str, float]:
        out: Dict[str, float] = {}
        synchronize(device)
        start = time.perf_counter()

        def lap(name):
            nonlocal start
            synchronize(device)
            now = time.perf_counter()
            out[name] = now - start
            start = now

        autocast = (
            torch.autocast(device.type, dtype=dtype)
            if dtype != torch.float32
            else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            images = model.preprocess_image(inputs)
            x = images.tensor
            backbone, head = model.backbone, model.head
            compiled = None
            convolutions = contextlib.nullcontext()
            contiguous_head_inputs = False
            if runner is not None and runner.enabled:
                built = runner.built(backbone, head, model.head_in_features, x.device)
                x, convolutions, contiguous_head_inputs = runner.prepared(x)
                if runner.compile:
                    compiled = built
                else:
                    backbone, head = built.backbone, built.head
            lap("preprocess")
            with convolutions:
                if compiled is not None:
                    features, logits, deltas = compiled(x, contiguous_head_inputs)
                    lap("backbone + head")
                else:
                    features = backbone(x)
                    features = [features[f] for f in model.head_in_features]
                    if contiguous_head_inputs:
                        features = [f.contiguous() for f in features]
                    lap("backbone")
                    logits, deltas = head(features)
                    lap("head")
            results = model.forward_inference(images, features, (logits, deltas))
            results = [
                detector_postprocess(r, x["image"].shape[1], x["image"].shape[2])
                for r, x in zip(results, inputs)
            ]
            lap("post-processing")
        out.update(candidate_counts(model, logits))
        out["detections"] = sum(len(r) for r in results) / len(results)
        return out

    return stages
