"""
Export a DenseCLIP model by tracing, as one graph from a resized image to the predictor's outputs.

Graph inputs: ``image`` (3 x h x w float32, 0..255, in INPUT.FORMAT's channel order, resized by the
config's test rule), ``height`` and ``width`` (int64 scalars, the original image's size).
Graph outputs, by name (listed in the file's metadata): ``boxes`` (N x 4, XYXY on the original image),
``scores`` (N), ``classes`` (N, int64), ``masks`` (N x H x W, bool; Mask R-CNN), ``sem_seg``
(C x H x W logits; semantic segmentors), ``score_maps`` (K x H x W score-map logits, when asked).

The text embeddings depend only on the learned contexts and the names, so they are computed at export
and stored in the graph (:class:`BakedTextEmbeddings`); the text encoder is not part of it. The
context decoder attends to the image and stays in the graph.
"""
import json
import os
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.export import TracingAdapter, dump_torchscript_IR

from ..modeling.meta_arch.denseclip import DenseCLIPDetector, DenseCLIPModel

__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_METHODS",
    "METADATA_NAME",
    "ONNX_OPSET",
    "BakedTextEmbeddings",
    "check_exportable",
    "export_model",
    "max_input_side",
]

EXPORT_FORMATS = ("torchscript", "onnx")
EXPORT_METHODS = ("tracing", "scripting")
# The TorchScript-based ONNX exporter (torch.onnx.export(..., dynamo=False)); opset 16 is the first
# whose RoiAlign has the half-pixel offset of Detectron2's ROIAlign(aligned=True).
ONNX_OPSET = 17
#: The exported file's description (JSON): a TorchScript extra file, an ONNX metadata entry.
METADATA_NAME = "denseclip_export.json"
INPUT_NAMES = ("image", "height", "width")


class BakedTextEmbeddings(nn.Module):
    """
    Stands in for the ContextTextEncoder in an exported graph: the K x D text embeddings of the
    training classes and of one inference vocabulary, computed once by the encoder and kept as
    buffers. ``forward(class_names)`` returns the embeddings of those names.
    """

    def __init__(self, text_encoder: nn.Module, vocabulary: Optional[Sequence[str]] = None):
        super().__init__()
        self.class_names = list(text_encoder.class_names)
        self.vocabulary = list(vocabulary) if vocabulary is not None else None
        with torch.no_grad():
            self.register_buffer("class_embeddings", text_encoder(None).detach().clone())
            if self.vocabulary is not None:
                self.register_buffer("vocabulary_embeddings", text_encoder(self.vocabulary).detach().clone())

    def forward(self, class_names: Optional[Sequence[str]] = None) -> torch.Tensor:
        names = self.class_names if class_names is None else list(class_names)
        if names == self.class_names:
            return self.class_embeddings
        if names == self.vocabulary:
            return self.vocabulary_embeddings
        raise ValueError(f"No text embeddings were computed for {names}; export with --vocabulary naming them")


@contextmanager
def baked_text_embeddings(model: nn.Module, vocabulary: Optional[Sequence[str]]):
    """Within the context, ``model``'s text encoder is replaced by its :class:`BakedTextEmbeddings`."""
    score_map = model.backbone.score_map
    text_encoder = score_map.text_encoder
    score_map.text_encoder = BakedTextEmbeddings(text_encoder, vocabulary)
    try:
        yield
    finally:
        score_map.text_encoder = text_encoder


def max_input_side(cfg, model: nn.Module) -> Optional[int]:
    """
    The largest side (pixels, after resizing) an exported graph of ``model`` handles, or None.

    An attention pool that takes the top-left part of its positional grid (MODEL.CLIP.ATTENTION_POOL_GRID
    "crop") interpolates the grid instead when the feature map is larger; tracing records only the
    branch the sample took, so the graph keeps images within the grid (the sample always is: see
    :func:`check_exportable`). "resize" resizes the grid to every feature map: any size.
    """
    backbone = model.backbone
    pool = getattr(backbone.bottom_up, "attnpool", None)
    if pool is None or cfg.MODEL.CLIP.ATTENTION_POOL_GRID != "crop":
        return None
    side = int(round((pool.positional_embedding.shape[0] - 1) ** 0.5))
    return side * backbone.bottom_up.output_shape()[backbone.in_feature].stride


def check_exportable(cfg, model: nn.Module, fmt: str, method: str) -> None:
    """Refuse, with the option that works, what the chosen format or method cannot represent."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if method not in EXPORT_METHODS:
        raise ValueError(f"--export-method must be one of {EXPORT_METHODS}, got {method!r}")
    if not isinstance(model, DenseCLIPModel):
        raise ValueError(
            f"Export covers DenseCLIP meta-architectures (DenseCLIPRetinaNet, DenseCLIPRCNN, "
            f"DenseCLIPSemanticSegmentor); MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}. A CLIP "
            f"baseline on a stock Detectron2 meta-architecture exports with Detectron2's own "
            f"tools/deploy/export_model.py."
        )
    if method == "scripting":
        raise ValueError(
            "--export-method scripting cannot compile DenseCLIP models: the CLIP image encoder iterates "
            "over Python lists of stages, and the score map looks up text embeddings by class names, "
            "which TorchScript's compiler does not accept. Use --export-method tracing (the default): it "
            "records the same computation, for any image size the input rules allow."
        )
    if cfg.TEST.AUG.ENABLED:
        raise ValueError("Test-time augmentation (TEST.AUG.ENABLED) is not part of an exported graph; set it False")
    if getattr(model, "test_mode", "whole") != "whole":
        raise ValueError(
            f"TEST.SEM_SEG.MODE {model.test_mode}: the number of windows depends on the image size, which a "
            f"traced graph fixes at the sample's. Export with TEST.SEM_SEG.MODE whole (the resized image at "
            f"once; any size)."
        )
    side = max_input_side(cfg, model)
    if side is not None and cfg.INPUT.MAX_SIZE_TEST > side:
        raise ValueError(
            f"INPUT.MAX_SIZE_TEST {cfg.INPUT.MAX_SIZE_TEST} is larger than the attention pool's positional "
            f"grid covers ({side} px = MODEL.CLIP.INPUT_RESOLUTION): larger images interpolate the grid, "
            f"a branch a traced graph cannot switch to. Export with INPUT.MAX_SIZE_TEST {side} or less."
        )
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError as e:
            raise ValueError("--format onnx needs the onnx package: pip install .[export] (onnx, onnxruntime)") from e


def _flat_outputs(model: nn.Module, image: torch.Tensor, height: torch.Tensor, width: torch.Tensor):
    """The model's output for one image as {name: tensor} (names of the module docstring)."""
    (output,) = model([{"image": image, "height": height, "width": width}])
    flat = {}
    if "instances" in output:
        instances = output["instances"]
        flat.update(boxes=instances.pred_boxes.tensor, scores=instances.scores, classes=instances.pred_classes)
        if instances.has("pred_masks"):
            flat["masks"] = instances.pred_masks
    for name in ("sem_seg", "score_maps"):
        if name in output:
            flat[name] = output[name]
    return flat


