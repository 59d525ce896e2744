"""modeling/task.py: the one place that says what a meta-architecture does (task, class key, metadata,
CLIP baseline, class count), and the trainer's choices that follow from it."""
import pytest

from detectron2.modeling import build_model

from denseclip.data import DenseCLIPDatasetMapper, SemSegDatasetMapper
from denseclip.engine import DenseCLIPTrainer
from denseclip.evaluation import ReleaseSemSegEvaluator
from denseclip.modeling import DenseCLIPRCNN, head_num_classes, task_of

from helpers import tiny_detector_cfg, tiny_sem_seg_cfg

# meta-architecture -> (task, class-count key, metadata field, CLIP baseline)
EXPECTED = {
    "DenseCLIPRetinaNet": ("retinanet", "MODEL.RETINANET.NUM_CLASSES", "thing_classes", "RetinaNet"),
    "RetinaNet": ("retinanet", "MODEL.RETINANET.NUM_CLASSES", "thing_classes", "RetinaNet"),
    "DenseCLIPRCNN": ("rcnn", "MODEL.ROI_HEADS.NUM_CLASSES", "thing_classes", "GeneralizedRCNN"),
    "GeneralizedRCNN": ("rcnn", "MODEL.ROI_HEADS.NUM_CLASSES", "thing_classes", "GeneralizedRCNN"),
    "DenseCLIPSemanticSegmentor": ("semantic_segmentation", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "stuff_classes",
                                   "SlidingWindowSemanticSegmentor"),
    "SlidingWindowSemanticSegmentor": ("semantic_segmentation", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "stuff_classes",
                                       "SlidingWindowSemanticSegmentor"),
    "SemanticSegmentor": ("semantic_segmentation", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "stuff_classes",
                          "SlidingWindowSemanticSegmentor"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_task_of_each_meta_architecture(name):
    task = task_of(name)
    assert (task.name, task.num_classes_key, task.metadata_classes, task.baseline) == EXPECTED[name]
    assert task.semantic_segmentation == (task.name == "semantic_segmentation") != task.detection


def test_task_of_a_config_a_class_and_a_model():
    cfg = tiny_detector_cfg("mask_rcnn")
    model = build_model(cfg)
    assert task_of(cfg) is task_of(DenseCLIPRCNN) is task_of(model) is task_of("GeneralizedRCNN")
    with pytest.raises(TypeError, match="neither a RetinaNet, a GeneralizedRCNN nor a SemanticSegmentor"):
        task_of(int)


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn", "semantic"])
def test_class_count_of_a_built_head(kind):
    cfg = tiny_sem_seg_cfg(class_names=("a", "b", "c", "d")) if kind == "semantic" else tiny_detector_cfg(
        kind, class_names=("a", "b", "c", "d"))
    assert head_num_classes(build_model(cfg)) == 4


def test_trainer_chooses_mapper_and_evaluator_by_task():
    detector, segmentor = tiny_detector_cfg("mask_rcnn"), tiny_sem_seg_cfg()
    segmentor.DATASETS.TEST = ("shapes_sem_seg_val",)
    assert type(DenseCLIPTrainer.build_mapper(detector, is_train=False)) is DenseCLIPDatasetMapper
    assert type(DenseCLIPTrainer.build_mapper(segmentor, is_train=False)) is SemSegDatasetMapper
    evaluator = DenseCLIPTrainer.build_evaluator(segmentor, "shapes_sem_seg_val", output_folder="")
    assert isinstance(evaluator, ReleaseSemSegEvaluator)
