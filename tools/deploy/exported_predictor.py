#!/usr/bin/env python
"""
Run a DenseCLIP model written by export_model.py without this project's package or Detectron2.

model.ts needs torch and torchvision (the graph calls torchvision's NMS and RoIAlign); model.onnx needs
onnxruntime only. Both need numpy and Pillow, and OpenCV for a model exported with INPUT.RESIZE_BACKEND
"opencv" (the COCO and ADE20K configs). This file imports nothing else; copy it next to your code:

    from exported_predictor import ExportedPredictor
    predictor = ExportedPredictor("output/export/model.ts")  # or model.onnx
    outputs = predictor(image)  # H x W x 3 uint8 in BGR order, as cv2.imread gives (DefaultPredictor's input)

``outputs`` holds numpy arrays, on the original image: "boxes" (N x 4, x1 y1 x2 y2), "scores" (N),
"classes" (N, indices into predictor.class_names), "masks" (N x H x W bool, Mask R-CNN), "sem_seg"
(C x H x W logits, semantic segmentors) and "score_maps" (K x H x W logits named by
predictor.score_map_names) when exported with them: the fields of DenseCLIPPredictor's output.

Command line: python tools/deploy/exported_predictor.py MODEL IMAGE [--output result.npz]
"""
import argparse
import json

import numpy as np
from PIL import Image

METADATA_NAME = "denseclip_export.json"


def resized_shape(height: int, width: int, short_edge: int, max_size: int):
    """The test-time resize of the exported config (Detectron2's ResizeShortestEdge): the shorter side to
    ``short_edge``, then both scaled down if the longer side exceeds ``max_size``; rounded to pixels."""
    scale = short_edge / min(height, width)
    new_h, new_w = (short_edge, scale * width) if height < width else (scale * height, short_edge)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize(image: np.ndarray, new_h: int, new_w: int, backend: str) -> np.ndarray:
    """An H x W x 3 uint8 image resized bilinearly as the exported config resized its inputs
    (INPUT.RESIZE_BACKEND): "pil", Detectron2's ResizeTransform (PIL's filter), or "opencv",
    cv2.resize with INTER_LINEAR (the release's)."""
    if backend == "opencv":
        import cv2

        return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BILINEAR))


class ExportedPredictor:
    """An exported DenseCLIP model (TorchScript or ONNX) with the preprocessing of DefaultPredictor."""

    def __init__(self, path: str):
        if path.endswith(".onnx"):
            import onnxruntime

            self._session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            self.metadata = json.loads(self._session.get_modelmeta().custom_metadata_map[METADATA_NAME])
            self._module = None
        else:
            import torch
            import torchvision  # noqa: F401  (registers the NMS and RoIAlign operators the graph calls)

            files = {METADATA_NAME: ""}
            self._module = torch.jit.load(path, map_location="cpu", _extra_files=files)
            self.metadata = json.loads(files[METADATA_NAME])
        self.class_names = self.metadata["class_names"]
        self.score_map_names = self.metadata["score_map_names"]

    def run(self, image: np.ndarray, height: int, width: int) -> dict:
        """
        The exported graph on an image already resized by the config's rule.

        Args:
            image: 3 x h x w float32 in the model's channel order (metadata "input_format").
            height, width: the original image's size; the outputs are on it.
        """
        image = np.ascontiguousarray(image, dtype=np.float32)
        side = self.metadata["max_input_side"]
        if side is not None and max(image.shape[1:]) > side:
            raise ValueError(
                f"This model was exported for images whose resized sides are at most {side} px (its "
                f"positional grid); got {image.shape[1]} x {image.shape[2]}. Resize with the config's rule "
                f"(shorter side {self.metadata['min_size_test']}, longer at most {self.metadata['max_size_test']})."
            )
        inputs = (image, np.array(height, dtype=np.int64), np.array(width, dtype=np.int64))
        if self._module is None:
            values = self._session.run(None, dict(zip(self.metadata["inputs"], inputs)))
        else:
            import torch

            with torch.no_grad():
                values = [v.numpy() for v in self._module(*[torch.from_numpy(x) for x in inputs])]
        return dict(zip(self.metadata["outputs"], values))

    def __call__(self, image: np.ndarray) -> dict:
        """Outputs for one H x W x 3 uint8 image in BGR order."""
        if self.metadata["input_format"] == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        new_h, new_w = resized_shape(height, width, self.metadata["min_size_test"], self.metadata["max_size_test"])
        resized = resize(np.ascontiguousarray(image), new_h, new_w, self.metadata.get("resize_backend", "pil"))
        return self.run(resized.transpose(2, 0, 1).astype(np.float32), height, width)


def main():
    parser = argparse.ArgumentParser(description="Run an exported DenseCLIP model on one image.")
    parser.add_argument("model", help="model.ts or model.onnx written by export_model.py")
    parser.add_argument("image", help="an image file")
    parser.add_argument("--output", help="save all outputs to this .npz file")
    args = parser.parse_args()
    predictor = ExportedPredictor(args.model)
    image = np.asarray(Image.open(args.image).convert("RGB"))[:, :, ::-1]
    outputs = predictor(image)
    for box, score, label in zip(outputs.get("boxes", []), outputs.get("scores", []), outputs.get("classes", [])):
        print(f"{predictor.class_names[label]:>20s} {score:.3f}  box {np.round(box, 1).tolist()}")
    for name in ("masks", "sem_seg", "score_maps"):
        if name in outputs:
            print(f"{name}: {outputs[name].shape} {outputs[name].dtype}")
    if "score_maps" in outputs:
        print("score maps of:", ", ".join(predictor.score_map_names))
    if args.output:
        np.savez_compressed(args.output, **outputs)


if __name__ == "__main__":
    main()
