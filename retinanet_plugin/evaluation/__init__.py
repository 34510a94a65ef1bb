"""COCO evaluation with a choice of COCOeval implementation."""

from .coco_evaluation import RetinaNetCOCOEvaluator, build_coco_evaluator

__all__ = ["RetinaNetCOCOEvaluator", "build_coco_evaluator"]
