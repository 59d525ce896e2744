"""
CLIP's vision transformer (OpenAI's ViT-B/16 by default) as a Detectron2 backbone, and the ViTDet
simple feature pyramid on it for RetinaNet and two-stage detectors, language-guided for DenseCLIP.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from open_clip.transformer import VisionTransformer
from torchvision.ops import StochasticDepth

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid

from ..text_encoder import ACTIVATIONS
from .attention_pool import resize_positional_grid
from .fpn import LastLevelP6P7
from .language_guided import with_language_guidance

__all__ = [
    "CLIPVisionTransformer",
    "CLIPSimpleFeaturePyramid",
    "build_clip_vit_sfp_backbone",
    "build_retinanet_clip_vit_sfp_backbone",
]


class CLIPVisionTransformer(VisionTransformer, Backbone):
    """
    CLIP's vision transformer (open_clip's module, so parameter names match CLIP checkpoints'
    ``visual.*`` keys) returning the last block's patch tokens as one stride-``patch_size`` map,
    ``last_feat`` (B x width x H/p x W/p). The positional grid, stored for the pretraining resolution,
    is resized bilinearly to each input's patch grid, so any input size works.

    For language guidance, ``ln_post`` and ``proj`` (CLIP's output projection) give the global
    embedding from the class token and the dense one from every patch token, as the release's
    segmentation ViT does; the CLIP baseline is built without them.

    Drop path: each block's two residual branches (attention, MLP) are dropped per sample in
    training, at rates rising linearly from 0 (first block) to ``drop_path_rate`` (last block). In
    eval mode the function is CLIP's.

    ``class_embedding_in_position`` adds ``class_embedding`` to the class token's positional embedding
    too, as the release's segmentation ViT does (the token then holds it twice).
    """

    @configurable
    def __init__(
        self,
        *,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
        input_resolution: int,
        activation: str,
        drop_path_rate: float,
        with_embeddings: bool,
        class_embedding_in_position: bool = False,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"MODEL.CLIP.ACTIVATION must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if input_resolution % patch_size:
            raise ValueError(
                f"MODEL.CLIP.INPUT_RESOLUTION ({input_resolution}) must be a multiple of "
                f"MODEL.CLIP.VIT.PATCH_SIZE ({patch_size})"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"MODEL.CLIP.VIT.DROP_PATH_RATE must be in [0, 1), got {drop_path_rate}")
        super().__init__(
            image_size=input_resolution,
            patch_size=patch_size,
            width=width,
            layers=layers,
            heads=heads,
            mlp_ratio=4.0,
            output_dim=embed_dim,
            act_layer=ACTIVATIONS[activation],
        )
        # open_clip's blocks scale each residual branch by ls_1 / ls_2, identities for CLIP: stochastic
        # depth takes their place (no parameters, so the names stay CLIP's).
        self.drop_path_rates = [drop_path_rate * i / max(layers - 1, 1) for i in range(layers)]
        for block, rate in zip(self.transformer.resblocks, self.drop_path_rates):
            block.ls_1 = StochasticDepth(rate, "row")
            block.ls_2 = StochasticDepth(rate, "row")
        if not with_embeddings:
            self.ln_post = None
            self.proj = None
        self.width = width
        self.embed_dim = embed_dim
        self.input_resolution = input_resolution
        self.class_embedding_in_position = class_embedding_in_position
        self._out_features = ["last_feat"]

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        if input_shape is not None and input_shape.channels != 3:
            raise ValueError(f"CLIP's image encoder takes 3 input channels, got {input_shape.channels}")
        vit = cfg.MODEL.CLIP.VIT
        return {
            "patch_size": vit.PATCH_SIZE,
            "width": vit.WIDTH,
            "layers": vit.LAYERS,
            "heads": vit.HEADS,
            "embed_dim": cfg.MODEL.CLIP.EMBED_DIM,
            "input_resolution": cfg.MODEL.CLIP.INPUT_RESOLUTION,
            "activation": cfg.MODEL.CLIP.ACTIVATION,
            "drop_path_rate": vit.DROP_PATH_RATE,
            "with_embeddings": cfg.MODEL.DENSECLIP.LANGUAGE_GUIDED,
            "class_embedding_in_position": vit.CLASS_EMBEDDING_IN_POSITION,
        }

    def encode_tokens(
        self, x: torch.Tensor, out_indices: Sequence[int] = ()
    ) -> Tuple[torch.Tensor, Tuple[int, int], List[torch.Tensor]]:
        """The last block's tokens, B x (1 + h*w) x width (class token first), the grid (h, w), and the
        tokens after each block of ``out_indices`` (0-based)."""
        x = self.conv1(x)  # B x width x h x w
        height, width = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        positional = resize_positional_grid(self.positional_embedding, (height, width))
        if self.class_embedding_in_position:
            positional = torch.cat([positional[:1] + self.class_embedding, positional[1:]], dim=0)
        x = self.ln_pre(x + positional.to(x.dtype))
        if not out_indices:
            return self.transformer(x), (height, width), []
        x, intermediates = self.transformer.forward_intermediates(x, indices=list(out_indices))
        return x, (height, width), intermediates

    @staticmethod
    def as_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: B x 3 x H x W, normalised with CLIP's pixel mean and std; H and W multiples of the patch size.
        Returns:
            {"last_feat": B x width x H/p x W/p}, the last block's patch tokens.
        """
        tokens, (height, width), _ = self.encode_tokens(x)
        return {"last_feat": self.as_map(tokens[:, 1:], height, width)}

    def forward_with_embeddings(self, x: torch.Tensor):
        """
        Returns:
            the features of :meth:`forward`, and CLIP's global (B x D: the class token through ln_post
            and the projection, what CLIP's encode_image returns) and dense (B x D x H/p x W/p: every
            patch token through them) embeddings, D = EMBED_DIM.
        """
        if self.proj is None:
            raise RuntimeError("This CLIPVisionTransformer was built without its output projection")
        tokens, (height, width), _ = self.encode_tokens(x)
        embeddings = self.ln_post(tokens) @ self.proj
        features = {"last_feat": self.as_map(tokens[:, 1:], height, width)}
        return features, embeddings[:, 0], self.as_map(embeddings[:, 1:], height, width)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {"last_feat": ShapeSpec(channels=self.width, stride=self.patch_size[0])}

    @property
    def size_divisibility(self) -> int:
        return self.patch_size[0]


class CLIPSimpleFeaturePyramid(SimpleFeaturePyramid):
    """
    Detectron2's SimpleFeaturePyramid (ViTDet) that also declares its size divisibility to the
    detector (Detectron2's spells the key ``size_divisiblity`` and relies on square padding), so
    images are padded to a multiple of the coarsest pyramid stride.
    """

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}


