"""Small models, configs, data and runners that keep the test suite fast on a CPU."""
import importlib.util
import json
import os
import subprocess
import sys
import threading

import math

import cv2
import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances

from denseclip import add_denseclip_config


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """open_clip zero-initialises each block's last BN; give every BN non-trivial values instead."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


def build_open_clip(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(open_clip.create_model(name, pretrained=None), seed).eval()


def save_torchscript(model: torch.nn.Module, path) -> None:
    """Save like OpenAI's released archives: a traced TorchScript module."""
    image = torch.zeros(1, 3, 224, 224)
    text = open_clip.get_tokenizer("RN50")(["a photo"])
    torch.jit.trace(model, (image, text), check_trace=False).save(str(path))


def conv(c_in: int, c_out: int, kernel: int, bias: bool = True) -> int:
    """Parameters of a convolution (a linear layer with kernel 1)."""
    return c_in * c_out * kernel * kernel + (c_out if bias else 0)


def count_parameters(module: torch.nn.Module) -> int:
    """All parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference over largest value."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def inference_parameters(model) -> int:
    """Parameters of a deployed model: all but the frozen CLIP text encoder (its output is cached), the
    learnable contexts included."""
    return sum(p.numel() for name, p in model.named_parameters() if "text_encoder." not in name or name.endswith("contexts"))


def assert_detects_on_random_image(model, masks: bool) -> None:
    """An eval-mode detector (score threshold 0) on a 96 x 128 image returns its full quota of detections
    (TEST.DETECTIONS_PER_IMAGE: random weights leave far more candidates), sorted by score, each a
    probability, a class of the head and a box inside the image; with masks of the image's size if asked."""
    with torch.no_grad():
        (output,) = model([{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}])
    instances = output["instances"]
    quota = model.roi_heads.box_predictor.test_topk_per_image if hasattr(model, "roi_heads") else model.max_detections_per_image
    classes = model.roi_heads.num_classes if hasattr(model, "roi_heads") else model.num_classes
    assert instances.image_size == (96, 128) and len(instances) == quota
    scores = instances.scores
    assert torch.equal(scores, scores.sort(descending=True).values) and (scores >= 0).all() and (scores <= 1).all()
    assert ((instances.pred_classes >= 0) & (instances.pred_classes < classes)).all()
    boxes = instances.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    if masks:
        assert instances.pred_masks.shape == (len(instances), 96, 128)


TINY_CLIP = dict(layers=[1, 1, 1, 1], width=8, embed_dim=32, text_width=32, text_heads=2, text_layers=1)
TINY_TEXT = dict(
    context_length=77, vocab_size=49408, width=TINY_CLIP["text_width"], heads=TINY_CLIP["text_heads"],
    layers=TINY_CLIP["text_layers"],
)


