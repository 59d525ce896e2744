"""
Detectron2's semantic-segmentation metrics and, beside them, the ones the release prints
(MMSegmentation 0.19, ``mmseg/core/evaluation/metrics.py`` and ``CustomDataset.evaluate``).

Both count, over the dataset, per class c: the intersection (pixels predicted c whose ground truth is
c), the ground-truth area and the predicted area, leaving out pixels whose ground truth is ignored. They
differ in which classes their means take:

* Detectron2 (``SemSegEvaluator``): mIoU and mACC over the classes present in the ground truth.
* MMSegmentation 0.19: IoU = intersection / union and Acc = intersection / ground-truth area per class,
  NaN where the denominator is 0, averaged with ``nanmean``. So mIoU counts every class with a
  non-empty union: a class that is only predicted (never in the ground truth) counts 0, a class absent
  from both is skipped. Its mAcc skips classes without ground truth, like Detectron2's mACC; its aAcc
  (all correct pixels / all counted pixels) is Detectron2's pACC.

The release logs them x 100 rounded to 2 decimals; here they are x 100, unrounded.
"""
import logging
import os
from typing import Dict

import numpy as np
import torch

from detectron2.evaluation import SemSegEvaluator
from detectron2.utils.file_io import PathManager

from ..data.dataset_mapper import read_label_map

__all__ = ["ReleaseSemSegEvaluator", "release_sem_seg_metrics", "RELEASE_KEYS"]

logger = logging.getLogger(__name__)

# The keys added to Detectron2's "sem_seg" results: MMSegmentation 0.19's summary, renamed.
RELEASE_KEYS = {"aAcc": "aAcc_release", "mIoU": "mIoU_release", "mAcc": "mAcc_release"}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator where the denominator is positive, NaN elsewhere (as 0 / 0 in torch)."""
    out = np.full(numerator.shape, np.nan)
    valid = denominator > 0
    out[valid] = numerator[valid] / denominator[valid]
    return out


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def release_sem_seg_metrics(conf_matrix: np.ndarray) -> Dict[str, object]:
    """
    MMSegmentation 0.19's metrics (x 100) from Detectron2's ``SemSegEvaluator`` confusion matrix: (K + 1) x
    (K + 1) pixel counts indexed [prediction, ground truth], the last column the ignored ground truth
    (left out, as MMSegmentation masks it). Returns {"aAcc", "mIoU", "mAcc": float, "IoU", "Acc": K
    per-class values, NaN where undefined}.
    """
    conf_matrix = np.asarray(conf_matrix)
    if conf_matrix.ndim != 2 or conf_matrix.shape[0] != conf_matrix.shape[1] or conf_matrix.shape[0] < 2:
        raise ValueError(
            f"Expected SemSegEvaluator's (K + 1) x (K + 1) confusion matrix, got shape {conf_matrix.shape}"
        )
    counted = conf_matrix[:-1, :-1].astype(np.float64)
    intersection = counted.diagonal()
    predicted, ground_truth = counted.sum(axis=1), counted.sum(axis=0)
    union = predicted + ground_truth - intersection
    iou, acc = _ratio(intersection, union), _ratio(intersection, ground_truth)
    total = ground_truth.sum()
    return {
        "aAcc": float(100 * intersection.sum() / total) if total > 0 else float("nan"),
        "mIoU": 100 * _nanmean(iou),
        "mAcc": 100 * _nanmean(acc),
        "IoU": 100 * iou,
        "Acc": 100 * acc,
    }


class ReleaseSemSegEvaluator(SemSegEvaluator):
    """
    Detectron2's ``SemSegEvaluator`` (its results unchanged: mIoU, fwIoU, mACC, pACC, per-class IoU and
    ACC) plus MMSegmentation 0.19's summary, as the release prints it, under ``aAcc_release``,
    ``mIoU_release`` and ``mAcc_release`` (see :func:`release_sem_seg_metrics`). Label maps are read with
    :func:`~denseclip.data.read_label_map` unless ``sem_seg_loading_fn`` says otherwise.
    """

    def __init__(self, dataset_name, distributed=True, output_dir=None, *, sem_seg_loading_fn=read_label_map, **kwargs):
        super().__init__(dataset_name, distributed, output_dir, sem_seg_loading_fn=sem_seg_loading_fn, **kwargs)

    def evaluate(self):
        results = super().evaluate()  # gathers the confusion matrices into self._conf_matrix on the main process
        if results is None:  # not the main process
            return results
        release = release_sem_seg_metrics(self._conf_matrix)
        res = results["sem_seg"]
        for name, key in RELEASE_KEYS.items():
            res[key] = release[name]
        nonempty = int(np.sum(~np.isnan(release["IoU"])))
        in_ground_truth = int(np.sum(~np.isnan(release["Acc"])))
        logger.info(
            f"{self._dataset_name}, the release's metrics (MMSegmentation 0.19): aAcc {release['aAcc']:.2f}, mIoU "
            f"{release['mIoU']:.2f} over the {nonempty} classes predicted or in the ground truth, mAcc "
            f"{release['mAcc']:.2f}; Detectron2's mIoU {res['mIoU']:.2f} is over the {in_ground_truth} in the "
            f"ground truth"
        )
        if self._output_dir:  # SemSegEvaluator saved its results without the release's: save them again
            with PathManager.open(os.path.join(self._output_dir, "sem_seg_evaluation.pth"), "wb") as f:
                torch.save(res, f)
        return results
