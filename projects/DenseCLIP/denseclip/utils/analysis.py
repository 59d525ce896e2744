"""
FLOP and parameter counts of CLIP / DenseCLIP detectors in the convention of the paper's tables
(DESIGN.md, "How the table's FLOPs were counted"):

- one multiply-add is one flop (fvcore), model in eval mode under no_grad, weights irrelevant;
  normalisation layers count as fvcore counts them (eval batch norm: 1 per element);
- inference FLOPs leave the text encoder out: its K x D output is cached, so it runs once per class
  set, not per image. Its own FLOPs are counted separately by tracing ``ContextTextEncoder.encode``;
- RetinaNet: the whole inference is traced;
- two-stage detectors: backbone + proposal generator are traced on the image, the ROI heads on a
  fixed dummy workload (box pooler + box head + predictor on 1000 boxes, mask pooler + mask head
  layers on 100 boxes), whatever real inference on the image would keep.

fvcore counts convolutions, linear layers, matmuls, einsum, norms and upsampling; the handles below
add the attention kernels and the other ops these models use, and ``IGNORED_OPS`` lists, with the
reason, the ops deliberately counted as zero. Anything else is reported as unsupported.
"""
import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from fvcore.nn import FlopCountAnalysis as ModuleFlopCountAnalysis
from fvcore.nn.jit_handles import elementwise_flop_counter, get_shape
from torch import nn

from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Boxes, ImageList
from detectron2.utils.analysis import FlopCountAnalysis as DetectorFlopCountAnalysis

from ..modeling.text_encoder import ContextTextEncoder

__all__ = [
    "EXTRA_HANDLES",
    "IGNORED_OPS",
    "SCRIPTED_HELPERS",
    "FlopCount",
    "FlopReport",
    "analyze_flops",
    "cached_text_embeddings",
    "count_inference_flops",
    "count_module_flops",
    "count_rcnn_flops",
    "count_text_encoder_flops",
    "mean_count",
    "parameter_split",
    "rcnn_workload",
]