def tiny_open_clip(seed: int = 0, layers=None) -> torch.nn.Module:
    """A CLIP-shaped open_clip model (QuickGELU, as OpenAI's) small enough for unit tests (random weights)."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=TINY_CLIP["embed_dim"],
        vision_cfg=dict(layers=list(layers or TINY_CLIP["layers"]), width=TINY_CLIP["width"], image_size=64),
        text_cfg=TINY_TEXT,
        quick_gelu=True,
    )
    return randomize_batchnorm(model, seed).eval()


def backbone_cfg(cfg):
    """``cfg`` as a DenseCLIP meta-architecture hands it to its backbone builder (language guidance on,
    when MODEL.META_ARCHITECTURE is a DenseCLIP one), for tests that call a builder directly."""
    from denseclip.modeling import DenseCLIPModel

    from detectron2.modeling import META_ARCH_REGISTRY

    cfg = cfg.clone()
    cfg.MODEL.DENSECLIP.LANGUAGE_GUIDED = issubclass(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE), DenseCLIPModel)
    return cfg


def tiny_cfg(denseclip: bool = True, class_names=("cat", "dog", "traffic light")):
    """A Detectron2 config for a tiny CLIP-FPN (matches tiny_open_clip's shapes)."""
    cfg = get_cfg()
    add_denseclip_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.CLIP.LAYERS = TINY_CLIP["layers"]
    cfg.MODEL.CLIP.WIDTH = TINY_CLIP["width"]
    cfg.MODEL.CLIP.EMBED_DIM = TINY_CLIP["embed_dim"]
    cfg.MODEL.CLIP.INPUT_RESOLUTION = 64
    cfg.MODEL.CLIP.TEXT.WIDTH = TINY_CLIP["text_width"]
    cfg.MODEL.CLIP.TEXT.HEADS = TINY_CLIP["text_heads"]
    cfg.MODEL.CLIP.TEXT.LAYERS = TINY_CLIP["text_layers"]
    cfg.MODEL.META_ARCHITECTURE = "DenseCLIPRCNN" if denseclip else "GeneralizedRCNN"
    cfg.MODEL.DENSECLIP.CLASS_NAMES = list(class_names)
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.WIDTH = 16
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.HEADS = 2
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.LAYERS = 1
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    return cfg


DETECTOR_CONFIGS = {
    "retinanet": "configs/COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml",
    "mask_rcnn": "configs/COCO-InstanceSegmentation/mask_rcnn_denseclip_R_50_FPN_1x.yaml",
}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_detector_cfg(kind: str = "retinanet", class_names=("cat", "dog", "traffic light")):
    """A real COCO config of the repository, shrunk to a tiny CLIP, tiny heads and small inputs."""
    cfg = tiny_cfg(denseclip=True, class_names=class_names)
    cfg.merge_from_file(os.path.join(REPO, DETECTOR_CONFIGS[kind]))
    shrunk = tiny_cfg(denseclip=True, class_names=class_names)
    cfg.MODEL.CLIP.merge_from_other_cfg(shrunk.MODEL.CLIP)
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.merge_from_other_cfg(shrunk.MODEL.DENSECLIP.CONTEXT_DECODER)
    cfg.MODEL.CLIP.OUT_FEATURES = list(cfg.MODEL.FPN.IN_FEATURES)
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RETINANET.NUM_CLASSES = cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(class_names)
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 96
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


TINY_SHAPES_CONFIGS = {
    "retinanet": "configs/Shapes-Detection/retinanet_denseclip_tiny_FPN.yaml",
    "mask_rcnn": "configs/Shapes-InstanceSegmentation/mask_rcnn_denseclip_tiny_FPN.yaml",
}


SHAPES_SEMSEG_CONFIG = "configs/Shapes-SemanticSegmentation/semantic_fpn_denseclip_tiny.yaml"


def save_shapes_checkpoint(config: str, path: str, confident_class=None, seed: int = 0) -> str:
    """A quick-start config's model with random weights, saved as a trained checkpoint at ``path``. With
    ``confident_class`` (a detector's class index) the box classifier scores every proposal as that
    class, so the detector returns confident boxes (drawn at any threshold)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from denseclip import get_denseclip_cfg

    torch.manual_seed(seed)
    model = build_model(get_denseclip_cfg(os.path.join(REPO, config), ["MODEL.DEVICE", "cpu"]))
    if confident_class is not None:
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.bias[confident_class] += 20
    folder, name = os.path.split(path)
    DetectionCheckpointer(model, save_dir=folder).save(os.path.splitext(name)[0])
    return path


def run_script(args, cwd=None, env=None, timeout=600):
    """Run a repository script with this interpreter; returns the CompletedProcess (stdout+stderr)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, *args], cwd=cwd or REPO, env=full_env, timeout=timeout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def load_script(path):
    """A repository script (demo/demo.py, train_net.py, ...) imported as a module, to call its functions."""
    name = os.path.splitext(os.path.basename(path))[0] + "_script"
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_coco_dataset(folder, class_names=("apple", "bottle", "cup"), num_images=6, size=96, seed=0):
    """A small COCO-format dataset written by hand: filled rectangles, one class each; returns
    (json path, image folder)."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image = np.full((size, size, 3), 40, np.uint8)
        for _ in range(2):
            category = int(rng.integers(len(class_names)))
            w, h = rng.integers(20, 40, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            image[y : y + h, x : x + w] = (60 + 80 * category, 200 - 60 * category, 120)
            polygon = [float(v) for v in (x, y, x + w, y, x + w, y + h, x, y + h)]
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": 10 * (category + 1),
                "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                "segmentation": [polygon], "iscrowd": 0,
            })
        cv2.imwrite(os.path.join(image_dir, f"{index}.png"), image)
        images.append({"id": index + 1, "file_name": f"{index}.png", "height": size, "width": size})
    categories = [{"id": 10 * (i + 1), "name": name} for i, name in enumerate(class_names)]
    json_file = os.path.join(folder, "annotations.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file, image_dir


def fill_deterministically(model: torch.nn.Module) -> torch.nn.Module:
    """
    Give every parameter and buffer values that depend only on its shape (not on its name, nor on
    the order modules are built in), so two implementations of one architecture can be compared
    weight for weight. BatchNorm statistics become mean 0, variance 1.
    """
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.fill_(1.0)
                continue
            if name.endswith("running_mean"):
                tensor.zero_()
                continue
            fan_in = max(1, tensor[0].numel()) if tensor.dim() > 1 else tensor.numel()
            values = torch.sin(torch.arange(tensor.numel(), dtype=torch.float64) * 0.7 + tensor.numel() * 0.01)
            tensor.copy_((values / fan_in**0.5).view_as(tensor))
    return model


def training_batch(with_masks=False):
    """Two 64 x 64 training inputs: one with two objects (classes 0 and 2), one without any."""
    from denseclip.utils.benchmark import make_training_batch

    torch.manual_seed(0)
    images = [torch.rand(3, 64, 64) * 255 for _ in range(2)]
    return make_training_batch(images, [[[4, 6, 40, 50], [30, 10, 60, 30]], []], [[0, 2], []], masks=with_masks)


def dataset_opts(json_file, image_dir):
    """Config overrides that train and test on one COCO-format dataset (DATASETS.COCO_FORMAT)."""
    return [
        "DATASETS.COCO_FORMAT.TRAIN_JSON", json_file, "DATASETS.COCO_FORMAT.TRAIN_IMAGES", image_dir,
        "DATASETS.COCO_FORMAT.TEST_JSON", json_file, "DATASETS.COCO_FORMAT.TEST_IMAGES", image_dir,
    ]


def tiny_opts(kind, output_dir, iterations):
    """Config overrides for a few fast iterations of a tiny shapes config on 96 px images, 3 classes."""
    head = "MODEL.RETINANET.NUM_CLASSES" if kind == "retinanet" else "MODEL.ROI_HEADS.NUM_CLASSES"
    return [
        head, "3", "OUTPUT_DIR", output_dir, "SOLVER.MAX_ITER", str(iterations), "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "1000",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0", "SEED", "0",
    ]


def load_cfg(config_file, opts=()):
    """What train_net.py does to a config: merge, then register DATASETS.COCO_FORMAT datasets."""
    from denseclip import get_denseclip_cfg, register_coco_format_datasets

    cfg = get_denseclip_cfg(config_file, list(opts))
    register_coco_format_datasets(cfg)
    return cfg


def data_cfg(json_file, image_dir, output_dir="", iterations=10, extra=()):
    """The tiny shapes Mask R-CNN config on a COCO-format dataset, for a few iterations, no evaluation."""
    opts = [*dataset_opts(json_file, image_dir), *tiny_opts("mask_rcnn", output_dir, iterations), "DATASETS.TEST", "()"]
    return load_cfg(TINY_SHAPES_CONFIGS["mask_rcnn"], [*opts, *extra])


def clip_resnet(**overrides):
    """A CLIPResNet built directly: tiny by default (stem width 8, one block per stage, 64 px grid)."""
    from denseclip.modeling import CLIPResNet

    kwargs = dict(
        layers=[1, 1, 1, 1], width=8, embed_dim=32, input_resolution=64, with_attention_pool=True,
        norm="BN", freeze_at=0, out_features=["res2", "res3", "res4", "res5"],
    )
    kwargs.update(overrides)
    return CLIPResNet(**kwargs)


def tiny_resnet(seed: int = 0, **overrides):
    """clip_resnet(**overrides) in eval mode with seeded weights and non-trivial BatchNorm values."""
    torch.manual_seed(seed)
    return randomize_batchnorm(clip_resnet(**overrides), seed).eval()


def text_encoder(class_names, **overrides):
    """A ContextTextEncoder built directly: tiny by default (width 32, one layer, 4 contexts)."""
    from denseclip.modeling import ContextTextEncoder

    kwargs = dict(
        embed_dim=32, width=32, heads=2, layers=1, vocab_size=49408, prompt_length=5, num_context=4,
        activation="QuickGELU", cache_in_eval=True,
    )
    kwargs.update(overrides)
    return ContextTextEncoder(class_names, **kwargs)


def randomize_layernorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """LayerNorms start at weight 1, bias 0; give them non-trivial values, so a misplaced norm shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


