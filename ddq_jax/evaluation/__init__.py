"""ddq_jax.evaluation: COCO box metrics and model evaluation.

    from ddq_jax.evaluation import evaluate_model
    metrics, detections = evaluate_model(predict_fn, variables, dataset,
                                         config=config)
"""
from ddq_jax.evaluation.coco_metrics import (METRIC_NAMES, coco_box_metrics,
                                             detections_to_coco, format_table)
from ddq_jax.evaluation.evaluator import evaluate_model, evaluate_on_split

__all__ = ['METRIC_NAMES', 'coco_box_metrics', 'detections_to_coco',
           'format_table', 'evaluate_model', 'evaluate_on_split']
