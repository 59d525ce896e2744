"""How well pixel-text score maps locate each class: IoU of the thresholded score maps with the
ground-truth class masks, over a dataset."""
import itertools
import logging
from collections import OrderedDict
from typing import Dict, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode, polygons_to_bitmask
from detectron2.utils import comm

__all__ = ["ScoreMapEvaluator", "class_masks", "score_map_intersection_union"]

logger = logging.getLogger(__name__)


def class_masks(record: dict, num_classes: int) -> torch.Tensor:
    """
    K x H x W boolean masks of a Detectron2 dataset record: the union of the class's instance masks
    (polygons or RLE; the box for annotations without a segmentation).
    """
    height, width = record["height"], record["width"]
    masks = torch.zeros(num_classes, height, width, dtype=torch.bool)
    for annotation in record.get("annotations", []):
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, list) and segmentation:
            mask = polygons_to_bitmask(segmentation, height, width)
        elif isinstance(segmentation, dict):
            if isinstance(segmentation["counts"], list):
                segmentation = mask_util.frPyObjects(segmentation, height, width)
            mask = mask_util.decode(segmentation).astype(bool)
        else:
            x0, y0, x1, y1 = BoxMode.convert(annotation["bbox"], annotation["bbox_mode"], BoxMode.XYXY_ABS)
            mask = np.zeros((height, width), dtype=bool)
            mask[int(round(y0)) : int(round(y1)), int(round(x0)) : int(round(x1))] = True
        masks[annotation["category_id"]] |= torch.from_numpy(mask)
    return masks


def score_map_intersection_union(
    score_maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        score_maps: K x H x W score-map logits on the image.
        masks: K x H x W ground-truth class masks.
        threshold: on the probability sigmoid(score).
    Returns:
        per class, the pixel counts of intersection and union of {sigmoid(score) > threshold} and
        the mask (K each, int64).
    """
    predicted = score_maps.sigmoid() > threshold
    masks = masks.to(predicted.device)
    intersection = (predicted & masks).flatten(1).sum(1)
    union = (predicted | masks).flatten(1).sum(1)
    return intersection.cpu(), union.cpu()


class ScoreMapEvaluator(DatasetEvaluator):
    """
    Mean over classes of the IoU between each class's thresholded score map and its ground-truth
    mask, intersections and unions summed over the dataset (classes with an empty union are left
    out). Needs the model to return "score_maps" for the dataset's classes
    (MODEL.DENSECLIP.RETURN_SCORE_MAPS True).
    """

    def __init__(self, dataset_name: str, threshold: float = 0.5):
        self._dataset_name = dataset_name
        self._class_names = list(MetadataCatalog.get(dataset_name).thing_classes)
        self._records = {record["image_id"]: record for record in DatasetCatalog.get(dataset_name)}
        self._threshold = threshold
        self.reset()

    def reset(self):
        self._intersection = torch.zeros(len(self._class_names), dtype=torch.int64)
        self._union = torch.zeros(len(self._class_names), dtype=torch.int64)

    def process(self, inputs, outputs):
        for inputs_per_image, output in zip(inputs, outputs):
            if "score_maps" not in output:
                raise ValueError(
                    "ScoreMapEvaluator needs the model to return score maps: set "
                    "MODEL.DENSECLIP.RETURN_SCORE_MAPS True (DenseCLIP meta-architectures only)"
                )
            score_maps = output["score_maps"]
            if score_maps.shape[0] != len(self._class_names):
                raise ValueError(
                    f"The model returned score maps of {score_maps.shape[0]} names, but {self._dataset_name!r} "
                    f"has {len(self._class_names)} classes (evaluate without an inference vocabulary)"
                )
            masks = class_masks(self._records[inputs_per_image["image_id"]], len(self._class_names))
            intersection, union = score_map_intersection_union(score_maps, masks, self._threshold)
            self._intersection += intersection
            self._union += union

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        intersection, union = self._intersection, self._union
        if comm.get_world_size() > 1:
            gathered = comm.gather((intersection, union), dst=0)
            if not comm.is_main_process():
                return {}
            intersection = sum(i for i, _ in gathered)
            union = sum(u for _, u in gathered)
        results = OrderedDict()
        ious = []
        for name, inter, uni in zip(self._class_names, intersection.tolist(), union.tolist()):
            iou = 100.0 * inter / uni if uni > 0 else float("nan")
            results[f"IoU-{name}"] = iou
            if uni > 0:
                ious.append(iou)
        results["mIoU"] = float(np.mean(ious)) if ious else float("nan")
        results.move_to_end("mIoU", last=False)
        logger.info(
            f"Score maps on {self._dataset_name} (sigmoid > {self._threshold} vs. ground-truth class masks): "
            f"mIoU {results['mIoU']:.1f}; " + ", ".join(f"{k[4:]} {v:.1f}" for k, v in itertools.islice(results.items(), 1, None))
        )
        return {"score_maps": results}