def build_simple_feature_pyramid(cfg, bottom_up: Backbone, retinanet: bool) -> CLIPSimpleFeaturePyramid:
    """
    The simple feature pyramid on the bottom-up's ``last_feat`` (stride 16; score maps included for
    DenseCLIP): P2..P5 (scales 4, 2, 1, 1/2) and a max-pooled P6 for two-stage detectors, or P3..P5
    (scales 2, 1, 1/2) and RetinaNet's P6/P7 from P5. MODEL.FPN.OUT_CHANNELS channels, MODEL.FPN.NORM.
    """
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if retinanet:
        scale_factors = (2.0, 1.0, 0.5)
        top_block = LastLevelP6P7(out_channels, out_channels, "p5", cfg.MODEL.FPN.RELU_BEFORE_P7)
    else:
        scale_factors = (4.0, 2.0, 1.0, 0.5)
        top_block = LastLevelMaxPool()
    return CLIPSimpleFeaturePyramid(
        net=bottom_up,
        in_feature="last_feat",
        out_channels=out_channels,
        scale_factors=scale_factors,
        top_block=top_block,
        norm=cfg.MODEL.FPN.NORM,
    )


@BACKBONE_REGISTRY.register()
def build_clip_vit_sfp_backbone(cfg, input_shape: ShapeSpec):
    """CLIP ViT with a simple feature pyramid for two-stage detectors: P2..P5 from the stride-16
    map and a max-pooled P6."""
    return with_language_guidance(
        cfg, CLIPVisionTransformer(cfg, input_shape), lambda x: build_simple_feature_pyramid(cfg, x, retinanet=False)
    )


@BACKBONE_REGISTRY.register()
def build_retinanet_clip_vit_sfp_backbone(cfg, input_shape: ShapeSpec):
    """CLIP ViT with a simple feature pyramid for RetinaNet: P3..P5 from the stride-16 map, P6 and P7
    from P5."""
    return with_language_guidance(
        cfg, CLIPVisionTransformer(cfg, input_shape), lambda x: build_simple_feature_pyramid(cfg, x, retinanet=True)
    )
