"""
Speed of a DenseCLIP model against its CLIP baseline (and Detectron2's own detector), built side by side
with the same weights wherever their parameters match, on the same synthetic input; tools/benchmark.py is
its command line. Training steps are Detectron2's own (SimpleTrainer, or AMPTrainer with --amp).
"""
import itertools
import statistics
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence

import torch

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.solver import build_optimizer as build_detectron2_optimizer
from detectron2.structures import BitMasks, Boxes, Instances

from ..config import get_denseclip_cfg
from ..modeling import DenseCLIPModel, head_num_classes, task_of
from ..solver import build_optimizer

__all__ = ["FIXED_WORKLOAD", "benchmark_configs", "build_side_by_side", "detectron2_config_name", "interleaved_medians",
           "make_training_batch", "peak_step_memory_mb", "random_training_batch", "step_of"]

# Detectron2's own R50-FPN model of each kind (model-zoo config names).
DETECTRON2_MODELS = {
    "retinanet": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "rcnn": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "rcnn+mask": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
}
# Inference at a fixed workload: with random weights, how many detections pass the configs' score threshold
# differs from model to model, and Mask R-CNN's mask head runs on each. With threshold 0 every detector
# returns TEST.DETECTIONS_PER_IMAGE (100) detections, the workload of the FLOP counts.
FIXED_WORKLOAD = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]


def make_training_batch(images: Sequence[torch.Tensor], boxes: Sequence, classes: Sequence, masks: bool = True) -> List[dict]:
    """Detectron2 training inputs: per image (3 x H x W, 0-255) its N x 4 boxes (XYXY pixels), N classes
    and, with ``masks``, the boxes filled as bitmasks."""
    batch = []
    for image, image_boxes, image_classes in zip(images, boxes, classes):
        height, width = image.shape[-2:]
        box_tensor = torch.as_tensor(image_boxes, dtype=torch.float32).reshape(-1, 4)
        instances = Instances((height, width), gt_boxes=Boxes(box_tensor), gt_classes=torch.as_tensor(image_classes).long())
        if masks:
            bitmaps = torch.zeros(len(box_tensor), height, width, dtype=torch.bool)
            for bitmap, (x1, y1, x2, y2) in zip(bitmaps, box_tensor.round().long().tolist()):
                bitmap[y1:y2, x1:x2] = True
            instances.gt_masks = BitMasks(bitmaps)
        batch.append({"image": image, "height": height, "width": width, "instances": instances})
    return batch


def random_training_batch(batch_size: int, height: int, width: int, num_classes: int, objects: int = 3, seed: int = 0):
    """Random images, each with ``objects`` random boxes (20-60% of the image), classes and box masks."""
    generator = torch.Generator().manual_seed(seed)
    images, boxes, classes = [], [], []
    for _ in range(batch_size):
        size = torch.rand(objects, 2, generator=generator) * 0.4 + 0.2
        corner = torch.rand(objects, 2, generator=generator) * (1 - size)
        boxes.append(torch.cat([corner, corner + size], dim=1) * torch.tensor([width, height] * 2, dtype=torch.float32))
        classes.append(torch.randint(num_classes, (objects,), generator=generator))
        images.append(torch.rand(3, height, width, generator=generator) * 255)
    return make_training_batch(images, boxes, classes)


def benchmark_configs(config_file: str, opts: Sequence[str], baseline_config: str = "", detectron2: bool = False,
                      uncached: bool = False) -> Dict[str, object]:
    """Frozen configs: "baseline" (``baseline_config``, or the same config with its task's CLIP baseline
    meta-architecture), "denseclip", and on request "denseclip_uncached" (text re-encoded every forward,
    as the release does) and "detectron2" (Detectron2's model-zoo R50-FPN of the kind, random weights)."""
    denseclip = get_denseclip_cfg(config_file, opts)
    task = task_of(denseclip)
    if not issubclass(META_ARCH_REGISTRY.get(denseclip.MODEL.META_ARCHITECTURE), DenseCLIPModel):
        raise ValueError(f"--config-file must be a DenseCLIP config, not {denseclip.MODEL.META_ARCHITECTURE}")
    baseline = get_denseclip_cfg(baseline_config or config_file,
                                 list(opts) + ([] if baseline_config else ["MODEL.META_ARCHITECTURE", task.baseline]))
    cfgs = {"baseline": baseline, "denseclip": denseclip}
    if uncached:
        cfgs["denseclip_uncached"] = get_denseclip_cfg(config_file, list(opts) + ["MODEL.DENSECLIP.CACHE_TEXT_EMBEDDINGS", "False"])
    if detectron2:
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(detectron2_config_name(baseline)))
        cfg.merge_from_list([*FIXED_WORKLOAD, "MODEL.DEVICE", denseclip.MODEL.DEVICE, "MODEL.WEIGHTS", ""])
        cfgs["detectron2"] = cfg
    for cfg in cfgs.values():
        cfg.freeze()
    return cfgs