@contextmanager
def _export_mode(model: nn.Module, score_maps: bool, vocabulary: Optional[Sequence[str]]):
    """Eval mode, score maps of ``vocabulary`` (or of the classes) on or off, text embeddings baked."""
    saved = model.training, model.return_score_maps, model.vocabulary
    model.eval()
    model.return_score_maps = score_maps or vocabulary is not None
    model.vocabulary = vocabulary
    try:
        with baked_text_embeddings(model, model.vocabulary):
            yield
    finally:
        model.train(saved[0])
        model.return_score_maps, model.vocabulary = saved[1], saved[2]


def _metadata(cfg, model: nn.Module, fmt: str, outputs: List[str]) -> Dict:
    detector = isinstance(model, DenseCLIPDetector)
    retinanet = cfg.MODEL.META_ARCHITECTURE == "DenseCLIPRetinaNet"
    score_threshold = cfg.MODEL.RETINANET.SCORE_THRESH_TEST if retinanet else cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST
    return {
        "format": fmt,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "inputs": list(INPUT_NAMES),
        "outputs": outputs,
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "max_input_side": max_input_side(cfg, model),
        "class_names": list(model.backbone.class_names),
        "score_map_names": model.score_map_names if "score_maps" in outputs else [],
        "score_threshold": score_threshold if detector else None,
        "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE if detector else None,
        "mask_threshold": 0.5 if "masks" in outputs else None,
        "torch": torch.__version__,
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
    }


def export_model(
    cfg,
    model: nn.Module,
    image: torch.Tensor,
    original_size: Tuple[int, int],
    output_dir: str,
    fmt: str = "torchscript",
    method: str = "tracing",
    score_maps: bool = False,
    vocabulary: Optional[Sequence[str]] = None,
) -> Tuple[str, Dict]:
    """
    Trace ``model`` on one sample and write ``output_dir``/model.ts (TorchScript, with its code and
    graph dumped beside it) or model.onnx.

    Args:
        image: the sample, 3 x h x w float32 resized as the config's test rule resizes.
        original_size: the sample's (height, width) before resizing.
        score_maps: include "score_maps" (always when ``vocabulary`` is given).
        vocabulary: the names of the score maps (baked in); None for the model's classes.
    Returns:
        the written file's path and its metadata (also stored in the file, under METADATA_NAME).
    """
    check_exportable(cfg, model, fmt, method)
    if vocabulary is not None:
        model.vocabulary = vocabulary  # tokenizes now: a name too long is refused before tracing
        model.vocabulary = None
    sample = (image, torch.tensor(original_size[0]), torch.tensor(original_size[1]))
    with _export_mode(model, score_maps, vocabulary), torch.no_grad():
        adapter = TracingAdapter(model, sample, _flat_outputs)
        if fmt == "torchscript":
            path = os.path.join(output_dir, "model.ts")
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
            metadata = _metadata(cfg, model, fmt, list(adapter.outputs_schema.keys))  # names sorted by the adapter
            torch.jit.save(traced, path, _extra_files={METADATA_NAME: json.dumps(metadata)})
            dump_torchscript_IR(traced, output_dir)
        else:
            path = os.path.join(output_dir, "model.onnx")
            adapter(*adapter.flattened_inputs)  # the output names, before the exporter needs them
            metadata = _metadata(cfg, model, fmt, list(adapter.outputs_schema.keys))
            _export_onnx(adapter, path, metadata)
    return path, metadata


def _export_onnx(adapter: TracingAdapter, path: str, metadata: Dict) -> None:
    import onnx

    outputs = metadata["outputs"]
    dims = {"boxes": ("detections",), "scores": ("detections",), "classes": ("detections",),
            "masks": ("detections", "out_height", "out_width"), "sem_seg": (None, "out_height", "out_width"),
            "score_maps": (None, "out_height", "out_width")}
    dynamic_axes = {"image": {1: "in_height", 2: "in_width"}}
    for name in outputs:
        dynamic_axes[name] = {axis: dim for axis, dim in enumerate(dims[name]) if dim is not None}
    torch.onnx.export(
        adapter, adapter.flattened_inputs, path, dynamo=False, opset_version=ONNX_OPSET,
        input_names=list(INPUT_NAMES), output_names=outputs, dynamic_axes=dynamic_axes,
    )
    graph = onnx.load(path)
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, json.dumps(metadata)
    onnx.save(graph, path)
