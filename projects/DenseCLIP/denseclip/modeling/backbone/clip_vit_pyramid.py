"""
The release's segmentation ViT: CLIP's vision transformer whose intermediate blocks become a four-level
pyramid (strides 4, 8, 16, 32 for patch 16), read by an FPN; language-guided for DenseCLIP.
"""
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .clip_resnet import norm_for_device
from .clip_vit import CLIPVisionTransformer
from .fpn import build_fpn
from .language_guided import with_language_guidance

__all__ = ["CLIPViTFeaturePyramid", "build_semantic_clip_vit_fpn_backbone"]


class CLIPViTFeaturePyramid(Backbone):
    """
    CLIP's vision transformer (``vit``) with the patch tokens after blocks ``out_indices`` (0-based;
    3, 5, 7, 11 for ViT-B) as B x width x H/p x W/p maps, one per pyramid level:

        s{p/4}  fpn1 = GroupNorm(1) -> ConvTranspose 2x2 s2 -> norm -> GELU -> ConvTranspose 2x2 s2
        s{p/2}  fpn2 = GroupNorm(1) -> ConvTranspose 2x2 s2
        s{p}    fpn3 = GroupNorm(1)
        s{2p}   fpn4 = GroupNorm(1) -> MaxPool 2x2

    (s4, s8, s16, s32 for patch p = 16), all with ``width`` channels. :meth:`forward_with_embeddings`
    adds CLIP's global (class token) and dense (every patch token of the last block, stride p)
    embeddings through ln_post and proj.
    """

    @configurable
    def __init__(self, *, vit: CLIPVisionTransformer, out_indices: Sequence[int], norm: str):
        super().__init__()
        blocks = len(vit.transformer.resblocks)
        increasing = all(a < b for a, b in zip(out_indices, out_indices[1:]))
        if len(out_indices) != 4 or not increasing or not all(0 <= i < blocks for i in out_indices):
            raise ValueError(
                f"MODEL.CLIP.VIT.OUT_INDICES needs 4 increasing block indices in 0..{blocks - 1} (one per "
                f"pyramid level, e.g. [3, 5, 7, 11] for ViT-B), got {list(out_indices)}"
            )
        self.vit = vit
        self.out_indices = list(out_indices)
        width, patch = vit.width, vit.patch_size[0]
        if patch % 4:
            raise ValueError(f"The segmentation pyramid upsamples the patch grid x4: MODEL.CLIP.VIT.PATCH_SIZE "
                             f"must be a multiple of 4, got {patch}")

        def up():
            return nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)

        self.fpn1 = nn.Sequential(nn.GroupNorm(1, width), up(), get_norm(norm, width), nn.GELU(), up())
        self.fpn2 = nn.Sequential(nn.GroupNorm(1, width), up())
        self.fpn3 = nn.GroupNorm(1, width)
        self.fpn4 = nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(kernel_size=2, stride=2))
        strides = (patch // 4, patch // 2, patch, patch * 2)
        self._out_features = [f"s{stride}" for stride in strides]
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = {name: width for name in self._out_features}

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        return {
            "vit": CLIPVisionTransformer(cfg, input_shape),
            "out_indices": cfg.MODEL.CLIP.VIT.OUT_INDICES,
            "norm": norm_for_device(cfg.MODEL.CLIP.VIT.PYRAMID_NORM, cfg.MODEL.DEVICE),
        }

    def _pyramid(self, x: torch.Tensor):
        tokens, (height, width), intermediates = self.vit.encode_tokens(x, self.out_indices)
        levels = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        features = {
            name: level(self.vit.as_map(block[:, 1:], height, width))
            for name, level, block in zip(self._out_features, levels, intermediates)
        }
        return features, tokens, (height, width)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: B x 3 x H x W, normalised with CLIP's pixel mean and std; H and W multiples of 2 p.
        Returns:
            {"s4": B x width x H/4 x W/4, "s8": .. H/8, "s16": .. H/16, "s32": .. H/32} for p = 16.
        """
        return self._pyramid(x)[0]

    def forward_with_embeddings(self, x: torch.Tensor):
        """The features of :meth:`forward`, and CLIP's global (B x D) and dense (B x D x H/p x W/p)
        embeddings of the last block, D = EMBED_DIM."""
        if self.vit.proj is None:
            raise RuntimeError("This CLIPVisionTransformer was built without its output projection")
        features, tokens, (height, width) = self._pyramid(x)
        embeddings = self.vit.ln_post(tokens) @ self.vit.proj
        return features, embeddings[:, 0], self.vit.as_map(embeddings[:, 1:], height, width)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return self._out_feature_strides[self._out_features[-1]]


@BACKBONE_REGISTRY.register()
def build_semantic_clip_vit_fpn_backbone(cfg, input_shape: ShapeSpec):
    """The release's segmentation ViT (CLIPViTFeaturePyramid) with an FPN (P2..P5 from s4..s32, no extra
    level); for DenseCLIP the score map joins MODEL.DENSECLIP.SCORE_CONCAT_FEATURE (s16 in the release)."""
    return with_language_guidance(cfg, CLIPViTFeaturePyramid(cfg, input_shape), lambda x: build_fpn(cfg, x, "none"))
