"""Tests for vocseg.metrics: hand-computed cases, HF evaluate's documented example, cross-checks."""

import warnings

import numpy as np
import pytest
import torch

from vocseg.metrics import ConfusionMatrix, batch_confusion_matrices, scores_from_matrix

NAN = float("nan")


def _random_maps(seed, shape, num_classes=21, ignore_frac=0.05, noise=0.4):
    """Labels with some 255s, and predictions that agree with them except for `noise` of pixels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, shape, generator=g)
    noise_labels = torch.randint(0, num_classes, shape, generator=g)
    preds = torch.where(torch.rand(shape, generator=g) < noise, noise_labels, labels)
    labels[torch.rand(shape, generator=g) < ignore_frac] = 255
    return preds, labels


def _evaluate_mean_iou(predictions, references, num_labels, ignore_index):
    """HuggingFace evaluate's metrics/mean_iou algorithm (reduce_labels=False), re-implemented:
    per-image np.histogram of intersection / prediction / label areas, summed over images."""
    total_inter = np.zeros(num_labels)
    total_union = np.zeros(num_labels)
    total_label = np.zeros(num_labels)
    for pred, label in zip(predictions, references):
        pred, label = np.array(pred), np.array(label)
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        inter = pred[pred == label]
        area_inter = np.histogram(inter, bins=num_labels, range=(0, num_labels - 1))[0]
        area_pred = np.histogram(pred, bins=num_labels, range=(0, num_labels - 1))[0]
        area_label = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        total_inter += area_inter
        total_union += area_pred + area_label - area_inter
        total_label += area_label
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = total_inter / total_union
        acc = total_inter / total_label
    return {
        "mean_iou": np.nanmean(iou),
        "mean_accuracy": np.nanmean(acc),
        "overall_accuracy": total_inter.sum() / total_label.sum(),
        "per_category_iou": iou,
        "per_category_accuracy": acc,
    }


def test_hand_built_maps():
    labels = torch.tensor([[0, 0, 1], [1, 2, 255]])
    preds = torch.tensor([[0, 1, 1], [2, 2, 0]])
    cm = ConfusionMatrix(num_classes=3)
    cm.update(preds, labels)
    # (gt, pred) pairs: (0,0) (0,1) (1,1) (1,2) (2,2); the (255, 0) pixel is ignored.
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    scores = cm.compute()
    # TP = [1, 1, 1], label area = [2, 2, 1], predicted area = [1, 2, 2]
    # union = label + pred - TP = [2, 3, 2]  ->  IoU = [1/2, 1/3, 1/2], mean = (4/3)/3 = 4/9
    np.testing.assert_allclose(scores["per_category_iou"], [0.5, 1 / 3, 0.5])
    assert scores["mean_iou"] == pytest.approx(4 / 9)
    # accuracy = TP / label area = [1/2, 1/2, 1], mean = 2/3; overall = 3 correct / 5 counted
    np.testing.assert_allclose(scores["per_category_accuracy"], [0.5, 0.5, 1.0])
    assert scores["mean_accuracy"] == pytest.approx(2 / 3)
    assert scores["overall_accuracy"] == pytest.approx(3 / 5)
    assert isinstance(scores["mean_iou"], float) and scores["per_category_iou"].dtype == np.float64


# The example in the docstring (and README) of huggingface/evaluate metrics/mean_iou/mean_iou.py.
EVALUATE_PREDICTED = [
    np.array([[1, 2], [3, 4], [5, 255]]),
    np.array([[2, 7], [9, 2], [3, 6]]),
    np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]]),
]
EVALUATE_ACTUAL = [
    np.array([[0, 3], [5, 4], [6, 255]]),
    np.array([[1, 7], [9, 2], [3, 6]]),
    np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]]),
]


def test_evaluate_documented_example():
    cm = ConfusionMatrix(num_classes=10, ignore_index=255)
    for pred, actual in zip(EVALUATE_PREDICTED, EVALUATE_ACTUAL):  # differently sized maps
        cm.update(pred, actual)
    scores = cm.compute()
    # Documented: mean_iou.compute(..., num_labels=10, ignore_index=255, reduce_labels=False)
    assert scores["mean_iou"] == pytest.approx(0.47750000000000004, abs=1e-15)
    assert scores["mean_accuracy"] == pytest.approx(0.5916666666666666, abs=1e-15)
    assert scores["overall_accuracy"] == pytest.approx(0.5263157894736842, abs=1e-15)  # 10/19
    np.testing.assert_allclose(scores["per_category_iou"], [0.0, 0.0, 0.375, 0.4, 0.5, 0.0, 0.5, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(
        scores["per_category_accuracy"],
        [0.0, 0.0, 0.75, 0.66666667, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0],
        atol=1e-8,  # documented to 8 digits
    )
    # and our re-implementation of evaluate's algorithm reproduces its own documented example
    theirs = _evaluate_mean_iou(EVALUATE_PREDICTED, EVALUATE_ACTUAL, 10, 255)
    assert theirs["mean_iou"] == pytest.approx(0.47750000000000004, abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_evaluate_algorithm_on_random_maps(seed):
    preds, labels = _random_maps(seed, (6, 37, 53))
    cm = ConfusionMatrix()
    cm.update(preds, labels)
    ours = cm.compute()
    theirs = _evaluate_mean_iou(list(preds.numpy()), list(labels.numpy()), 21, 255)
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12)
    np.testing.assert_allclose(ours["per_category_iou"], theirs["per_category_iou"], atol=1e-12)
    np.testing.assert_allclose(ours["per_category_accuracy"], theirs["per_category_accuracy"], atol=1e-12)


def test_ignored_pixels_never_counted():
    preds, labels = _random_maps(3, (4, 20, 30), ignore_frac=0.3)
    ignored = labels == 255
    assert ignored.any()
    a, b = ConfusionMatrix(), ConfusionMatrix()
    a.update(preds, labels)
    changed = preds.clone()
    changed[ignored] = (changed[ignored] + 7) % 21
    b.update(changed, labels)
    assert torch.equal(a.matrix, b.matrix)
    assert int(a.matrix.sum()) == int((~ignored).sum())
    # predictions under ignored labels are not even range-checked (evaluate's example has 255 there)
    changed[ignored] = 255
    c = ConfusionMatrix()
    c.update(changed, labels)
    assert torch.equal(a.matrix, c.matrix)


def test_absent_class_is_nan_and_prediction_only_class_counts_as_zero():
    labels = torch.tensor([[0, 0], [1, 1]])
    preds = torch.tensor([[0, 3], [1, 1]])
    cm = ConfusionMatrix(num_classes=4)
    cm.update(preds, labels)
    scores = cm.compute()
    # TP = [1, 2, 0, 0], label area = [2, 2, 0, 0], predicted area = [1, 2, 0, 1]
    # IoU: 1/(2+1-1) = .5, 2/(2+2-2) = 1, class 2 union 0 -> NaN, class 3: 0/(0+1-0) = 0
    np.testing.assert_array_equal(scores["per_category_iou"], [0.5, 1.0, NAN, 0.0])
    assert scores["mean_iou"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # NaN excluded, the 0 included
    # accuracy is undefined for both classes without label pixels
    np.testing.assert_array_equal(scores["per_category_accuracy"], [0.5, 1.0, NAN, NAN])
    assert scores["mean_accuracy"] == pytest.approx(0.75)
    assert scores["overall_accuracy"] == pytest.approx(3 / 4)


def test_empty_matrix_scores_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = ConfusionMatrix().compute()
        all_ignored = ConfusionMatrix()
        all_ignored.update(torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), 255))
        assert int(all_ignored.matrix.sum()) == 0
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert np.isnan(scores[key])
    assert scores["per_category_iou"].shape == (21,) and np.isnan(scores["per_category_iou"]).all()


def test_batch_matrices_sum_to_streaming_matrix():
    preds, labels = _random_maps(4, (5, 17, 19))
    per_sample = batch_confusion_matrices(preds, labels)
    assert per_sample.shape == (5, 21, 21) and per_sample.dtype == torch.int64
    streaming = ConfusionMatrix()
    streaming.update(preds, labels)
    assert torch.equal(per_sample.sum(0), streaming.matrix)
    # each row is exactly that sample's matrix, so dropping padded duplicates drops exactly them
    for i in range(5):
        single = ConfusionMatrix()
        single.update(preds[i], labels[i])
        assert torch.equal(per_sample[i], single.matrix)
    with pytest.raises(ValueError, match="B, H, W"):
        batch_confusion_matrices(preds[0], labels[0])


def test_streaming_over_batches_equals_one_shot_and_merge():
    preds, labels = _random_maps(5, (6, 11, 13))
    one_shot, streamed = ConfusionMatrix(), ConfusionMatrix()
    one_shot.update(preds, labels)
    for i in range(0, 6, 2):
        streamed.update(preds[i : i + 2], labels[i : i + 2])
    assert torch.equal(one_shot.matrix, streamed.matrix)
    # merging halves (as a distributed reduce would) gives the same matrix
    first, second = ConfusionMatrix(), ConfusionMatrix()
    first.update(preds[:3], labels[:3])
    second.update(preds[3:], labels[3:])
    merged = ConfusionMatrix()
    merged.update_from_matrix(first.matrix)
    merged += second
    assert torch.equal(merged.matrix, one_shot.matrix)
    merged.update_from_matrix(second.matrix.numpy())
    assert not torch.equal(merged.matrix, one_shot.matrix)
    merged.reset()
    assert int(merged.matrix.sum()) == 0
    with pytest.raises(ValueError, match="shape"):
        merged.update_from_matrix(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-negative"):
        merged.update_from_matrix(-torch.ones(21, 21, dtype=torch.long))
    with pytest.raises(ValueError):
        merged += ConfusionMatrix(num_classes=20)


def test_numpy_and_torch_inputs_agree():
    preds, labels = _random_maps(6, (3, 16, 16))
    reference = ConfusionMatrix()
    reference.update(preds, labels)
    for p_dtype, l_dtype in [(np.int64, np.uint8), (np.uint8, np.uint8), (np.int32, np.uint16)]:
        cm = ConfusionMatrix()
        cm.update(preds.numpy().astype(p_dtype), labels.numpy().astype(l_dtype))
        assert torch.equal(cm.matrix, reference.matrix), (p_dtype, l_dtype)
    cm = ConfusionMatrix()
    cm.update(preds.to(torch.uint8), labels.to(torch.uint8))
    assert torch.equal(cm.matrix, reference.matrix)
    assert torch.equal(batch_confusion_matrices(preds.numpy(), labels.numpy()).sum(0), reference.matrix)


def test_errors_on_bad_inputs():
    cm = ConfusionMatrix()
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"predictions.*\[21\]"):
        cm.update(torch.tensor([[0, 21]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"predictions.*\[-1\]"):
        cm.update(torch.tensor([[0, -1]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"labels.*\[21, 254\]"):
        cm.update(torch.tensor([[0, 1, 2, 3]]), torch.tensor([[254, 21, 255, 254]]))
    with pytest.raises(ValueError, match=r"labels.*\[-3\]"):
        batch_confusion_matrices(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[-3, 0]]]))
    with pytest.raises(TypeError):
        cm.update(torch.rand(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError):
        cm.update(np.zeros((2, 2)), np.zeros((2, 2), dtype=np.int64))
    assert int(cm.matrix.sum()) == 0  # failed updates leave no partial counts


def test_other_ignore_index_and_dtypes_do_not_wrap_around():
    labels = torch.tensor([[0, -1], [2, 1]])
    preds = torch.tensor([[0, 9], [2, 2]])
    cm = ConfusionMatrix(num_classes=3, ignore_index=-1)
    cm.update(preds, labels)
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    # -1 is not representable in uint8; a naive `labels == -1` would wrap and treat 255 as ignored
    with pytest.raises(ValueError, match=r"labels.*\[255\]"):
        cm.update(np.array([[0, 255]], dtype=np.uint8), np.array([[0, 255]], dtype=np.uint8))


def test_inputs_are_not_modified_and_deterministic_mode_is_allowed():
    preds, labels = _random_maps(10, (2, 9, 9))
    preds_before, labels_before = preds.clone(), labels.clone()
    reference = ConfusionMatrix()
    reference.update(preds, labels)
    batch_confusion_matrices(preds, labels)
    assert torch.equal(preds, preds_before) and torch.equal(labels, labels_before)
    # torch.bincount without weights is deterministic, so training with
    # torch.use_deterministic_algorithms(True) must not break evaluation.
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        cm = ConfusionMatrix()
        cm.update(preds, labels)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(cm.matrix, reference.matrix)


@pytest.mark.parametrize("seed", [7, 8])
def test_matches_torchmetrics_confusion_matrix(seed):
    from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

    preds, labels = _random_maps(seed, (4, 31, 29), ignore_frac=0.1)
    ours = ConfusionMatrix()
    ours.update(preds, labels)
    tm = MulticlassConfusionMatrix(num_classes=21, ignore_index=255)
    tm.update(preds, labels)
    assert torch.equal(ours.matrix, tm.compute().long())  # torchmetrics: rows = target too
    jaccard = MulticlassJaccardIndex(num_classes=21, ignore_index=255, average=None)
    jaccard.update(preds, labels)
    np.testing.assert_allclose(ours.compute()["per_category_iou"], jaccard.compute().double().numpy(), atol=1e-6)


def test_scores_from_matrix_accepts_numpy_and_rejects_non_square():
    m = np.array([[3, 1], [0, 0]])
    scores = scores_from_matrix(m)
    # class 0: TP 3, label area 4, predicted area 3, union 4 -> 3/4
    # class 1: TP 0, label area 0, predicted area 1, union 1 -> IoU 0, accuracy undefined
    np.testing.assert_allclose(scores["per_category_iou"], [0.75, 0.0])
    np.testing.assert_array_equal(scores["per_category_accuracy"], [0.75, NAN])
    from_tensor = scores_from_matrix(torch.from_numpy(m))
    for key, value in scores.items():
        np.testing.assert_array_equal(from_tensor[key], value)
    with pytest.raises(ValueError, match="square"):
        scores_from_matrix(np.zeros((2, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    preds, labels = _random_maps(9, (2, 64, 64))
    cpu = ConfusionMatrix()
    cpu.update(preds, labels)
    gpu = ConfusionMatrix()  # device=None: follows the inputs onto the GPU
    gpu.update(preds.cuda(), labels.cuda())
    assert gpu.matrix.is_cuda
    gpu.update_from_matrix(cpu.matrix)  # a host matrix merges into the device one
    assert torch.equal(gpu.matrix.cpu(), 2 * cpu.matrix)
    assert torch.equal(batch_confusion_matrices(preds.cuda(), labels.cuda()).sum(0).cpu(), cpu.matrix)
