"""
Converting the DenseCLIP release's checkpoints to this project's models: its detectors (MMDetection
2.17: RetinaNet, Mask R-CNN) and its semantic segmentors (MMSegmentation 0.19: Semantic FPN on ADE20K),
DenseCLIP or the CLIP baseline, on CLIP RN50, RN101 or (segmentation) ViT-B/16.

A release checkpoint is a dict with ``state_dict`` (names of the release's modules) and ``meta``
(``CLASSES``, ``mmdet_version`` or ``mmseg_version`` and ``PALETTE``, ...). Every tensor is renamed onto
one tensor of the model built from the matching config; the output channels of RetinaNet's and the
RPN's last convolutions are reordered, because MMDetection numbers the anchors of a location
ratio-major (ratio * scales + scale) and Detectron2 size-major (size * ratios + ratio). Any tensor the
rules do not know is an error that names it; any model tensor left without a value is too.

The segmentation names (release -> this project; "fpn." is "backbone.neck." for DenseCLIP and
"backbone." for the CLIP baselines):

    backbone.<CLIP ResNet name>                   backbone.bottom_up.<same> (attnpool.* for DenseCLIP)
    backbone.fpn{1,2,3,4}.*  (ViT pyramid)         backbone.bottom_up.fpn{1,2,3,4}.*
    backbone.<CLIP ViT name>                      backbone.bottom_up.vit.<same> (ln_post, proj: DenseCLIP)
    text_encoder.*, contexts (1 x 8 x 512), gamma  backbone.score_map.text_encoder.*, .contexts (8 x 512), .gamma
    context_decoder.decoder.i.*_attn.proj.*       backbone.score_map.context_decoder.layers.i.*_attn.out_proj.*
    context_decoder.*                             backbone.score_map.context_decoder.* (decoder -> layers)
    neck.lateral_convs.i.conv.*                   fpn.fpn_lateral{i + 2}.*
    neck.fpn_convs.i.conv.*                       fpn.fpn_output{i + 2}.*
    decode_head.scale_heads.i.j.conv.weight       sem_seg_head.p{i + 2}.j.weight (j = 0, 2, 4: the convs)
    decode_head.scale_heads.i.j.bn.*              sem_seg_head.p{i + 2}.j.norm.*
    decode_head.conv_seg.*                        sem_seg_head.predictor.*

The release's identity head (the auxiliary loss) has no tensors.
"""
import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..data.class_names import resolve_class_names
from ..modeling import DenseCLIPModel, task_of
from .clip_weights import read_checkpoint_file

__all__ = [
    "ReleaseLayout",
    "convert_release_state_dict",
    "infer_release_layout",
    "read_release_checkpoint",
    "ConversionReport",
]

CONFIGS = {
    ("retinanet", True): "configs/COCO-Detection/retinanet_denseclip_{backbone}_FPN_1x.yaml",
    ("retinanet", False): "configs/COCO-Detection/retinanet_clip_{backbone}_FPN_1x.yaml",
    ("mask_rcnn", True): "configs/COCO-InstanceSegmentation/mask_rcnn_denseclip_{backbone}_FPN_1x.yaml",
    ("mask_rcnn", False): "configs/COCO-InstanceSegmentation/mask_rcnn_clip_{backbone}_FPN_1x.yaml",
    ("semantic_fpn", True): "configs/ADE20K-SemanticSegmentation/semantic_fpn_denseclip_{backbone}_512x512_80k.yaml",
    ("semantic_fpn", False): "configs/ADE20K-SemanticSegmentation/semantic_fpn_clip_{backbone}_512x512_80k.yaml",
}
DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}
#: The CLIP ViTs of the release (segmentation only): (patch size, width, blocks) -> name.
VITS = {(16, 768, 12): "ViT-B/16"}
TASKS = {"retinanet": "RetinaNet", "mask_rcnn": "Mask R-CNN", "semantic_fpn": "Semantic FPN"}


