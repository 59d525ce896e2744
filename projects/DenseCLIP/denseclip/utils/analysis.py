"""
FLOP and parameter counts of CLIP / DenseCLIP models in the convention of the paper's tables:

- fvcore's counter (one multiply-add is one flop), model in eval mode, weights irrelevant;
- the text encoder left out of the inference count: its K x D output is cached, so it runs once per
  class set. Its own flops are counted apart, on ``ContextTextEncoder.encode``;
- RetinaNet: Detectron2's FlopCountAnalysis of the whole inference;
- two-stage detectors: backbone + proposal generator traced on the image, the ROI heads on a fixed
  workload (the box branch on 1000 boxes, the mask branch on 100), whatever the image yields;
- semantic segmentors: one whole-image forward (no sliding window) up to the logits at the input's
  size, counted as the segmentation release's get_flops.py counted with the fvcore of 2021
  (:data:`SEGMENTATION_HANDLES`).

Detectors: ``EXTRA_HANDLES`` count the ops fvcore has no handle for; ``IGNORED_OPS`` are counted as zero
on purpose (on top of fvcore's and Detectron2's own lists). Any other op is reported as unsupported.
"""
from collections import Counter
from contextlib import nullcontext
from typing import Dict, List, Optional, Tuple

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import elementwise_flop_counter, get_shape
from torch import nn

from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Boxes, ImageList
from detectron2.utils.analysis import FlopCountAnalysis as DetectorFlopCountAnalysis

from ..modeling import ContextTextEncoder, DenseCLIPModel, task_of

__all__ = [
    "FlopReport",
    "count_flops",
    "parameter_split",
    "text_encoders",
    "NUM_BOX_PROPOSALS",
    "NUM_MASK_BOXES",
    "SEGMENTATION_RULES",
]

NUM_BOX_PROPOSALS = 1000
NUM_MASK_BOXES = 100


def _numel(shape) -> int:
    return int(torch.tensor(shape).prod().item()) if shape else 1


def sdpa_flop_jit(inputs, outputs) -> int:
    """q (..., L, E), k (..., S, E), v (..., S, Ev): Q K^T and softmax(.) V, batch * L * S * (E + Ev)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return _numel(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def native_mha_flop_jit(inputs, outputs) -> int:
    """nn.MultiheadAttention's fused inference op: q/k/v/output projections and the two products."""
    query, key = get_shape(inputs[0]), get_shape(inputs[1])
    batch, length, source, dim = _numel(query[:-2]), query[-2], key[-2], query[-1]
    return batch * ((2 * length + 2 * source) * dim * dim + 2 * length * source * dim)


def roi_align_flop_jit(inputs, outputs) -> int:
    """4 multiply-adds per bilinear sample; the adaptive ratio (0) counted as 2 x 2 samples per bin."""
    ratio = inputs[5].toIValue()
    return _numel(get_shape(outputs[0])) * (ratio if ratio > 0 else 2) ** 2 * 4


def baddbmm_flop_jit(inputs, outputs) -> int:
    n, rows, inner = get_shape(inputs[1])
    return n * rows * inner * get_shape(inputs[2])[-1]


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::_native_multi_head_attention": native_mha_flop_jit,
    "aten::baddbmm": baddbmm_flop_jit,
    "torchvision::roi_align": roi_align_flop_jit,
    # Reductions, one add per input element as fvcore counts adaptive_avg_pool2d: CLIP's anti-aliasing
    # average pools, the attention pool's mean token, F.normalize of the score map.
    "aten::avg_pool2d": elementwise_flop_counter(1, 0),
    "aten::mean": elementwise_flop_counter(1, 0),
    "aten::linalg_vector_norm": elementwise_flop_counter(1, 0),
}

# No multiply-adds of a layer: elementwise arithmetic and activations (Detectron2's convention, which
# also ignores eval-mode batch norm, an elementwise affine), lookups, views and comparisons.
IGNORED_OPS = [
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div",
    "aten::div_", "aten::neg", "aten::reciprocal", "aten::exp", "aten::log2", "aten::sqrt", "aten::pow",
    "aten::batch_norm", "aten::gelu", "aten::sigmoid", "aten::sigmoid_", "aten::softmax", "aten::clamp_min",
    "aten::embedding", "aten::expand_as", "aten::unflatten", "aten::pad", "aten::meshgrid",
    "aten::nonzero_numpy", "aten::repeat_interleave", "aten::argmax", "aten::argsort", "aten::sort",
    "aten::topk", "aten::max_pool2d", "torchvision::nms",
]
DETECTION_HANDLES = {**EXTRA_HANDLES, **{op: None for op in IGNORED_OPS}}


def conv_output_size_flop_jit(inputs, outputs) -> int:
    """Any convolution, transposed ones too, as fvcore counted it until 2021-10-27: batch x prod(weight
    shape) x the OUTPUT's spatial size (fvcore now counts a transposed convolution over its input, 4x
    less for a 2 x 2 stride-2 one)."""
    return get_shape(inputs[0])[0] * _numel(get_shape(inputs[1])) * _numel(get_shape(outputs[0])[2:])


