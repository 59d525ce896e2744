"""CLIP's modified ResNet as a Detectron2 backbone, with its attention pool kept dense."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from torch import nn

from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["CLIPResNet", "build_clip_resnet_backbone", "dense_attention_pool"]

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


def _grid_side(num_positions: int) -> int:
    num_positions = int(num_positions)  # a tensor under jit tracing
    side = int(round((num_positions - 1) ** 0.5))
    if side * side + 1 != num_positions:
        raise ValueError(f"A positional embedding of {num_positions} rows is not 1 + a square grid")
    return side


def resize_positional_grid(positional_embedding: torch.Tensor, size: Tuple[int, int]):
    """
    Bilinearly resize the spatial part of an attention-pool positional embedding.

    Args:
        positional_embedding: (1 + G*G) x C, the class position first.
        size: the (H, W) grid wanted.
    Returns:
        (1 + H*W) x C.
    """
    side = _grid_side(positional_embedding.shape[0])
    cls_pos, grid = positional_embedding[:1], positional_embedding[1:]
    if (side, side) == tuple(size):
        return positional_embedding
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=size, mode="bilinear", align_corners=False)
    grid = grid.to(positional_embedding.dtype).permute(0, 2, 3, 1).reshape(size[0] * size[1], -1)
    return torch.cat([cls_pos, grid], dim=0)


def _positional_embedding_for(positional_embedding: torch.Tensor, height: int, width: int):
    """
    Positional embedding for an H x W feature map: the top-left H x W part of the grid, as in the
    release; a grid smaller than the feature map is first interpolated up (the release fails there).
    """
    side = _grid_side(positional_embedding.shape[0])
    if height > side or width > side:
        positional_embedding = resize_positional_grid(
            positional_embedding, (max(height, side), max(width, side))
        )
        grid_h, grid_w = max(height, side), max(width, side)
    else:
        grid_h = grid_w = side
    cls_pos = positional_embedding[:1]
    grid = positional_embedding[1:].reshape(grid_h, grid_w, -1)[:height, :width]
    return torch.cat([cls_pos, grid.reshape(height * width, -1)], dim=0)


def dense_attention_pool(pool: AttentionPool2d, x: torch.Tensor):
    """
    CLIP's attention pool applied with every token as a query, not only the mean token.

    Args:
        pool: open_clip's AttentionPool2d (its weights are used unchanged).
        x: B x C x H x W feature map (res5).
    Returns:
        global_embedding: B x D, what CLIP's attention pool returns;
        dense_embedding: B x D x H x W, the same attention evaluated at each location.
    """
    batch, channels, height, width = x.shape
    tokens = x.flatten(2).permute(2, 0, 1)  # HW x B x C
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
    positional = _positional_embedding_for(pool.positional_embedding, height, width)
    tokens = tokens + positional[:, None, :].to(tokens.dtype)
    out, _ = F.multi_head_attention_forward(
        query=tokens,
        key=tokens,
        value=tokens,
        embed_dim_to_check=channels,
        num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=pool.training,
        need_weights=False,
    )
    global_embedding = out[0]
    dense_embedding = out[1:].permute(1, 2, 0).reshape(batch, -1, height, width)
    return global_embedding, dense_embedding


class CLIPResNet(ModifiedResNet, Backbone):
    """
    CLIP's modified ResNet (open_clip's own modules, so parameter names match CLIP checkpoints'
    ``visual.*`` keys) returning res2..res5 at strides 4, 8, 16, 32 with 4w, 8w, 16w, 32w channels
    for stem width w. ``attnpool`` is kept only when the dense/global embeddings are needed.
    """

    def __init__(
        self,
        layers: List[int],
        width: int = 64,
        embed_dim: int = 1024,
        input_resolution: int = 1344,
        with_attention_pool: bool = True,
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        out_features: Optional[List[str]] = None,
    ):
        if len(layers) != 4:
            raise ValueError(f"MODEL.CLIP.LAYERS needs 4 stage depths, got {list(layers)}")
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

        self._out_features = list(out_features or _STAGES)
        unknown = set(self._out_features) - set(_STAGES)
        if unknown:
            raise ValueError(f"MODEL.CLIP.OUT_FEATURES has unknown names {sorted(unknown)}; use {_STAGES}")
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

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: B x 3 x H x W, normalised with CLIP's pixel mean and std.
        Returns:
            dict of the requested res2..res5 maps, res_k of shape B x (w * 2^k) x H/2^k x W/2^k.
        """
        outputs = {}
        x = self.stem(x)
        for name, stage in zip(_STAGES, self.stages):
            x = stage(x)
            outputs[name] = x
        return {name: outputs[name] for name in self._out_features}

    def attention_pool(self, res5: torch.Tensor):
        """(global B x D, dense B x D x H/32 x W/32) embeddings of a res5 map; D = EMBED_DIM."""
        if self.attnpool is None:
            raise RuntimeError("This CLIPResNet was built without its attention pool")
        return dense_attention_pool(self.attnpool, res5)

    def output_shape(self):
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


def clip_norm(cfg) -> str:
    """MODEL.CLIP.NORM, with "SyncBN" resolved for the device: torch's SyncBatchNorm runs on GPUs only,
    Detectron2's NaiveSyncBatchNorm also synchronises CPU processes (gloo)."""
    norm = cfg.MODEL.CLIP.NORM
    if norm == "SyncBN" and torch.device(cfg.MODEL.DEVICE).type == "cpu":
        return "naiveSyncBN"
    return norm


def clip_resnet_from_config(cfg, with_attention_pool: bool) -> CLIPResNet:
    clip = cfg.MODEL.CLIP
    return CLIPResNet(
        layers=clip.LAYERS,
        width=clip.WIDTH,
        embed_dim=clip.EMBED_DIM,
        input_resolution=clip.INPUT_RESOLUTION,
        with_attention_pool=with_attention_pool,
        norm=clip_norm(cfg),
        freeze_at=clip.FREEZE_AT,
        out_features=clip.OUT_FEATURES,
    )


@BACKBONE_REGISTRY.register()
def build_clip_resnet_backbone(cfg, input_shape: ShapeSpec):
    """The CLIP image encoder alone (no FPN); keeps the attention pool when DENSECLIP is enabled."""
    if input_shape.channels != 3:
        raise ValueError(f"CLIP's image encoder takes 3 input channels, got {input_shape.channels}")
    return clip_resnet_from_config(cfg, with_attention_pool=cfg.MODEL.DENSECLIP.ENABLED)
