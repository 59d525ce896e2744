"""
Export a DenseCLIP model by tracing, as one graph from a resized image to the predictor's outputs.

Graph inputs: ``image`` (3 x h x w float32, 0..255, in INPUT.FORMAT's channel order, resized by the
config's test rule), ``height`` and ``width`` (int64 scalars, the original image's size).
Graph outputs, by name (listed in the file's metadata): ``boxes`` (N x 4, XYXY on the original image),
``scores`` (N), ``classes`` (N, int64), ``masks`` (N x H x W, bool; Mask R-CNN), ``sem_seg``
(C x H x W logits; semantic segmentors), ``score_maps`` (K x H x W score-map logits, when asked).

The text embeddings depend only on the learned contexts and the names, so they are computed at export
and stored in the graph (the score-map module's embeddings, frozen: FrozenTextEmbeddings); the text
encoder is not part of it. The context decoder attends to the image and stays in the graph.
"""
import functools
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from detectron2.export import TracingAdapter, dump_torchscript_IR

from ..modeling import DenseCLIPModel, Vocabulary, task_of

__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_METHODS",
    "METADATA_NAME",
    "ONNX_OPSET",
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
    if task_of(model).semantic_segmentation and model.test_mode != "whole":
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


def _flat_outputs(
    model: nn.Module, image: torch.Tensor, height: torch.Tensor, width: torch.Tensor, vocabulary: Optional[Vocabulary]
):
    """The model's output for one image as {name: tensor} (names of the module docstring); score maps when
    asked for, as ``vocabulary`` (the classes' own as the classes' vocabulary)."""
    inputs = {"image": image, "height": height, "width": width}
    if vocabulary is not None:
        inputs["vocabulary"] = vocabulary
    (output,) = model([inputs])
    flat = {}
    if "instances" in output:
        instances = output["instances"]
        flat.update(boxes=instances.pred_boxes.tensor, scores=instances.scores, classes=instances.pred_classes)
        if instances.has("pred_masks"):
            flat["masks"] = instances.pred_masks
    if "sem_seg" in output:
        flat["sem_seg"] = output["sem_seg"]
    if vocabulary is not None:
        flat["score_maps"] = output["score_maps"]
    return flat


def _metadata(cfg, model: nn.Module, fmt: str, outputs: List[str], vocabulary: Optional[Vocabulary]) -> Dict:
    task = task_of(model)
    detector = task.detection
    score_threshold = functools.reduce(getattr, task.score_threshold_key.split("."), cfg) if detector else None
    return {
        "format": fmt,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "inputs": list(INPUT_NAMES),
        "outputs": outputs,
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "resize_backend": cfg.INPUT.RESIZE_BACKEND,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "max_input_side": max_input_side(cfg, model),
        "class_names": model.class_names,
        "score_map_names": list(vocabulary.names) if "score_maps" in outputs else [],
        "score_threshold": score_threshold,
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
    vocabulary: Union[None, str, Sequence[str]] = None,
) -> Tuple[str, Dict]:
    """
    Trace ``model`` on one sample and write ``output_dir``/model.ts (TorchScript, with its code and
    graph dumped beside it) or model.onnx.

    Args:
        image: the sample, 3 x h x w float32 resized as the config's test rule resizes.
        original_size: the sample's (height, width) before resizing.
        score_maps: include "score_maps" (always when ``vocabulary`` is given).
        vocabulary: the names of the score maps (a list, or comma-separated; their text embeddings are
            stored in the graph); None for the model's classes.
    Returns:
        the written file's path and its metadata (also stored in the file, under METADATA_NAME).
    """
    check_exportable(cfg, model, fmt, method)
    # Tokenized now: a name that does not fit the prompt is refused before tracing. The classes' own
    # score maps are those of the classes as a vocabulary.
    if vocabulary is not None or score_maps:
        vocabulary = model.score_map.vocabulary(vocabulary)
    sample = (image, torch.tensor(original_size[0]), torch.tensor(original_size[1]))
    training = model.training
    model.eval()
    frozen = [vocabulary] if vocabulary is not None else []
    try:
        with model.score_map.frozen_text_embeddings(frozen), torch.no_grad():
            adapter = TracingAdapter(model, sample, functools.partial(_flat_outputs, vocabulary=vocabulary))
            if fmt == "torchscript":
                path = os.path.join(output_dir, "model.ts")
                traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
                outputs = list(adapter.outputs_schema.keys)  # names sorted by the adapter
                metadata = _metadata(cfg, model, fmt, outputs, vocabulary)
                torch.jit.save(traced, path, _extra_files={METADATA_NAME: json.dumps(metadata)})
                dump_torchscript_IR(traced, output_dir)
            else:
                path = os.path.join(output_dir, "model.onnx")
                adapter(*adapter.flattened_inputs)  # the output names, before the exporter needs them
                metadata = _metadata(cfg, model, fmt, list(adapter.outputs_schema.keys), vocabulary)
                _export_onnx(adapter, path, metadata)
    finally:
        model.train(training)
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
