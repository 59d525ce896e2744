"""The release's segmentation metrics (MMSegmentation 0.19: aAcc, mIoU, mAcc) beside Detectron2's, on a
confusion matrix worked out by hand with a class that is only predicted and a class absent from both."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator

from denseclip.data import read_label_map
from denseclip.evaluation import ReleaseSemSegEvaluator, release_sem_seg_metrics

IGNORE = 255
# 20 pixels, 4 classes: (ground truth, prediction) -> pixels.
#   class 0: 6 right, 2 predicted 1        class 1: 3 right, 2 predicted 0, 1 predicted 2
#   class 2: never in the ground truth, predicted once (and 5 times on ignored pixels, which do not count)
#   class 3: neither in the ground truth nor predicted
#   ignored ground truth: 5 predicted 2, 1 predicted 0
PIXELS = {(0, 0): 6, (0, 1): 2, (1, 1): 3, (1, 0): 2, (1, 2): 1, (IGNORE, 2): 5, (IGNORE, 0): 1}
# By hand, over counted pixels only: intersection [6, 3, 0, 0]; ground truth [8, 6, 0, 0]; predicted
# [6 + 2, 2 + 3, 1, 0] = [8, 5, 1, 0]; union = predicted + ground truth - intersection = [10, 8, 1, 0].
IOU_RELEASE = [60.0, 37.5, 0.0, math.nan]  # 6/10, 3/8, 0/1, 0/0
ACC_RELEASE = [75.0, 50.0, math.nan, math.nan]  # 6/8, 3/6, 0/0, 0/0
MIOU_RELEASE = (60.0 + 37.5 + 0.0) / 3  # 32.5: the only-predicted class counts 0, the absent one is skipped
MIOU_DETECTRON2 = (60.0 + 37.5) / 2  # 48.75: classes in the ground truth only
MACC = (75.0 + 50.0) / 2  # 62.5, both conventions
AACC = 100 * 9 / 14  # 64.29: right pixels / counted pixels, both conventions (Detectron2's pACC)


def label_maps():
    """(ground truth, prediction) as 4 x 5 maps holding PIXELS."""
    pairs = [pair for pair, count in PIXELS.items() for _ in range(count)]
    gt, pred = (np.array(column, np.uint8).reshape(4, 5) for column in zip(*pairs))
    return gt, pred


def conf_matrix():
    """Detectron2's SemSegEvaluator layout: [prediction, ground truth], ignored ground truth in the last column."""
    matrix = np.zeros((5, 5), np.int64)
    for (gt, pred), count in PIXELS.items():
        matrix[pred, 4 if gt == IGNORE else gt] += count
    return matrix


def test_release_metrics_by_hand():
    metrics = release_sem_seg_metrics(conf_matrix())
    assert metrics["mIoU"] == pytest.approx(32.5) == pytest.approx(MIOU_RELEASE)
    assert metrics["mAcc"] == pytest.approx(MACC) and metrics["aAcc"] == pytest.approx(AACC)
    np.testing.assert_allclose(metrics["IoU"], IOU_RELEASE)  # NaN where NaN
    np.testing.assert_allclose(metrics["Acc"], ACC_RELEASE)
    empty = release_sem_seg_metrics(np.zeros((3, 3), np.int64))
    assert all(math.isnan(empty[k]) for k in ("aAcc", "mIoU", "mAcc"))
    with pytest.raises(ValueError, match=r"\(K \+ 1\) x \(K \+ 1\) confusion matrix, got shape \(3, 4\)"):
        release_sem_seg_metrics(np.zeros((3, 4)))


@pytest.fixture
def dataset(tmp_path):
    gt, pred = label_maps()
    Image.fromarray(gt).save(tmp_path / "a.png")
    name = "release_metrics_test"
    DatasetCatalog.register(name, lambda: [{"file_name": "a.jpg", "sem_seg_file_name": str(tmp_path / "a.png")}])
    MetadataCatalog.get(name).set(stuff_classes=["w", "x", "y", "z"], ignore_label=IGNORE)
    yield name, pred
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def run(evaluator, pred):
    logits = torch.nn.functional.one_hot(torch.as_tensor(pred, dtype=torch.long), 4).permute(2, 0, 1).float()
    evaluator.reset()
    evaluator.process([{"file_name": "a.jpg"}], [{"sem_seg": logits}])
    return evaluator.evaluate()["sem_seg"]


def test_evaluator_adds_the_release_s_keys_to_detectron2_s(dataset, tmp_path):
    name, pred = dataset
    ours = run(ReleaseSemSegEvaluator(name, output_dir=str(tmp_path / "out")), pred)
    theirs = run(SemSegEvaluator(name, sem_seg_loading_fn=read_label_map), pred)
    assert set(ours) - set(theirs) == {"aAcc_release", "mIoU_release", "mAcc_release"}
    for key, value in theirs.items():  # Detectron2's results unchanged
        assert ours[key] == pytest.approx(value, nan_ok=True), key
    assert ours["mIoU"] == pytest.approx(MIOU_DETECTRON2) and ours["mIoU_release"] == pytest.approx(MIOU_RELEASE)
    assert ours["mACC"] == pytest.approx(MACC) and ours["mAcc_release"] == pytest.approx(MACC)
    assert ours["pACC"] == pytest.approx(AACC) and ours["aAcc_release"] == pytest.approx(AACC)
    assert math.isnan(ours["IoU-y"]) and math.isnan(ours["IoU-z"])  # Detectron2: no ground truth, no IoU
    # NumPy floats in it, as Detectron2 saves them: not a weights-only file
    saved = torch.load(tmp_path / "out" / "sem_seg_evaluation.pth", weights_only=False)
    assert saved["mIoU_release"] == pytest.approx(MIOU_RELEASE)