@dataclass
class ReleaseLayout:
    """What a release checkpoint holds: its model, whether it is language-guided, its CLIP image encoder."""

    detector: str  # "retinanet", "mask_rcnn" or "semantic_fpn"
    language_guided: bool
    layers: Tuple[int, ...]  # blocks per stage of a CLIP ResNet; () for a ViT
    num_classes: int
    vit: Tuple[int, ...] = ()  # (patch size, width, blocks) of a CLIP ViT; () for a ResNet

    @property
    def depth(self) -> Optional[int]:
        return DEPTHS.get(self.layers)

    @property
    def backbone(self) -> str:
        """"RN50", "RN101", "ViT-B/16", or a description of an image encoder the release has not."""
        if self.vit:
            return VITS.get(self.vit, "a ViT with patch {}, width {}, {} blocks".format(*self.vit))
        return f"RN{self.depth}" if self.depth else f"a ResNet with stages {list(self.layers)}"

    def config_file(self) -> str:
        """The repository config of this layout (relative to the repository root)."""
        if self.vit and self.vit not in VITS or not self.vit and self.depth is None:
            raise ValueError(f"The checkpoint's CLIP image encoder is {self.backbone}: none of the release's "
                             f"(RN50, RN101{', ViT-B/16' if self.detector == 'semantic_fpn' else ''})")
        name = self.backbone.replace("RN", "R_").replace("-", "_").replace("/", "_")
        return CONFIGS[(self.detector, self.language_guided)].format(backbone=name)

    def __str__(self) -> str:
        kind = "DenseCLIP" if self.language_guided else "CLIP baseline"
        return f"{kind} {TASKS[self.detector]} on CLIP {self.backbone}, {self.num_classes} classes"


def read_release_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of a release checkpoint file; a clear error for anything else."""
    obj = read_checkpoint_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "state_dict" not in obj:
        raise ValueError(
            f"{path} is already a Detectron2 checkpoint (keys {sorted(obj)[:8]}: written by train_net.py, "
            f"the quick start or this converter); nothing to convert. Use it as it is: MODEL.WEIGHTS {path}"
        )
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"{path} is not a checkpoint of the DenseCLIP release (MMDetection or MMSegmentation): it has no "
            f"'state_dict' (found {found}). Give the .pth file the release publishes for a detector or a "
            f"segmentor."
        )
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj["state_dict"].items()}
    return state, obj.get("meta") or {}


def infer_release_layout(state: Dict[str, torch.Tensor]) -> ReleaseLayout:
    """The layout of a release state dict; an error saying what was found if it is none of the release's."""
    if "bbox_head.retina_cls.weight" in state:
        detector = "retinanet"
        anchors = state["bbox_head.retina_reg.weight"].shape[0] // 4
        num_classes = state["bbox_head.retina_cls.weight"].shape[0] // anchors
    elif "roi_head.mask_head.conv_logits.weight" in state:
        detector, num_classes = "mask_rcnn", state["roi_head.mask_head.conv_logits.weight"].shape[0]
    elif "decode_head.conv_seg.weight" in state:
        detector, num_classes = "semantic_fpn", state["decode_head.conv_seg.weight"].shape[0]
    else:
        heads = sorted({k.split(".")[0] for k in state})
        raise ValueError(
            f"Not a RetinaNet, Mask R-CNN or Semantic FPN checkpoint of the DenseCLIP release: its top-level "
            f"modules are {heads} (expected backbone, neck and bbox_head.retina_cls, rpn_head and "
            f"roi_head.mask_head, or decode_head.conv_seg)"
        )
    guided = "text_encoder.token_embedding.weight" in state
    if detector == "semantic_fpn" and "backbone.transformer.resblocks.0.attn.in_proj_weight" in state:
        patch_embedding = state.get("backbone.conv1.weight")
        if patch_embedding is None:
            raise ValueError("The checkpoint's CLIP ViT under 'backbone.' has no patch embedding (backbone.conv1.weight)")
        blocks = len({k.split(".")[3] for k in state if k.startswith("backbone.transformer.resblocks.")})
        vit = (patch_embedding.shape[-1], patch_embedding.shape[0], blocks)
        return ReleaseLayout(detector, guided, (), num_classes, vit)
    layers = tuple(
        len({k.split(".")[2] for k in state if k.startswith(f"backbone.layer{i}.")}) for i in range(1, 5)
    )
    if "backbone.conv1.weight" not in state or not all(layers):
        expected = "a CLIP ResNet (conv1, layer1..layer4)" + (" or ViT (transformer.resblocks)" if detector == "semantic_fpn" else "")
        raise ValueError(f"The checkpoint has no {expected} under 'backbone.'")
    return ReleaseLayout(detector, guided, layers, num_classes)


