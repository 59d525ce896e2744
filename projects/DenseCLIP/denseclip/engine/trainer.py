"""DenseCLIP's trainer: Detectron2's DefaultTrainer with the release's optimizer and schedule, CLIP-aware
checkpointing, the task's data and evaluation, and distributed training that also works on CPU (gloo)."""
import os
import weakref

import torch

from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import DenseCLIPCheckpointer
from ..data import DenseCLIPDatasetMapper, SemSegDatasetMapper, read_label_map
from ..evaluation import ReleaseSemSegEvaluator, ScoreMapEvaluator
from ..modeling import head_num_classes, task_of
from ..modeling.test_time_augmentation import SemanticSegmentorWithTTA
from ..solver import build_lr_scheduler, build_optimizer

__all__ = ["DenseCLIPTrainer", "check_class_count"]


def check_class_count(cfg, model: torch.nn.Module) -> None:
    """Test datasets must have as many classes as the training datasets, and every configured dataset
    as many as the head."""
    task = task_of(model)
    expected, key, field = head_num_classes(model), task.num_classes_key, task.metadata_classes
    counts = {}
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get(field, None)
        if classes is not None:
            counts[name] = len(classes)
    train = [name for name in cfg.DATASETS.TRAIN if name in counts]
    for name in cfg.DATASETS.TEST:
        if train and name in counts and counts[name] != counts[train[0]]:
            raise ValueError(
                f"DATASETS.TEST {name!r} has {counts[name]} classes but DATASETS.TRAIN {train[0]!r} has "
                f"{counts[train[0]]}: a model is evaluated on the classes it is trained on. For your own data "
                f"set both DATASETS.COCO_FORMAT.TRAIN_JSON / TRAIN_IMAGES and TEST_JSON / TEST_IMAGES (each "
                f"pair replaces only its own split), or DATASETS.TEST \"()\" to train without evaluating."
            )
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get(field, None)
        if classes is not None and len(classes) != expected:
            raise ValueError(
                f"Dataset {name!r} has {len(classes)} classes but {key} is {expected}. "
                f"Set {key} {len(classes)} (on the command line or in the config)."
            )


class DenseCLIPTrainer(DefaultTrainer):
    """DefaultTrainer, with only what DenseCLIP changes overridden."""

    def __init__(self, cfg):
        if cfg.SOLVER.AMP.ENABLED and torch.device(cfg.MODEL.DEVICE).type != "cuda":
            raise ValueError(
                "SOLVER.AMP.ENABLED needs a GPU (Detectron2's AMPTrainer scales float16 gradients on "
                "CUDA). On CPU, train in float32: SOLVER.AMP.ENABLED False."
            )
        if torch.device(cfg.MODEL.DEVICE).type == "cpu" and comm.get_world_size() > 1:
            self._init_cpu_processes(cfg)
        else:
            super().__init__(cfg)

    def _init_cpu_processes(self, cfg):
        """DefaultTrainer's construction for several CPU processes (gloo), where its DistributedDataParallel
        wrapper must not name device ids (PyTorch refuses them for a CPU model): the same objects, built
        in the same order, with that one argument left out."""
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = DistributedDataParallel(model, broadcast_buffers=False)
        self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.start_iter, self.max_iter, self.cfg = 0, cfg.SOLVER.MAX_ITER, cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        # DefaultTrainer builds a DetectionCheckpointer; this one also reads CLIP weights and saves atomically.
        self.checkpointer = DenseCLIPCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, text_weights=self.cfg.MODEL.DENSECLIP.TEXT_WEIGHTS,
            trainer=weakref.proxy(self),
        )
        return super().build_hooks()

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        check_class_count(cfg, model)
        return model

    @staticmethod
    def build_mapper(cfg, is_train: bool):
        """SemSegDatasetMapper (the release's segmentation pipeline) for semantic segmentors, else
        DenseCLIPDatasetMapper (Detectron2's detection pipeline)."""
        mapper = SemSegDatasetMapper if task_of(cfg).semantic_segmentation else DenseCLIPDatasetMapper
        return mapper(cfg, is_train=is_train)

    @classmethod
    def build_train_loader(cls, cfg):
        try:
            return build_detection_train_loader(cfg, mapper=cls.build_mapper(cfg, is_train=True))
        except AssertionError as e:  # Detectron2's "Dataset 'x' is empty!" / "No valid data found in x."
            raise ValueError(
                f"{e} DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)} has no usable images: training needs "
                f"images with at least one object annotation (images without any are skipped while "
                f"DATALOADER.FILTER_EMPTY_ANNOTATIONS is True). Check the annotation file."
            ) from e

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=cls.build_mapper(cfg, is_train=False))

    def train(self):
        """Train; returns the last evaluation's results (DefaultTrainer only does with EXPECTED_RESULTS)."""
        try:
            super().train()
            return getattr(self, "_last_eval_results", None)
        except FloatingPointError as e:  # non-finite losses or boxes, found before the optimizer step
            last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else None
            raise FloatingPointError(
                f"{e}\nTraining stopped at iteration {self.iter}, before this step changed the model. "
                f"Last good checkpoint: "
                f"{last or 'none written yet'} (continue from it with --resume). To avoid this, lower "
                f"SOLVER.BASE_LR or keep SOLVER.CLIP_GRADIENTS enabled."
            ) from e

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box (and mask) AP, with MODEL.DENSECLIP.RETURN_SCORE_MAPS also the score maps' IoU; for
        semantic segmentors mIoU (SemSegEvaluator)."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        if task_of(cfg).semantic_segmentation:
            return ReleaseSemSegEvaluator(dataset_name, output_dir=output_folder, sem_seg_loading_fn=read_label_map)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        evaluators = [COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)]
        if cfg.MODEL.DENSECLIP.RETURN_SCORE_MAPS:
            evaluators.append(ScoreMapEvaluator(dataset_name))
        return DatasetEvaluators(evaluators)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate a semantic segmentor with multi-scale and flip testing (TEST.AUG.*): the test images are
        loaded once at their own size (INPUT.MIN_SIZE_TEST 0) and resized to each scale by the TTA."""
        if not task_of(model).semantic_segmentation:
            raise ValueError("TEST.AUG.ENABLED is supported for semantic segmentors only")
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        tta = SemanticSegmentorWithTTA(cfg, model)
        original_size = cfg.clone()
        original_size.defrost()
        original_size.INPUT.MIN_SIZE_TEST = 0
        results = cls.test(original_size, tta, evaluators)
        return {f"{name}_TTA": value for name, value in results.items()}
