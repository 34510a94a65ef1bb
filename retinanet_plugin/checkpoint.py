"""Checkpoint loading for fine-tuning on other classes."""
import logging

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["RetinaNetCheckpointer"]

logger = logging.getLogger(__name__)

CLASSIFICATION_LAYER = "head.cls_score."


class RetinaNetCheckpointer(DetectionCheckpointer):
    """detectron2's DetectionCheckpointer, plus what fine-tuning to another class count needs.

    Every tensor whose shape matches is loaded. detectron2 skips (and logs) tensors whose shape
    differs; when the skipped ones are the classification output layer (a checkpoint trained
    with another number of classes), that layer is re-initialised with the paper's prior
    probability bias and one summary line says so. Skipped tensors outside that layer get a
    warning naming them, since they mean the architectures differ.

    Args:
        allow_new_classes: False for inference, where a re-initialised classification layer
            would give random classes: a class-count mismatch is then an error.
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
    """

    def __init__(self, model, save_dir="", *, allow_new_classes=True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.allow_new_classes = allow_new_classes

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        skipped = incompatible.incorrect_shapes
        classification = [s for s in skipped if s[0].startswith(CLASSIFICATION_LAYER)]
        others = [s for s in skipped if not s[0].startswith(CLASSIFICATION_LAYER)]
        head = getattr(self.model, "head", None)
        if classification and not self.allow_new_classes:
            key, in_checkpoint, in_model = classification[0]
            raise ValueError(
                f"The checkpoint's {key} has shape {tuple(in_checkpoint)}, the model's "
                f"{tuple(in_model)}: they were made for different numbers of classes. Set "
                "MODEL.RETINANET.NUM_CLASSES (or name the training dataset) to match the checkpoint"
            )
        if classification and hasattr(head, "reset_classification_layer"):
            head.reset_classification_layer()
            weight = next(s for s in classification if s[0].endswith("weight"))
            logger.info(
                "Fine-tuning: skipped %s (checkpoint %s, model %s: a different number of "
                "classes); re-initialised the classification layer with prior probability %g",
                ", ".join(s[0] for s in classification),
                tuple(weight[1]),
                tuple(weight[2]),
                head.prior_prob,
            )
        if others:
            logger.warning(
                "Checkpoint tensors not loaded because their shapes differ from the model's "
                "(the architecture differs from the checkpoint's): %s",
                "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in others),
            )
        return incompatible