def anchor_permutation(num_ratios: int, num_sizes: int) -> List[int]:
    """For each Detectron2 anchor index (size * ratios + ratio), the MMDetection one (ratio * sizes + size)."""
    return [ratio * num_sizes + size for size in range(num_sizes) for ratio in range(num_ratios)]


def _reorder_anchors(tensor: torch.Tensor, num_ratios: int, num_sizes: int) -> torch.Tensor:
    """Reorder the output channels (weight rows or bias) grouped per anchor."""
    anchors = num_ratios * num_sizes
    grouped = tensor.reshape(anchors, tensor.shape[0] // anchors, *tensor.shape[1:])
    return grouped[anchor_permutation(num_ratios, num_sizes)].reshape(tensor.shape)


Rule = Tuple[str, str, Optional[Callable[[torch.Tensor], torch.Tensor]]]


def _rules(layout: ReleaseLayout, cfg) -> List[Rule]:
    """(release name pattern, model name template, tensor transform) for every tensor of the layout."""
    fpn = "backbone.neck." if layout.language_guided else "backbone."
    first = 3 if layout.detector == "retinanet" else 2  # FPN level of the first lateral convolution
    levels = len(cfg.MODEL.FPN.IN_FEATURES)
    if layout.vit:  # the segmentation ViT: CLIP's names under .vit, its pyramid's beside it
        rules: List[Rule] = [
            (r"backbone\.(fpn[1-4]\..+|fpn[1-4])", r"backbone.bottom_up.\1", None),
            (r"backbone\.(.+)", r"backbone.bottom_up.vit.\1", None),
        ]
    else:
        rules = [(r"backbone\.(.+)", r"backbone.bottom_up.\1", None)]
    rules += [
        (r"text_encoder\.(.+)", r"backbone.score_map.text_encoder.\1", None),
        (r"contexts", "backbone.score_map.text_encoder.contexts", lambda t: t.reshape(-1, t.shape[-1])),
        (r"gamma", "backbone.score_map.gamma", None),
        (r"context_decoder\.(memory_proj|text_proj|out_proj)\.(.+)", r"backbone.score_map.context_decoder.\1.\2", None),
        (r"context_decoder\.decoder\.(\d+)\.(self_attn|cross_attn)\.proj\.(.+)",
         r"backbone.score_map.context_decoder.layers.\1.\2.out_proj.\3", None),
        (r"context_decoder\.decoder\.(\d+)\.(.+)", r"backbone.score_map.context_decoder.layers.\1.\2", None),
    ]
    for i in range(levels):
        rules.append((rf"neck\.lateral_convs\.{i}\.conv\.(.+)", rf"{fpn}fpn_lateral{first + i}.\1", None))
        rules.append((rf"neck\.fpn_convs\.{i}\.conv\.(.+)", rf"{fpn}fpn_output{first + i}.\1", None))
    if layout.detector == "retinanet":
        anchors = cfg.MODEL.ANCHOR_GENERATOR
        reorder = functools.partial(_reorder_anchors, num_ratios=len(anchors.ASPECT_RATIOS[0]), num_sizes=len(anchors.SIZES[0]))
        rules += [
            (rf"neck\.fpn_convs\.{levels}\.conv\.(.+)", rf"{fpn}top_block.p6.\1", None),
            (rf"neck\.fpn_convs\.{levels + 1}\.conv\.(.+)", rf"{fpn}top_block.p7.\1", None),
            (r"bbox_head\.cls_convs\.(\d+)\.conv\.(.+)", lambda m: f"head.cls_subnet.{2 * int(m[1])}.{m[2]}", None),
            (r"bbox_head\.reg_convs\.(\d+)\.conv\.(.+)", lambda m: f"head.bbox_subnet.{2 * int(m[1])}.{m[2]}", None),
            (r"bbox_head\.retina_cls\.(.+)", r"head.cls_score.\1", reorder),
            (r"bbox_head\.retina_reg\.(.+)", r"head.bbox_pred.\1", reorder),
        ]
    elif layout.detector == "semantic_fpn":
        # Detectron2's head names each level's stack after its input feature (p2, ...).
        heads = list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
        rules += [
            (r"decode_head\.scale_heads\.([0-3])\.(\d+)\.conv\.(.+)", lambda m: f"sem_seg_head.{heads[int(m[1])]}.{m[2]}.{m[3]}", None),
            (r"decode_head\.scale_heads\.([0-3])\.(\d+)\.bn\.(.+)", lambda m: f"sem_seg_head.{heads[int(m[1])]}.{m[2]}.norm.{m[3]}", None),
            (r"decode_head\.conv_seg\.(.+)", r"sem_seg_head.predictor.\1", None),
        ]
    else:
        # One size per level: the reordering is the identity, kept so that other anchor settings convert.
        ratios = len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])
        reorder = functools.partial(_reorder_anchors, num_ratios=ratios, num_sizes=len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]))
        rules += [
            (r"rpn_head\.rpn_conv\.(.+)", r"proposal_generator.rpn_head.conv.\1", None),
            (r"rpn_head\.rpn_cls\.(.+)", r"proposal_generator.rpn_head.objectness_logits.\1", reorder),
            (r"rpn_head\.rpn_reg\.(.+)", r"proposal_generator.rpn_head.anchor_deltas.\1", reorder),
            (r"roi_head\.bbox_head\.shared_fcs\.(\d+)\.(.+)", lambda m: f"roi_heads.box_head.fc{int(m[1]) + 1}.{m[2]}", None),
            (r"roi_head\.bbox_head\.fc_cls\.(.+)", r"roi_heads.box_predictor.cls_score.\1", None),
            (r"roi_head\.bbox_head\.fc_reg\.(.+)", r"roi_heads.box_predictor.bbox_pred.\1", None),
            (r"roi_head\.mask_head\.convs\.(\d+)\.conv\.(.+)", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}", None),
            (r"roi_head\.mask_head\.upsample\.(.+)", r"roi_heads.mask_head.deconv.\1", None),
            (r"roi_head\.mask_head\.conv_logits\.(.+)", r"roi_heads.mask_head.predictor.\1", None),
        ]
    return rules


