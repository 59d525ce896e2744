"""Multi-scale and flip testing of semantic segmentors, as the release's multi-scale results were made."""
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from detectron2.data.transforms import ResizeShortestEdge

from ..data import get_resize_backend, resize_transform

__all__ = ["SemanticSegmentorWithTTA", "tta_sizes"]


def tta_sizes(cfg) -> List[Tuple[int, int]]:
    """(shorter side, longest side) per test scale: TEST.AUG.SCALE_RATIOS of (MIN_SIZE_TEST,
    MAX_SIZE_TEST), both scaled (the release's ratios of its (2048, 512) scale), or else
    TEST.AUG.MIN_SIZES with TEST.AUG.MAX_SIZE."""
    if cfg.TEST.AUG.SCALE_RATIOS:
        return [
            (int(cfg.INPUT.MIN_SIZE_TEST * ratio), int(cfg.INPUT.MAX_SIZE_TEST * ratio))
            for ratio in cfg.TEST.AUG.SCALE_RATIOS
        ]
    return [(int(size), int(cfg.TEST.AUG.MAX_SIZE)) for size in cfg.TEST.AUG.MIN_SIZES]


class SemanticSegmentorWithTTA(nn.Module):
    """
    Runs a semantic segmentor on each test scale of the original image (:func:`tta_sizes`), and its
    horizontal flip with TEST.AUG.FLIP; each run's K x H x W logits on the original image go through
    softmax (flipped back if needed) and the probabilities are averaged.

    Input: the test loader's dicts with the original image, as loaded without resizing (INPUT.MIN_SIZE_TEST
    0: :meth:`DenseCLIPTrainer.test_with_TTA` loads them so). Output per image: {"sem_seg": K x H x W
    averaged probabilities}.
    """

    def __init__(self, cfg, model: nn.Module, sizes: Sequence[Tuple[int, int]] = None, flip: bool = None):
        super().__init__()
        self.model = model
        self.sizes = list(sizes if sizes is not None else tta_sizes(cfg))
        self.flip = cfg.TEST.AUG.FLIP if flip is None else flip
        self.resize_backend = get_resize_backend(cfg)
        if not self.sizes:
            raise ValueError("Multi-scale testing needs TEST.AUG.SCALE_RATIOS or TEST.AUG.MIN_SIZES")

    def _one(self, inputs: dict) -> dict:
        image = inputs["image"].permute(1, 2, 0).cpu().numpy()
        height, width = inputs.get("height", image.shape[0]), inputs.get("width", image.shape[1])
        total, runs = None, 0
        for short, longest in self.sizes:
            new_h, new_w = ResizeShortestEdge.get_output_shape(image.shape[0], image.shape[1], short, longest)
            resized = resize_transform(*image.shape[:2], new_h, new_w, self.resize_backend).apply_image(image)
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
            for flip in (False, True) if self.flip else (False,):
                aug = {"image": tensor.flip(-1) if flip else tensor, "height": height, "width": width}
                probabilities = self.model([aug])[0]["sem_seg"].softmax(dim=0)
                probabilities = probabilities.flip(-1) if flip else probabilities
                total = probabilities if total is None else total + probabilities
                runs += 1
        return {"sem_seg": total / runs}

    def forward(self, batched_inputs: List[dict]) -> List[dict]:
        with torch.no_grad():
            return [self._one(inputs) for inputs in batched_inputs]