def detectron2_config_name(cfg) -> str:
    """Detectron2's model-zoo R50-FPN config of the same kind as ``cfg`` (RetinaNet, Faster or Mask R-CNN)."""
    task = task_of(cfg)
    kind = task.name + ("+mask" if cfg.MODEL.MASK_ON else "")
    if kind not in DETECTRON2_MODELS:
        raise ValueError(f"--detectron2 compares detectors; {cfg.MODEL.META_ARCHITECTURE} is a {task.name.replace('_', ' ')}")
    return DETECTRON2_MODELS[kind]


def build_side_by_side(cfgs: Dict[str, object]) -> Dict[str, torch.nn.Module]:
    """The models of :func:`benchmark_configs`, DenseCLIP starting from the baseline's weights wherever
    names and shapes match."""
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = build_model(cfg)
    for source, target in (("baseline", "denseclip"), ("denseclip", "denseclip_uncached")):
        if target in models:
            own = models[target].state_dict()
            shared = {k: v for k, v in models[source].state_dict().items() if k in own and own[k].shape == v.shape}
            models[target].load_state_dict(shared, strict=False)
    return models


def step_of(train: bool, cfg, model: torch.nn.Module, size: Sequence[int], batch_size: int, amp: bool) -> Callable:
    """A callable running one eval-mode inference of ``batch_size`` random images (autocast with ``amp``:
    float16 on CUDA, bfloat16 on CPU) or one training step of Detectron2's SimpleTrainer (AMPTrainer with
    ``amp``, CUDA only) on a random batch."""
    device = torch.device(cfg.MODEL.DEVICE).type
    if not train:
        model.eval()
        generator = torch.Generator().manual_seed(0)
        inputs = [{"image": torch.rand(3, *size, generator=generator) * 255, "height": size[0], "width": size[1]}
                  for _ in range(batch_size)]
        dtype = torch.float16 if device == "cuda" else torch.bfloat16
        cast = torch.autocast(device, dtype=dtype) if amp else nullcontext()

        def infer():
            with torch.no_grad(), cast:
                model(inputs)

        return infer
    if amp and device != "cuda":
        raise ValueError("--amp training runs Detectron2's AMPTrainer, which autocasts on CUDA only; leave --amp out on CPU")
    model.train()
    optimizer = (build_optimizer if "OPTIMIZER" in cfg.SOLVER else build_detectron2_optimizer)(cfg, model)
    batch = random_training_batch(batch_size, *size, head_num_classes(model))
    trainer = (AMPTrainer if amp else SimpleTrainer)(model, itertools.repeat(batch), optimizer)
    return trainer.run_step


def interleaved_medians(steps: Dict[str, Callable], iterations: int, warmup: int, clock: Callable = time.perf_counter,
                        cuda: bool = False) -> Dict[str, Optional[float]]:
    """Median seconds per run of each step, runs interleaved (each round starts from another model, so
    drifts of the machine's speed fall on all alike); None for a model out of GPU memory."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    failed, names = set(), list(steps)
    for round_index in range(warmup + iterations):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if name in failed:
                continue
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            try:
                steps[name]()
                if cuda:
                    torch.cuda.synchronize()
            except torch.OutOfMemoryError:
                failed.add(name)
                torch.cuda.empty_cache()
                continue
            if round_index >= warmup:
                times[name].append(clock() - start)
    return {name: None if name in failed else statistics.median(t) for name, t in times.items()}


def peak_step_memory_mb(step: Callable, runs: int = 2) -> float:
    """On a GPU: the most memory ``runs`` calls of ``step`` allocate above what was allocated before them
    (activations, gradients, and optimizer state created at a first step), in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(runs):
        step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