TINY_VIT = dict(patch_size=16, width=64, layers=2, heads=2, image_size=64)


def tiny_open_clip_vit(seed: int = 0, layers=None) -> torch.nn.Module:
    """A CLIP ViT-shaped open_clip model (QuickGELU, as OpenAI's) for unit tests: patch 16, width 64,
    2 blocks, 64 px (4 x 4 grid), the tiny text encoder; random weights, LayerNorms included."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=TINY_CLIP["embed_dim"],
        vision_cfg=dict(
            layers=layers or TINY_VIT["layers"],
            width=TINY_VIT["width"],
            head_width=TINY_VIT["width"] // TINY_VIT["heads"],
            patch_size=TINY_VIT["patch_size"],
            image_size=TINY_VIT["image_size"],
        ),
        text_cfg=TINY_TEXT,
        quick_gelu=True,
    )
    return randomize_layernorm(model, seed).eval()


def tiny_vit_cfg(denseclip: bool = True, retinanet: bool = False, class_names=("cat", "dog", "traffic light")):
    """A Detectron2 config for a tiny CLIP ViT with a simple feature pyramid (matches tiny_open_clip_vit)."""
    cfg = tiny_cfg(denseclip=denseclip, class_names=class_names)
    if retinanet:
        cfg.MODEL.META_ARCHITECTURE = "DenseCLIPRetinaNet" if denseclip else "RetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_clip_vit_sfp_backbone" if retinanet else "build_clip_vit_sfp_backbone"
    cfg.MODEL.CLIP.VIT.PATCH_SIZE = TINY_VIT["patch_size"]
    cfg.MODEL.CLIP.VIT.WIDTH = TINY_VIT["width"]
    cfg.MODEL.CLIP.VIT.LAYERS = TINY_VIT["layers"]
    cfg.MODEL.CLIP.VIT.HEADS = TINY_VIT["heads"]
    cfg.MODEL.CLIP.INPUT_RESOLUTION = TINY_VIT["image_size"]
    cfg.MODEL.FPN.NORM = "LN"
    return cfg


VIT_DETECTOR_CONFIGS = {
    "retinanet": "configs/COCO-Detection/retinanet_denseclip_ViT_B_16_FPN_1x.yaml",
    "mask_rcnn": "configs/COCO-InstanceSegmentation/mask_rcnn_denseclip_ViT_B_16_FPN_1x.yaml",
}


def tiny_vit_detector_cfg(kind: str = "retinanet", class_names=("cat", "dog", "traffic light")):
    """A ViT COCO config of the repository (its backbone, pyramid norm and drop path), with the tiny
    heads, text encoder and inputs of tiny_detector_cfg and a tiny ViT (tiny_open_clip_vit's shapes)."""
    vit = get_cfg()
    add_denseclip_config(vit)
    vit.merge_from_file(os.path.join(REPO, VIT_DETECTOR_CONFIGS[kind]))
    cfg = tiny_detector_cfg(kind, class_names)
    cfg.MODEL.META_ARCHITECTURE = vit.MODEL.META_ARCHITECTURE
    cfg.MODEL.BACKBONE.NAME = vit.MODEL.BACKBONE.NAME
    cfg.MODEL.FPN.NORM = vit.MODEL.FPN.NORM
    cfg.MODEL.CLIP.VIT.merge_from_other_cfg(vit.MODEL.CLIP.VIT)
    shrunk = tiny_vit_cfg(class_names=class_names)
    for key in ("PATCH_SIZE", "WIDTH", "LAYERS", "HEADS"):
        cfg.MODEL.CLIP.VIT[key] = shrunk.MODEL.CLIP.VIT[key]
    cfg.MODEL.CLIP.INPUT_RESOLUTION = shrunk.MODEL.CLIP.INPUT_RESOLUTION
    return cfg


def any_backbone_cfg(kind: str = "retinanet"):
    """The R-50 ImageNet config of ``kind``, shrunk: Detectron2's ResNet-18 on 64-96 px images, the tiny
    CLIP text encoder (tiny_open_clip's shapes), tiny heads; no weights files."""
    config = {
        "retinanet": "configs/COCO-Detection/retinanet_denseclip_R_50_ImageNet_FPN_1x.yaml",
        "mask_rcnn": "configs/COCO-InstanceSegmentation/mask_rcnn_denseclip_R_50_ImageNet_FPN_1x.yaml",
    }[kind]
    cfg = tiny_detector_cfg(kind)
    cfg.merge_from_file(os.path.join(REPO, config))
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 64
    cfg.MODEL.RESNETS.OUT_FEATURES = list(cfg.MODEL.FPN.IN_FEATURES)
    cfg.MODEL.DENSECLIP.ATTENTION_POOL_HEADS = 4
    cfg.MODEL.WEIGHTS = cfg.MODEL.DENSECLIP.TEXT_WEIGHTS = ""
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    return cfg


def context_decoder_parameters(visual_dim, width, layers):
    """The release's context decoder, written down: LayerNorm/Linear projections in and out, and per
    layer three LayerNorms, two attentions (q, k, v without bias; output projection with bias) and a
    width -> 4 width -> width MLP."""
    norm = lambda d: 2 * d  # noqa: E731
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    attention = 3 * linear(width, width, bias=False) + linear(width, width)
    layer = 3 * norm(width) + 2 * attention + linear(width, 4 * width) + linear(4 * width, width)
    memory = norm(visual_dim) + linear(visual_dim, width) + norm(width)
    text = norm(visual_dim) + linear(visual_dim, width)
    out = norm(width) + linear(width, visual_dim)
    return memory + text + layers * layer + out


def score_map_parameters(embed_dim, width=256, layers=3, contexts=8, text_width=512) -> int:
    """The trained score-map parts: context decoder, gamma (embed_dim) and the learnable contexts."""
    return context_decoder_parameters(embed_dim, width, layers) + embed_dim + contexts * text_width


SEM_SEG_CONFIGS = {
    ("clip", "R_50"): "configs/ADE20K-SemanticSegmentation/semantic_fpn_clip_R_50_512x512_80k.yaml",
    ("denseclip", "R_50"): "configs/ADE20K-SemanticSegmentation/semantic_fpn_denseclip_R_50_512x512_80k.yaml",
    ("clip", "ViT_B_16"): "configs/ADE20K-SemanticSegmentation/semantic_fpn_clip_ViT_B_16_512x512_80k.yaml",
    ("denseclip", "ViT_B_16"): "configs/ADE20K-SemanticSegmentation/semantic_fpn_denseclip_ViT_B_16_512x512_80k.yaml",
}


def tiny_sem_seg_cfg(denseclip: bool = True, vit: bool = False, class_names=("cat", "dog", "traffic light")):
    """An ADE20K Semantic FPN config of the repository (its meta-architecture, backbone builder, head
    options, score-map options and solver), shrunk: the tiny CLIP ResNet (or a 4-block tiny ViT with the
    segmentation pyramid from blocks 0-3), 3 classes, 16-channel FPN and head, 64 px windows."""
    config = SEM_SEG_CONFIGS[("denseclip" if denseclip else "clip", "ViT_B_16" if vit else "R_50")]
    cfg = tiny_vit_cfg(class_names=class_names) if vit else tiny_cfg(class_names=class_names)
    shrunk_clip = cfg.MODEL.CLIP.clone()
    cfg.merge_from_file(os.path.join(REPO, config))
    for key in ("LAYERS", "WIDTH", "EMBED_DIM", "INPUT_RESOLUTION", "TEXT"):
        cfg.MODEL.CLIP[key] = shrunk_clip[key]
    for key in ("PATCH_SIZE", "WIDTH", "HEADS"):
        cfg.MODEL.CLIP.VIT[key] = shrunk_clip.VIT[key]
    cfg.MODEL.CLIP.VIT.LAYERS, cfg.MODEL.CLIP.VIT.OUT_INDICES = 4, [0, 1, 2, 3]
    cfg.MODEL.DENSECLIP.CLASS_NAMES = list(class_names)
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.WIDTH = 16
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.HEADS = 2
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.LAYERS = 1
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(class_names)
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 16
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.TEST.SEM_SEG.CROP_SIZE, cfg.TEST.SEM_SEG.STRIDE = (64, 64), (43, 43)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 256
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def direct_attention_pool(pool, res5, grid):
    """Every location's token attends to [mean token; all tokens], written out head by head."""
    b, c, h, w = res5.shape
    tokens = res5.flatten(2).transpose(1, 2)  # B x HW x C
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + grid
    heads, d = pool.num_heads, c // pool.num_heads
    q = (tokens @ pool.q_proj.weight.T + pool.q_proj.bias).view(b, -1, heads, d)
    k = (tokens @ pool.k_proj.weight.T + pool.k_proj.bias).view(b, -1, heads, d)
    v = (tokens @ pool.v_proj.weight.T + pool.v_proj.bias).view(b, -1, heads, d)
    attention = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d), dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", attention, v).reshape(b, -1, c)
    out = out @ pool.c_proj.weight.T + pool.c_proj.bias
    return out[:, 0], out[:, 1:].transpose(1, 2).reshape(b, -1, h, w)


def bilinear_grid(positional_embedding, side, height, width):
    """The spatial rows of a (1 + side^2) x C embedding as a 1 x C x side x side map, resized with
    F.interpolate (bilinear, align_corners False: the release's call), back to (height * width) x C."""
    grid = positional_embedding[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    return grid[0].permute(1, 2, 0).reshape(height * width, -1)


def run_in_threads(function, arguments) -> None:
    """Call ``function(argument)`` for each argument, each in its own thread, all at once; wait for all."""
    threads = [threading.Thread(target=function, args=(argument,)) for argument in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