def model_layout(model: nn.Module, cfg, num_classes: int) -> ReleaseLayout:
    """The layout of the model ``cfg`` built, in the release's terms."""
    detector = {"semantic_segmentation": "semantic_fpn", "rcnn": "mask_rcnn", "retinanet": "retinanet"}[task_of(model).name]
    guided = isinstance(model, DenseCLIPModel)
    if "vit" in cfg.MODEL.BACKBONE.NAME.lower():
        vit = cfg.MODEL.CLIP.VIT
        return ReleaseLayout(detector, guided, (), num_classes, (vit.PATCH_SIZE, vit.WIDTH, vit.LAYERS))
    return ReleaseLayout(detector, guided, tuple(cfg.MODEL.CLIP.LAYERS), num_classes)


def model_class_names(model: nn.Module, cfg) -> List[str]:
    """The classes of the model ``cfg`` built, in order: its prompts' names (DenseCLIP), or else its
    dataset's (the metadata field of its task)."""
    if isinstance(model, DenseCLIPModel):
        return model.class_names
    return resolve_class_names(cfg, task_of(model).metadata_classes)


def _config_hint(layout: ReleaseLayout) -> str:
    try:
        return layout.config_file()
    except ValueError:
        return "a config of the same layout"


def _prompt(name: str) -> str:
    """A class name as CLIP's tokenizer reads it (case and spacing aside): "bed " is "bed"."""
    return " ".join(name.lower().split())


@dataclass
class ConversionReport:
    layout: ReleaseLayout
    mapped: int = 0
    reordered: List[str] = field(default_factory=list)
    dropped: Dict[str, str] = field(default_factory=dict)
    classes: str = ""

    def summary(self) -> str:
        lines = [f"Found: {self.layout}.", self.classes, f"Mapped {self.mapped} tensors onto the model's, names and shapes exact."]
        if self.reordered:
            lines.append(f"Anchor channels reordered from MMDetection's order to Detectron2's: {', '.join(self.reordered)}.")
        lines += [f"Dropped {name}: {reason}." for name, reason in self.dropped.items()]
        return "\n".join(lines)


