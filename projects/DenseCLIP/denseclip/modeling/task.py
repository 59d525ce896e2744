"""
What a meta-architecture does, answered in one place for the trainer, exporter, analysis, converter and
tools: its task, the config key and dataset metadata of its classes, its CLIP baseline, its class count.
Every model of this project is one of Detectron2's RetinaNet, GeneralizedRCNN or SemanticSegmentor.
"""
from dataclasses import dataclass
from typing import Union

from torch import nn

from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet, SemanticSegmentor

__all__ = ["Task", "head_num_classes", "task_of"]


@dataclass(frozen=True)
class Task:
    name: str  # "retinanet", "rcnn" or "semantic_segmentation"
    num_classes_key: str  # the config key of the head's class count
    metadata_classes: str  # the dataset metadata field of the class names
    baseline: str  # the meta-architecture of the CLIP baseline (no language guidance)
    score_threshold_key: str = ""  # the config key of the detections' score threshold

    @property
    def semantic_segmentation(self) -> bool:
        return self.name == "semantic_segmentation"

    @property
    def detection(self) -> bool:
        return not self.semantic_segmentation


RETINANET = Task("retinanet", "MODEL.RETINANET.NUM_CLASSES", "thing_classes", "RetinaNet",
                 "MODEL.RETINANET.SCORE_THRESH_TEST")
RCNN = Task("rcnn", "MODEL.ROI_HEADS.NUM_CLASSES", "thing_classes", "GeneralizedRCNN",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST")
SEMANTIC_SEGMENTATION = Task("semantic_segmentation", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "stuff_classes",
                             "SlidingWindowSemanticSegmentor")
_TASKS = ((RetinaNet, RETINANET), (GeneralizedRCNN, RCNN), (SemanticSegmentor, SEMANTIC_SEGMENTATION))


def task_of(model: Union[CfgNode, str, type, nn.Module]) -> Task:
    """The task of a meta-architecture: a config (its MODEL.META_ARCHITECTURE), a registered name, a
    class or a built model."""
    if isinstance(model, CfgNode):
        model = model.MODEL.META_ARCHITECTURE
    if isinstance(model, str):
        model = META_ARCH_REGISTRY.get(model)
    cls = model if isinstance(model, type) else type(model)
    for base, task in _TASKS:
        if issubclass(cls, base):
            return task
    raise TypeError(f"{cls.__name__} is neither a RetinaNet, a GeneralizedRCNN nor a SemanticSegmentor")


def head_num_classes(model: nn.Module) -> int:
    """The class count of a built model's head."""
    task = task_of(model)
    if task is RETINANET:
        return model.num_classes
    if task is RCNN:
        return model.roi_heads.num_classes
    head = model.sem_seg_head  # Detectron2's SemSegFPNHead keeps the count only in its classifier
    return getattr(head, "num_classes", None) or head.predictor.out_channels