#: The segmentation release's convention (its get_flops.py --fvcore, with the fvcore and torch 1.x of
#: 2021), applied to semantic segmentors; each rule in words for the reports.
SEGMENTATION_RULES = [
    "one 1 x 3 x H x W input, whole-image forward up to the logits at the input size (no sliding window)",
    "1 multiply-add = 1 flop; convolutions, linear layers, matmul/einsum, norms (batch norm 2, layer and "
    "group norm 5 per element) and bilinear (4) / nearest (1 per output element) resizing as fvcore counts them",
    "attention products q k^T and attention x v counted (torch 1.x traced them as bmm; torch 2's fused "
    "scaled_dot_product_attention is otherwise skipped)",
    "transposed convolutions counted over their output size (fvcore's rule before 2021-10-27)",
    "pooling, reductions, activations and elementwise arithmetic not counted",
    "text encoder excluded (its output is cached; counted apart)",
]
SEGMENTATION_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::_native_multi_head_attention": native_mha_flop_jit,
    "aten::baddbmm": baddbmm_flop_jit,
    "aten::_convolution": conv_output_size_flop_jit,
    **{op: None for op in IGNORED_OPS if op != "aten::batch_norm"},
    **{op: None for op in ("aten::avg_pool2d", "aten::mean", "aten::linalg_vector_norm", "aten::max_pool2d",
                           "aten::relu", "aten::relu_", "aten::dropout", "aten::feature_dropout")},
}

# Detectron2 and torchvision helpers that run as TorchScript functions while tracing: bookkeeping
# without multiply-adds. Any other scripted function is reported as unsupported (its ops are hidden).
SCRIPTED_HELPERS = ["move_device_like", "_convert_boxes_to_pooler_format", "_create_zeros", "_batched_nms_coordinate_trick"]


class FlopReport:
    """Flops summed over several fvcore analyses: total, per module name and per operator, plus the
    ops without a handle. Module names of an analysis can be put under a prefix."""

    def __init__(self):
        self.by_module, self.by_operator, self.unsupported = Counter(), Counter(), Counter()

    @property
    def total(self) -> float:
        return self.by_module[""]

    def add(self, analysis, prefix: str = "", strip: str = "", handles: Optional[dict] = None) -> "FlopReport":
        """Add an fvcore analysis, counted with ``handles`` (default: the detectors' convention)."""
        calls = Counter()

        def call_function(inputs, outputs) -> int:
            calls[inputs[0].node().s("name")] += 1
            return 0

        analysis.set_op_handle(**(DETECTION_HANDLES if handles is None else handles))
        analysis.set_op_handle("prim::CallFunction", call_function)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        for name, flops in analysis.by_module().items():
            if strip and name == strip.rstrip("."):
                # The wrapped model: ops it runs through methods (not a submodule's call) are booked
                # to the analysis's root, whose total is the one kept.
                continue
            if name.startswith(strip):
                name = name[len(strip):]
            elif name:
                continue
            self.by_module[".".join(p for p in (prefix, name) if p)] += flops
            if prefix and not name:
                self.by_module[""] += flops
        self.by_operator.update({k: v for k, v in analysis.by_operator().items() if v})
        self.unsupported.update(analysis.unsupported_ops())
        self.unsupported.update({f"prim::CallFunction[{f}]": n for f, n in calls.items() if f not in SCRIPTED_HELPERS})
        return self

    def scaled(self, factor: float) -> "FlopReport":
        report = FlopReport()
        report.by_module = Counter({k: v * factor for k, v in self.by_module.items()})
        report.by_operator = Counter({k: v * factor for k, v in self.by_operator.items()})
        report.unsupported = self.unsupported
        return report


def text_encoders(model: nn.Module) -> List[ContextTextEncoder]:
    """The text encoder of a DenseCLIP model (none for a CLIP baseline)."""
    return [model.score_map.text_encoder] if isinstance(model, DenseCLIPModel) else []


class _Encode(nn.Module):
    def __init__(self, encoder: ContextTextEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, token_ids):
        return self.encoder.encode(token_ids)


class _FirstStage(nn.Module):
    """Backbone + proposal generator of a GeneralizedRCNN on a preprocessed batch (same module names)."""

    def __init__(self, model: GeneralizedRCNN, image_sizes: List[Tuple[int, int]]):
        super().__init__()
        self.backbone, self.proposal_generator, self.image_sizes = model.backbone, model.proposal_generator, image_sizes

    def forward(self, images: torch.Tensor):
        features = self.backbone(images)
        proposals, _ = self.proposal_generator(ImageList(images, self.image_sizes), features)
        return tuple(features.values()) + tuple(p.proposal_boxes.tensor for p in proposals)