def convert_release_state_dict(
    state: Dict[str, torch.Tensor], meta: dict, model: nn.Module, cfg, class_names: Optional[List[str]] = None
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """
    The release ``state`` renamed (and reordered) onto ``model`` (built from ``cfg``, whose classes are
    ``class_names``, by default :func:`model_class_names`); every model tensor gets a value of its shape,
    every release tensor is used.

    Raises:
        ValueError naming what does not fit: the layout, the class list, unknown or missing tensors,
        shapes.
    """
    layout = infer_release_layout(state)
    class_names = model_class_names(model, cfg) if class_names is None else class_names
    built = model_layout(model, cfg, len(class_names))
    same_encoder = layout.vit == built.vit and (layout.vit or layout.layers == built.layers)
    if (layout.detector, layout.language_guided) != (built.detector, built.language_guided) or not same_encoder:
        encoder = (f"MODEL.CLIP.VIT (patch {built.vit[0]}, width {built.vit[1]}, {built.vit[2]} blocks)" if built.vit
                   else f"MODEL.CLIP.LAYERS {list(built.layers)}")
        raise ValueError(
            f"The checkpoint holds a {layout}; the config builds a {str(built).rsplit(',', 1)[0]} ({encoder}). "
            f"Convert it with {_config_hint(layout)}."
        )
    if layout.num_classes != len(class_names):
        raise ValueError(
            f"The checkpoint's classifier has {layout.num_classes} classes, the config's model "
            f"{len(class_names)} ({', '.join(class_names[:3])}, ...). Use a config of the checkpoint's "
            f"dataset ({_config_hint(layout)} for the release's)."
        )
    stored = list(meta.get("CLASSES") or [])
    if stored and [_prompt(c) for c in stored] != [_prompt(c) for c in class_names]:
        differing = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(stored, class_names)) if _prompt(a) != _prompt(b)]
        raise ValueError(
            f"The checkpoint was trained on {len(stored)} classes that differ from the config's {len(class_names)} "
            f"({'; '.join(differing[:3]) or 'different counts'}{'; ...' if len(differing) > 3 else ''}). Its class "
            f"order must be the dataset's, and DenseCLIP's prompts its names (MODEL.DENSECLIP.CLASS_NAMES)."
        )
    own = model.state_dict()
    report = ConversionReport(layout)
    report.classes = (f"Classes: the checkpoint's {len(stored)} names are the config's, in its order." if stored else
                      f"Classes: the checkpoint names none; its {layout.num_classes} are taken to be the config's, in its order.")
    converted, unknown = {}, []
    rules = [(re.compile(pattern), target, transform) for pattern, target, transform in _rules(layout, cfg)]
    for name, tensor in state.items():
        for pattern, target, transform in rules:
            match = pattern.fullmatch(name)
            if match:
                break
        else:
            unknown.append(name)
            continue
        new = target(match) if callable(target) else match.expand(target)
        if new not in own and name.endswith("num_batches_tracked"):
            report.dropped[name] = "the model's frozen BatchNorm keeps no step count"
            continue
        if transform is not None:
            tensor = transform(tensor)
            if isinstance(transform, functools.partial) and transform.func is _reorder_anchors:
                report.reordered.append(name)
        converted[new] = tensor
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} tensors of no known module: {', '.join(unknown[:5])}")
    missing = [k for k in own if k not in converted]
    if missing:
        problems.append(f"{len(missing)} model tensors without a value in the checkpoint: {', '.join(missing[:5])}")
    extra = [k for k in converted if k not in own]
    if extra:
        problems.append(f"{len(extra)} renamed tensors the model does not have: {', '.join(extra[:5])}")
    shapes = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in converted.items()
              if k in own and v.shape != own[k].shape]
    if shapes:
        problems.append(f"{len(shapes)} shapes differ: {'; '.join(shapes[:3])}")
    if problems:
        raise ValueError(f"The checkpoint ({layout}) does not fit the model: " + ". ".join(problems))
    report.mapped = len(converted)
    return {k: v.to(own[k].dtype).contiguous() for k, v in converted.items()}, report