NUM_BOX_PROPOSALS = 1000
NUM_MASK_BOXES = 100


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def sdpa_flop_jit(inputs, outputs) -> int:
    """
    aten::scaled_dot_product_attention(q, k, v, ...): q (..., L, E), k (..., S, E), v (..., S, Ev).
    Flops of Q K^T plus those of softmax(.) V: batch * L * S * (E + Ev). A causal mask is counted
    dense, like the matmuls a causal attention is usually written with.
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    return _prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def native_mha_flop_jit(inputs, outputs) -> int:
    """
    aten::_native_multi_head_attention (nn.MultiheadAttention's inference fast path), a whole
    attention layer in one op: query (B, L, E), key/value (B, S, E). Input projections of q (L
    tokens) and k, v (S tokens), the two attention products and the output projection.
    """
    query, key = get_shape(inputs[0]), get_shape(inputs[1])
    batch, length, dim = _prod(query[:-2]), query[-2], query[-1]
    source = key[-2]
    projections = (2 * length + 2 * source) * dim * dim
    attention = 2 * length * source * dim
    return batch * (projections + attention)


def roi_align_flop_jit(inputs, outputs) -> int:
    """
    torchvision::roi_align(features, rois, scale, ph, pw, sampling_ratio, aligned) -> (R, C, ph, pw):
    one bilinear interpolation (4 multiply-adds) per sampling point. The adaptive sampling ratio
    (0, Detectron2's default) depends on each box's size; it is counted as 2 x 2 points per bin,
    what a box gets at its canonical FPN level.
    """
    ratio = inputs[5].toIValue()
    points = (ratio if ratio > 0 else 2) ** 2
    return _prod(get_shape(outputs[0])) * points * 4


def baddbmm_flop_jit(inputs, outputs) -> int:
    """aten::baddbmm(input, batch1 (N, n, m), batch2 (N, m, p), ...): N * n * m * p."""
    n, rows, inner = get_shape(inputs[1])
    return n * rows * inner * get_shape(inputs[2])[-1]


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::_native_multi_head_attention": native_mha_flop_jit,
    "aten::baddbmm": baddbmm_flop_jit,
    "torchvision::roi_align": roi_align_flop_jit,
    # Reductions, counted like fvcore counts adaptive_avg_pool2d: one add per input element.
    "aten::avg_pool2d": elementwise_flop_counter(1, 0),  # CLIP's stem and anti-aliased downsampling
    "aten::mean": elementwise_flop_counter(1, 0),  # the attention pool's mean token
    "aten::linalg_vector_norm": elementwise_flop_counter(1, 0),  # F.normalize of the score map
}

# Ops without multiply-adds, counted as zero on purpose: those met in the 8 COCO models and the
# tiny test models, plus the rest of Detectron2's own ignore list (utils/analysis.py), which this
# extends. fvcore itself already ignores relu, cat, reshapes, indexing and the like.
IGNORED_OPS = {
    # Elementwise arithmetic (fvcore / Detectron2 convention: only the multiply-adds of layers
    # count): residual additions, pixel normalisation, box decoding, the score map's 1 / tau.
    "aten::add": "elementwise",
    "aten::add_": "elementwise",
    "aten::sub": "elementwise",
    "aten::rsub": "elementwise",
    "aten::mul": "elementwise",
    "aten::mul_": "elementwise",
    "aten::div": "elementwise",
    "aten::div_": "elementwise",
    "aten::neg": "elementwise",
    "aten::reciprocal": "elementwise",
    "aten::exp": "elementwise (box decoding)",
    "aten::log2": "elementwise (FPN level of each box)",
    "aten::sqrt": "elementwise (box sizes)",
    # Activations and normalised scores, as fvcore ignores relu.
    "aten::gelu": "activation (context decoder and text encoder MLPs)",
    "aten::sigmoid": "activation (scores)",
    "aten::sigmoid_": "activation (scores)",
    "aten::softmax": "scores",
    "aten::clamp_min": "clamp (F.normalize's eps)",
    # Lookups, views, padding and casts.
    "aten::embedding": "table lookup (token embeddings)",
    "aten::expand_as": "view",
    "aten::unflatten": "view",
    "aten::unbind": "view",
    "aten::split_with_sizes": "view",
    "aten::stack": "concatenation",
    "aten::pad": "padding to a multiple of 32",
    "aten::constant_pad_nd": "padding",
    "aten::to": "dtype or device cast",
    "aten::meshgrid": "anchor grid",
    "aten::nonzero_numpy": "indexing",
    "aten::repeat_interleave": "indexing",
    # Comparisons: top-k candidates, NMS, the end token's argmax, the max-pooled P6.
    "aten::argmax": "comparison",
    "aten::argsort": "comparison",
    "aten::sort": "comparison",
    "aten::topk": "comparison",
    "aten::max_pool2d": "comparison",
    "torchvision::nms": "comparison of box overlaps",
}

# Detectron2 / torchvision helpers run as TorchScript functions while tracing (prim::CallFunction):
# bookkeeping around the layers, without multiply-adds. A call to any other function is reported as
# unsupported, since its ops are hidden from the counter.
SCRIPTED_HELPERS = {
    "move_device_like": "device cast",
    "_convert_boxes_to_pooler_format": "prepends batch indices to boxes",
    "_create_zeros": "allocates the pooler output",
    "_batched_nms_coordinate_trick": "torchvision's batched NMS",
}


def _scaled(counter: Counter, factor: float) -> Counter:
    return Counter({k: v * factor for k, v in counter.items()})


@dataclass
class FlopCount:
    """
    Flops per module name ("" is the whole model) and per operator; how often each op with no
    handle (``unsupported``) and each deliberately ignored op (``ignored``) was met.
    """

    by_module: Counter = field(default_factory=Counter)
    by_operator: Counter = field(default_factory=Counter)
    unsupported: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)

    @property
    def total(self) -> float:
        return self.by_module[""]

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(
            self.by_module + other.by_module,
            self.by_operator + other.by_operator,
            self.unsupported + other.unsupported,
            self.ignored + other.ignored,
        )

    def scaled(self, factor: float) -> "FlopCount":
        """Flops times ``factor``; op occurrences unchanged."""
        return FlopCount(
            _scaled(self.by_module, factor), _scaled(self.by_operator, factor), self.unsupported, self.ignored
        )

    def top_level(self) -> Dict[str, float]:
        """Flops of each direct child module, plus "(other)" for ops outside all of them."""
        children = {k: v for k, v in self.by_module.items() if k and "." not in k}
        rest = self.total - sum(children.values())
        if abs(rest) > 1e-6 * max(self.total, 1):
            children["(other)"] = rest
        return children


def mean_count(counts: Sequence[FlopCount]) -> FlopCount:
    """Mean flops of several inputs' counts; op occurrences are the most met in one input."""
    total = FlopCount()
    for count in counts:
        total = total + count
    mean = total.scaled(1.0 / len(counts))
    mean.unsupported, mean.ignored = Counter(), Counter()
    for count in counts:
        mean.unsupported |= count.unsupported
        mean.ignored |= count.ignored
    return mean


def _prefixed(counter: Counter, prefix: str) -> Counter:
    """Module names relative to a parent ``prefix`` ("" stays the root and gains the parent)."""
    if not prefix:
        return Counter(counter)
    out = Counter({f"{prefix}.{k}" if k else prefix: v for k, v in counter.items()})
    out[""] = counter[""]
    return out


def _configured(analysis) -> Tuple[object, Counter, Counter]:
    """
    Install the handles; ignored ops and known scripted helpers get handles that count zero flops
    but record the op, scripted functions not in SCRIPTED_HELPERS are recorded as unsupported.
    fvcore's own warnings are silenced: the caller reports. Returns (analysis, ignored, unknown).
    """
    ignored, unknown = Counter(), Counter()

    def ignore(op: str):
        def handle(inputs, outputs) -> int:
            ignored[op] += 1
            return 0

        return handle

    def call_function(inputs, outputs) -> int:
        op = f"prim::CallFunction[{inputs[0].node().s('name')}]"
        (ignored if op[len("prim::CallFunction["):-1] in SCRIPTED_HELPERS else unknown)[op] += 1
        return 0

    analysis.set_op_handle(**EXTRA_HANDLES)
    analysis.set_op_handle(**{op: ignore(op) for op in IGNORED_OPS})
    analysis.set_op_handle("prim::CallFunction", call_function)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis, ignored, unknown


def _collect(analysis, prefix: str = "", strip: str = "") -> FlopCount:
    """Read an fvcore analysis into a FlopCount, renaming ``strip``-ed modules under ``prefix``."""
    analysis, ignored, unknown = _configured(analysis)
    by_module = Counter()
    for name, flops in analysis.by_module().items():
        if name == strip.rstrip("."):
            by_module[""] += flops
        elif name.startswith(strip):
            by_module[name[len(strip):]] += flops
    by_operator = Counter({k: v for k, v in analysis.by_operator().items() if v})
    unsupported = Counter(analysis.unsupported_ops()) + unknown
    return FlopCount(_prefixed(by_module, prefix), by_operator, unsupported, ignored)


def count_module_flops(module: nn.Module, inputs: Tuple, prefix: str = "") -> FlopCount:
    """Trace ``module(*inputs)`` (tensors) under no_grad; module names are put under ``prefix``."""
    with torch.no_grad():
        return _collect(ModuleFlopCountAnalysis(module, inputs), prefix)


def _text_encoders(model: nn.Module) -> List[ContextTextEncoder]:
    return [m for m in model.modules() if isinstance(m, ContextTextEncoder)]


@contextlib.contextmanager
def cached_text_embeddings(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, text encoders cache their output (``enabled``) and the caches are filled."""
    encoders = _text_encoders(model)
    saved = [e.cache_in_eval for e in encoders]
    try:
        for encoder in encoders:
            encoder.cache_in_eval = enabled
            if enabled and not encoder.training:
                with torch.no_grad():
                    encoder()
        yield
    finally:
        for encoder, cache in zip(encoders, saved):
            encoder.cache_in_eval = cache


class _Encode(nn.Module):
    """Calls ``ContextTextEncoder.encode`` (the forward may just return the cache)."""

    def __init__(self, text_encoder: ContextTextEncoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self):
        return self.text_encoder.encode()


def count_text_encoder_flops(model: nn.Module) -> FlopCount:
    """Flops of one run of each text encoder of the model (K prompts through the transformer)."""
    count = FlopCount()
    for encoder in _text_encoders(model):
        count = count + count_module_flops(_Encode(encoder), ())
    return count


class _BackboneAndProposals(nn.Module):
    """Backbone + proposal generator of a GeneralizedRCNN on preprocessed images (B x 3 x H x W)."""

    def __init__(self, model: GeneralizedRCNN, image_sizes: List[Tuple[int, int]]):
        super().__init__()
        self.backbone = model.backbone
        self.proposal_generator = model.proposal_generator
        self.image_sizes = image_sizes

    def forward(self, images: torch.Tensor):
        features = self.backbone(images)
        proposals, _ = self.proposal_generator(ImageList(images, self.image_sizes), features)
        return tuple(features.values()) + tuple(p.proposal_boxes.tensor for p in proposals)


class _BoxHead(nn.Module):
    """Box pooler + box head + box predictor on R boxes (R x 4, one image)."""

    def __init__(self, roi_heads):
        super().__init__()
        self.box_pooler = roi_heads.box_pooler
        self.box_head = roi_heads.box_head
        self.box_predictor = roi_heads.box_predictor

    def forward(self, boxes: torch.Tensor, *features: torch.Tensor):
        x = self.box_head(self.box_pooler(list(features), [Boxes(boxes)]))
        return self.box_predictor(x)


class _MaskHead(nn.Module):
    """Mask pooler + the mask head's layers (convs, deconv, predictor) on R boxes (R x 4, one image)."""

    def __init__(self, roi_heads):
        super().__init__()
        self.mask_pooler = roi_heads.mask_pooler
        self.mask_head = roi_heads.mask_head

    def forward(self, boxes: torch.Tensor, *features: torch.Tensor):
        return self.mask_head.layers(self.mask_pooler(list(features), [Boxes(boxes)]))


def dummy_boxes(num_boxes: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """num_boxes x 4 boxes (x0, y0, x1, y1) inside an H x W image, 16 to 512 px wide and high."""
    generator = torch.Generator().manual_seed(seed)
    size = torch.empty(num_boxes, 2).uniform_(16, 512, generator=generator)
    size = torch.minimum(size, torch.tensor([float(width), float(height)]))
    corner = torch.rand(num_boxes, 2, generator=generator) * (torch.tensor([width, height]) - size)
    return torch.cat([corner, corner + size], dim=1)


def count_rcnn_flops(
    model: GeneralizedRCNN,
    batched_inputs: List[dict],
    num_box_proposals: int = NUM_BOX_PROPOSALS,
    num_mask_boxes: int = NUM_MASK_BOXES,
) -> FlopCount:
    """
    Backbone + proposal generator traced on one image, plus the ROI heads on a fixed workload:
    the box branch on ``num_box_proposals`` boxes, the mask branch on ``num_mask_boxes``.
    """
    if len(batched_inputs) != 1:
        raise ValueError("Count flops one image at a time")
    with torch.no_grad():
        images = model.preprocess_image(batched_inputs)
        first_stage = _BackboneAndProposals(model, images.image_sizes)
        count = count_module_flops(first_stage, (images.tensor,))
        features = model.backbone(images.tensor)
    roi_heads = model.roi_heads
    height, width = images.image_sizes[0]
    box_features = [features[f] for f in roi_heads.box_in_features]
    boxes = dummy_boxes(num_box_proposals, height, width).to(images.tensor.device)
    count = count + count_module_flops(_BoxHead(roi_heads), (boxes, *box_features), "roi_heads")
    if getattr(roi_heads, "mask_on", False):
        mask_features = [features[f] for f in roi_heads.mask_in_features]
        boxes = dummy_boxes(num_mask_boxes, height, width, seed=1).to(images.tensor.device)
        count = count + count_module_flops(_MaskHead(roi_heads), (boxes, *mask_features), "roi_heads")
    return count


def count_inference_flops(model: nn.Module, batched_inputs: List[dict]) -> FlopCount:
    """
    Flops of the model on one input (a list of one Detectron2 input dict), eval mode: the R-CNN
    dummy-head convention for GeneralizedRCNN (and subclasses), the whole traced inference otherwise.
    The text encoder is traced only if it does not cache its output (or its cache is empty).
    """
    if model.training:
        # Not switched here: the caller owns the mode (and the text caches it fills in eval mode).
        raise ValueError("Count flops of a model in eval mode")
    if isinstance(model, GeneralizedRCNN):
        return count_rcnn_flops(model, batched_inputs)
    with torch.no_grad():
        return _collect(DetectorFlopCountAnalysis(model, batched_inputs), strip="model.")


@dataclass
class FlopReport:
    """Mean flops over the inputs, with the text encoder counted apart."""

    inference: FlopCount  # text encoder excluded (cached output)
    text_encoder: FlopCount  # one run of the text encoder
    num_inputs: int

    @property
    def total_with_text_encoder(self) -> float:
        return self.inference.total + self.text_encoder.total

    @property
    def unsupported(self) -> Counter:
        return self.inference.unsupported + self.text_encoder.unsupported

    @property
    def ignored(self) -> Counter:
        return self.inference.ignored + self.text_encoder.ignored


def analyze_flops(model: nn.Module, inputs: Sequence[List[dict]]) -> FlopReport:
    """
    The paper's convention on each of ``inputs`` (lists of one Detectron2 input dict), averaged:
    text embeddings cached (whatever MODEL.DENSECLIP.CACHE_TEXT_EMBEDDINGS says) so the text
    encoder stays out of the trace, and its own flops counted once.
    """
    model.eval()
    with cached_text_embeddings(model):
        counts = [count_inference_flops(model, batch) for batch in inputs]
    return FlopReport(mean_count(counts), count_text_encoder_flops(model), len(counts))


def parameter_split(model: nn.Module) -> Dict[str, int]:
    """
    ``inference``: parameters of the deployed model, i.e. all but the frozen CLIP text encoder's
    (its output is cached), its learnable contexts included; ``text_encoder``: the frozen rest.
    """
    frozen_text = {
        id(p)
        for encoder in _text_encoders(model)
        for name, p in encoder.named_parameters()
        if name != "contexts"
    }
    params = {id(p): p.numel() for p in model.parameters()}
    text = sum(n for key, n in params.items() if key in frozen_text)
    return {"inference": sum(params.values()) - text, "text_encoder": text}


def rcnn_workload(model: nn.Module) -> Optional[Dict[str, int]]:
    """The dummy ROI-head workload counted for a two-stage model, None for other models."""
    if not isinstance(model, GeneralizedRCNN):
        return None
    workload = {"box_proposals": NUM_BOX_PROPOSALS}
    if getattr(model.roi_heads, "mask_on", False):
        workload["mask_boxes"] = NUM_MASK_BOXES
    return workload