class _RoIBranch(nn.Module):
    """A pooler and the ROI-head modules after it (same names as in the ROI heads), on R boxes (R x 4)."""

    def __init__(self, roi_heads: nn.Module, names: Tuple[str, ...]):
        super().__init__()
        self.names = names
        for name in names:
            setattr(self, name, getattr(roi_heads, name))

    def forward(self, boxes: torch.Tensor, *features: torch.Tensor):
        x = getattr(self, self.names[0])(list(features), [Boxes(boxes)])
        for name in self.names[1:]:
            module = getattr(self, name)
            x = module.layers(x) if name == "mask_head" else module(x)  # the layers, not the loss/inference
        return x


def dummy_boxes(num_boxes: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """num_boxes x 4 boxes (x0, y0, x1, y1) inside an H x W image, 16 to 512 px wide and high."""
    generator = torch.Generator().manual_seed(seed)
    size = torch.empty(num_boxes, 2).uniform_(16, 512, generator=generator)
    size = torch.minimum(size, torch.tensor([float(width), float(height)]))
    corner = torch.rand(num_boxes, 2, generator=generator) * (torch.tensor([width, height]) - size)
    return torch.cat([corner, corner + size], dim=1)


def _rcnn_flops(model: GeneralizedRCNN, batched_inputs: List[dict], num_boxes: int, num_masks: int) -> FlopReport:
    images = model.preprocess_image(batched_inputs)
    report = FlopReport().add(FlopCountAnalysis(_FirstStage(model, images.image_sizes), (images.tensor,)))
    features = model.backbone(images.tensor)
    heads, (height, width) = model.roi_heads, images.image_sizes[0]
    branches = [(heads.box_in_features, num_boxes, ("box_pooler", "box_head", "box_predictor"))]
    if getattr(heads, "mask_on", False):
        branches.append((heads.mask_in_features, num_masks, ("mask_pooler", "mask_head")))
    for seed, (in_features, count, names) in enumerate(branches):
        boxes = dummy_boxes(count, height, width, seed).to(images.tensor.device)
        inputs = (boxes, *(features[f] for f in in_features))
        report.add(FlopCountAnalysis(_RoIBranch(heads, names), inputs), prefix="roi_heads")
    return report


class _WholeImage(nn.Module):
    """A semantic segmentor's whole-image forward on a normalised batch: B x K x H x W logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = ImageList(images, [tuple(images.shape[-2:])] * len(images))
        return self.model.predict(batch, [{} for _ in range(len(images))])["sem_seg"]


def _semantic_flops(model: nn.Module, batched_inputs: List[dict]) -> FlopReport:
    images = [(x["image"].to(model.device) - model.pixel_mean) / model.pixel_std for x in batched_inputs]
    images = ImageList.from_tensors(images, model.backbone.size_divisibility).tensor
    return FlopReport().add(FlopCountAnalysis(_WholeImage(model), (images,)), strip="model.", handles=SEGMENTATION_HANDLES)


def count_flops(
    model: nn.Module, batched_inputs: List[dict], num_boxes: int = NUM_BOX_PROPOSALS, num_masks: int = NUM_MASK_BOXES
) -> Tuple[FlopReport, FlopReport]:
    """
    (inference, text encoder) flops of an eval-mode model on one input (a list of one Detectron2
    input dict), in the paper's convention (for semantic segmentors the segmentation release's:
    :data:`SEGMENTATION_RULES`). The inference runs with the text embeddings frozen (computed once, as
    an exported graph holds them), so the text encoder stays out of its trace; its own count is one run
    on its training classes.
    """
    if model.training:
        raise ValueError("Count flops of a model in eval mode")
    task, text = task_of(model), FlopReport()
    handles = SEGMENTATION_HANDLES if task.semantic_segmentation else None
    with torch.no_grad():
        for encoder in text_encoders(model):
            text.add(FlopCountAnalysis(_Encode(encoder), (encoder.token_ids,)), handles=handles)
        guided = isinstance(model, DenseCLIPModel)
        with model.score_map.frozen_text_embeddings() if guided else nullcontext():
            if task.semantic_segmentation:
                inference = _semantic_flops(model, batched_inputs)
            elif isinstance(model, GeneralizedRCNN):
                inference = _rcnn_flops(model, batched_inputs, num_boxes, num_masks)
            else:
                inference = FlopReport().add(DetectorFlopCountAnalysis(model, batched_inputs), strip="model.")
    return inference, text


def parameter_split(model: nn.Module) -> Dict[str, int]:
    """``inference``: all parameters but the frozen text encoders' (their output is cached), the
    learnable contexts included; ``text_encoder``: the frozen rest."""
    frozen = {id(p) for e in text_encoders(model) for n, p in e.named_parameters() if n != "contexts"}
    sizes = {id(p): p.numel() for p in model.parameters()}
    text = sum(n for key, n in sizes.items() if key in frozen)
    return {"inference": sum(sizes.values()) - text, "text_encoder": text}
