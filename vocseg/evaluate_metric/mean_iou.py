"""Mean IoU with the arguments and results of the Hub's `mean_iou`, computed by vocseg.metrics.

Load it with `evaluate.load(vocseg.evaluate_metric.MEAN_IOU_PATH)` (works with HF_HUB_OFFLINE=1). The numbers
are the Hub metric's: one confusion matrix over the whole dataset, classes that never occur (in labels or
predictions) left out of the means. One deliberate difference: a prediction outside [0, num_labels) on a
scored pixel, or a label that is neither a class nor `ignore_index`, raises an error naming the values,
where the Hub metric's np.histogram calls silently drop them and return skewed scores.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from vocseg.metrics import ConfusionMatrix

_DESCRIPTION = """Mean Intersection-over-Union of semantic segmentation maps over a dataset (vocseg.metrics),
a drop-in for the Hub's `mean_iou`."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray | PIL.Image]`): predicted class-id maps (height, width); sizes may differ per map.
    references (`List[ndarray | PIL.Image]`): ground-truth class-id maps, each the size of its prediction.
    num_labels (`int`): number of classes.
    ignore_index (`int`): label value that is not scored (VOC: 255).
    nan_to_num (`int`, *optional*): replace NaN results (classes absent from labels and predictions) by this.
    label_map (`dict`, *optional*): old label id -> new label id, applied to the references (all lookups use
        the original labels).
    reduce_labels (`bool`, *optional*, defaults to `False`): as the Hub's: label 0 becomes 255 and every other
        label drops by 1 (255 stays 255); for datasets whose 0 is "other" (e.g. ADE20k).

Returns:
    mean_iou (`float`), mean_accuracy (`float`), overall_accuracy (`float`),
    per_category_iou (`ndarray` of shape (num_labels,)), per_category_accuracy (`ndarray` of shape (num_labels,)).

Examples:
    >>> import evaluate, numpy as np, vocseg.evaluate_metric
    >>> metric = evaluate.load(vocseg.evaluate_metric.MEAN_IOU_PATH)
    >>> results = metric.compute(predictions=[np.array([[1, 2], [3, 4], [5, 255]])],
    ...                          references=[np.array([[0, 3], [5, 4], [6, 255]])], num_labels=10, ignore_index=255)
"""


def _reference_map(reference, label_map, reduce_labels: bool) -> np.ndarray:
    label = np.array(reference, dtype=np.int64)
    if label_map:
        original = label.copy()
        for old_id, new_id in label_map.items():
            label[original == int(old_id)] = new_id
    if reduce_labels:  # the Hub's arithmetic, on uint8-style labels: 0 -> 255 -> 254 -> 255
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    return label


class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            # As the Hub's metric: image features take numpy arrays and PIL images (e.g. a dataset's masks).
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/mean_iou"],
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index: int, nan_to_num=None,
                 label_map=None, reduce_labels: bool = False):
        matrix = ConfusionMatrix(num_classes=num_labels, ignore_index=ignore_index)
        for prediction, reference in zip(predictions, references):
            matrix.update(np.array(prediction, dtype=np.int64), _reference_map(reference, label_map, reduce_labels))
        results = matrix.compute()
        if nan_to_num is not None:
            results = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in results.items()}
        return results
