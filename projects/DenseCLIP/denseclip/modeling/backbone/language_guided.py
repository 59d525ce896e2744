"""
DenseCLIP's language-guided backbone, built from parts:

    image -> bottom-up (image encoder) -> global and dense embeddings -> pixel-text score maps
          -> score maps concatenated to one bottom-up feature (the top one by default) -> neck (FPN,
          SimpleFeaturePyramid)

The backbone builders of this package build it when MODEL.DENSECLIP.LANGUAGE_GUIDED is set (the DenseCLIP
meta-architectures set it when they build their backbone), and the plain bottom-up + neck (the "CLIP"
baselines) otherwise.
"""
from typing import Callable, Dict, NamedTuple, Tuple

import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone

from ..score_map import PixelTextScoreMap

__all__ = ["FeatureInput", "LanguageGuidedBackbone", "LanguageGuidedFeatures", "with_language_guidance"]


class LanguageGuidedFeatures(NamedTuple):
    """What a :class:`LanguageGuidedBackbone` gives its meta-architecture."""

    features: Dict[str, torch.Tensor]  # the neck's outputs
    score_map: torch.Tensor  # B x K x h x w, the training classes' (cosine / tau, float32)
    global_embedding: torch.Tensor  # B x D, for the score maps of other vocabularies
    dense_embedding: torch.Tensor  # B x D x h x w


class FeatureInput(Backbone):
    """
    The input of a neck built on features computed elsewhere: it declares their shapes, so that
    Detectron2's FPN or SimpleFeaturePyramid can be built on them, and hands them on unchanged.
    """

    def __init__(self, shapes: Dict[str, ShapeSpec]):
        super().__init__()
        self._shapes = dict(shapes)
        self._out_features = list(shapes)

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return features

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return dict(self._shapes)


class LanguageGuidedBackbone(Backbone):
    """
    A bottom-up image encoder (a Backbone with ``forward_with_embeddings``), the pixel-text score
    map, and a neck that reads the bottom-up features with the score map concatenated to
    ``in_feature`` (e.g. res5: C + K channels): divided by tau (``concat_with_tau``, the detection
    release) or the plain cosine similarity (the segmentation release).
    """

    def __init__(
        self,
        bottom_up: Backbone,
        score_map: PixelTextScoreMap,
        neck: Backbone,
        in_feature: str,
        concat_with_tau: bool = True,
    ):
        super().__init__()
        self.bottom_up = bottom_up
        self.score_map = score_map
        self.neck = neck
        self.in_feature = in_feature
        self.concat_with_tau = concat_with_tau

    @property
    def class_names(self):
        return self.score_map.class_names

    def forward_with_score_map(self, images: torch.Tensor) -> LanguageGuidedFeatures:
        """
        Args:
            images: B x 3 x H x W, normalised.
        Returns:
            the neck's features (which read the training classes' score map), that score map at the
            stride of ``in_feature``, and the image embeddings it was computed from.
        """
        features, global_embedding, dense_embedding = self.bottom_up.forward_with_embeddings(images)
        cosine = self.score_map.cosine(global_embedding, dense_embedding)
        score_map = cosine / self.score_map.tau
        top = features[self.in_feature]
        concat = score_map if self.concat_with_tau else cosine
        features[self.in_feature] = torch.cat([top, concat.to(top.dtype)], dim=1)
        return LanguageGuidedFeatures(self.neck(features), score_map, global_embedding, dense_embedding)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.forward_with_score_map(images).features

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return self.neck.output_shape()

    @property
    def size_divisibility(self) -> int:
        return self.neck.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return self.neck.padding_constraints


def with_language_guidance(cfg, bottom_up: Backbone, build_neck: Callable[[Backbone], Backbone]) -> Backbone:
    """
    ``build_neck(bottom_up)`` for the CLIP baselines; with MODEL.DENSECLIP.LANGUAGE_GUIDED, the
    LanguageGuidedBackbone whose neck is ``build_neck`` on the bottom-up's features, the score map
    concatenated to MODEL.DENSECLIP.SCORE_CONCAT_FEATURE (by default the one of the largest stride).
    """
    if not cfg.MODEL.DENSECLIP.LANGUAGE_GUIDED:
        return build_neck(bottom_up)
    score_map = PixelTextScoreMap(cfg)
    shapes = bottom_up.output_shape()
    in_feature = cfg.MODEL.DENSECLIP.SCORE_CONCAT_FEATURE or max(shapes, key=lambda name: shapes[name].stride)
    if in_feature not in shapes:
        raise ValueError(
            f"MODEL.DENSECLIP.SCORE_CONCAT_FEATURE {in_feature!r} is not a feature of the image encoder "
            f"({', '.join(shapes)}). Name one of these, or leave it empty for the one of the largest stride."
        )
    top = shapes[in_feature]
    shapes[in_feature] = ShapeSpec(channels=top.channels + len(score_map.class_names), stride=top.stride)
    return LanguageGuidedBackbone(
        bottom_up, score_map, build_neck(FeatureInput(shapes)), in_feature, cfg.MODEL.DENSECLIP.SCORE_CONCAT_WITH_TAU
    )
