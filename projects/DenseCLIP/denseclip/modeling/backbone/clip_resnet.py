"""CLIP's modified ResNet as a Detectron2 backbone, with its attention pool kept dense."""
from typing import Dict, List, Optional

import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .attention_pool import GRID_MODES, dense_attention_pool

__all__ = ["CLIPResNet", "build_clip_resnet_backbone", "clip_norm", "norm_for_device"]

_STAGES = ("res2", "res3", "res4", "res5")
_STEM_MODULES = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")


def _to_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Turn BatchNorm into FrozenBatchNorm2d (children in place; a BatchNorm itself is returned new)."""
    module = FrozenBatchNorm2d.convert_frozen_batchnorm(module)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.num_batches_tracked = None  # as FrozenBatchNorm2d itself: no such state
    return module


def _to_naive_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn BatchNorm2d into Detectron2's NaiveSyncBatchNorm (synchronised over gloo too), in place."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = NaiveSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            _to_naive_sync_batchnorm(child)
    return module


class CLIPResNet(ModifiedResNet, Backbone):
    """
    CLIP's modified ResNet (open_clip's own modules, so parameter names match CLIP checkpoints'
    ``visual.*`` keys) returning res2..res5 at strides 4, 8, 16, 32 with 4w, 8w, 16w, 32w channels
    for stem width w. ``attnpool`` (CLIP's attention pool) is kept only for language guidance, which
    reads its global and dense embeddings (:meth:`forward_with_embeddings`).
    """

    @configurable
    def __init__(
        self,
        *,
        layers: List[int],
        width: int,
        embed_dim: int,
        input_resolution: int,
        with_attention_pool: bool,
        attention_pool_grid: str = "crop",
        norm: str,
        freeze_at: int,
        out_features: List[str],
    ):
        if len(layers) != 4:
            raise ValueError(f"MODEL.CLIP.LAYERS needs 4 stage depths, got {list(layers)}")
        if attention_pool_grid not in GRID_MODES:
            raise ValueError(f"MODEL.CLIP.ATTENTION_POOL_GRID must be one of {GRID_MODES}, got {attention_pool_grid!r}")
        if input_resolution % 32:
            raise ValueError(f"MODEL.CLIP.INPUT_RESOLUTION must be a multiple of 32, got {input_resolution}")
        # CLIP's head count for its ResNets: one head per 64 channels of res5.
        heads = width * 32 // 64
        super().__init__(
            layers=list(layers),
            output_dim=embed_dim,
            heads=heads,
            image_size=input_resolution,
            width=width,
        )
        if not with_attention_pool:
            self.attnpool = None
        self.embed_dim = embed_dim
        self.input_resolution = input_resolution
        self.attention_pool_grid = attention_pool_grid

        self._out_features = list(out_features)
        unknown = set(self._out_features) - set(_STAGES)
        if unknown or not self._out_features:
            raise ValueError(f"MODEL.CLIP.OUT_FEATURES must name some of {_STAGES}, got {self._out_features}")
        self._out_feature_strides = {name: 4 * 2**i for i, name in enumerate(_STAGES)}
        self._out_feature_channels = {name: width * 4 * 2**i for i, name in enumerate(_STAGES)}

        if norm == "FrozenBN":
            _to_frozen_batchnorm(self)
        elif norm == "SyncBN":
            nn.SyncBatchNorm.convert_sync_batchnorm(self)
        elif norm == "naiveSyncBN":
            _to_naive_sync_batchnorm(self)
        elif norm != "BN":
            raise ValueError(f"MODEL.CLIP.NORM must be SyncBN, BN or FrozenBN, got {norm!r}")
        self.freeze(freeze_at)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        if input_shape is not None and input_shape.channels != 3:
            raise ValueError(f"CLIP's image encoder takes 3 input channels, got {input_shape.channels}")
        clip = cfg.MODEL.CLIP
        return {
            "layers": clip.LAYERS,
            "width": clip.WIDTH,
            "embed_dim": clip.EMBED_DIM,
            "input_resolution": clip.INPUT_RESOLUTION,
            "with_attention_pool": cfg.MODEL.DENSECLIP.LANGUAGE_GUIDED,
            "attention_pool_grid": clip.ATTENTION_POOL_GRID,
            "norm": clip_norm(cfg),
            "freeze_at": clip.FREEZE_AT,
            "out_features": clip.OUT_FEATURES,
        }

    @property
    def stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def freeze(self, freeze_at: int = 0):
        """Freeze the stem (freeze_at >= 1) and stages res2..res(freeze_at) (freeze_at >= 2)."""
        frozen = [getattr(self, name) for name in _STEM_MODULES] if freeze_at >= 1 else []
        frozen += self.stages[: max(freeze_at - 1, 0)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad = False
        if freeze_at >= 1:
            for name in _STEM_MODULES:
                setattr(self, name, _to_frozen_batchnorm(getattr(self, name)))
        for stage in self.stages[: max(freeze_at - 1, 0)]:
            _to_frozen_batchnorm(stage)
        return self

    def _stages(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = {}
        x = self.stem(x)
        for name, stage in zip(_STAGES, self.stages):
            x = stage(x)
            outputs[name] = x
        return outputs

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: B x 3 x H x W, normalised with CLIP's pixel mean and std.
        Returns:
            dict of the requested res2..res5 maps, res_k of shape B x (w * 2^k) x H/2^k x W/2^k.
        """
        outputs = self._stages(x)
        return {name: outputs[name] for name in self._out_features}

    def forward_with_embeddings(self, x: torch.Tensor):
        """
        Returns:
            the features of :meth:`forward`, and CLIP's global (B x D) and dense (B x D x H/32 x W/32)
            embeddings of res5 (D = EMBED_DIM): its attention pool, evaluated at every location too.
        """
        if self.attnpool is None:
            raise RuntimeError("This CLIPResNet was built without its attention pool")
        outputs = self._stages(x)
        global_embedding, dense_embedding = dense_attention_pool(self.attnpool, outputs["res5"], self.attention_pool_grid)
        return {name: outputs[name] for name in self._out_features}, global_embedding, dense_embedding

    def output_shape(self):
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


def norm_for_device(norm: str, device: str) -> str:
    """``norm`` with "SyncBN" resolved for the device: torch's SyncBatchNorm runs on GPUs only,
    Detectron2's NaiveSyncBatchNorm also synchronises CPU processes (gloo)."""
    if norm == "SyncBN" and torch.device(device).type == "cpu":
        return "naiveSyncBN"
    return norm


def clip_norm(cfg) -> str:
    """MODEL.CLIP.NORM, with "SyncBN" resolved for MODEL.DEVICE (:func:`norm_for_device`)."""
    return norm_for_device(cfg.MODEL.CLIP.NORM, cfg.MODEL.DEVICE)


@BACKBONE_REGISTRY.register()
def build_clip_resnet_backbone(cfg, input_shape: ShapeSpec):
    """CLIP's image encoder alone (no FPN), from MODEL.CLIP; with its attention pool when
    MODEL.DENSECLIP.LANGUAGE_GUIDED."""
    return CLIPResNet(cfg, input_shape)
