"""CLIP's attention pool evaluated at every location (dense), and a new one for any backbone."""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone

__all__ = [
    "GRID_MODES",
    "AttentionPooledBackbone",
    "dense_attention_pool",
    "new_attention_pool",
    "resize_positional_grid",
]

#: How the attention pool's positional grid meets a feature map of another size (MODEL.CLIP.ATTENTION_POOL_GRID):
#: "crop" takes its top-left H x W part (the detection release; interpolated up first if the map is
#: larger), "resize" interpolates the whole grid bilinearly to H x W (the segmentation release).
GRID_MODES = ("crop", "resize")


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
    if not torch.jit.is_tracing() and (side, side) == tuple(size):
        return positional_embedding  # (resized anyway while tracing: the graph then fits every size)
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=size, mode="bilinear", align_corners=False)
    grid = grid.to(positional_embedding.dtype).permute(0, 2, 3, 1).reshape(size[0] * size[1], -1)
    return torch.cat([cls_pos, grid], dim=0)


def _positional_embedding_for(positional_embedding: torch.Tensor, height: int, width: int, mode: str = "crop"):
    """
    Positional embedding for an H x W feature map. "crop": the top-left H x W part of the grid, as in
    the detection release; a grid smaller than the feature map is first interpolated up (the release
    fails there). "resize": the whole grid resized bilinearly to H x W, as in the segmentation release.
    """
    if mode == "resize":
        return resize_positional_grid(positional_embedding, (height, width))
    if mode != "crop":
        raise ValueError(f"MODEL.CLIP.ATTENTION_POOL_GRID must be one of {GRID_MODES}, got {mode!r}")
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


def dense_attention_pool(pool: AttentionPool2d, x: torch.Tensor, grid_mode: str = "crop"):
    """
    CLIP's attention pool applied with every token as a query, not only the mean token.

    Args:
        pool: open_clip's AttentionPool2d (its weights are used unchanged).
        x: B x C x H x W feature map (res5).
        grid_mode: how the positional grid meets an H x W map of another size (:data:`GRID_MODES`).
    Returns:
        global_embedding: B x D, what CLIP's attention pool returns;
        dense_embedding: B x D x H x W, the same attention evaluated at each location.
    """
    batch, channels, height, width = x.shape
    tokens = x.flatten(2).permute(2, 0, 1)  # HW x B x C
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
    positional = _positional_embedding_for(pool.positional_embedding, height, width, grid_mode)
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


def new_attention_pool(in_channels: int, embed_dim: int, heads: int, grid_size: int) -> AttentionPool2d:
    """CLIP's attention pool with a grid_size x grid_size positional grid, initialised as CLIP
    initialises its own (q, k, v and output projections with std in_channels^-0.5)."""
    pool = AttentionPool2d(grid_size, in_channels, heads, embed_dim)
    std = in_channels**-0.5
    for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        nn.init.normal_(linear.weight, std=std)
    return pool


class AttentionPooledBackbone(Backbone):
    """
    Any Detectron2 backbone with a new, randomly initialised attention pool on its top feature map,
    which projects it into the text encoder's embedding space: DenseCLIP on any image encoder.
    ``forward`` is the backbone's own; :meth:`forward_with_embeddings` adds the pool's embeddings.
    """

    def __init__(
        self, net: Backbone, in_feature: str, embed_dim: int, heads: int, grid_size: int, grid_mode: str = "crop"
    ):
        super().__init__()
        if grid_mode not in GRID_MODES:
            raise ValueError(f"MODEL.CLIP.ATTENTION_POOL_GRID must be one of {GRID_MODES}, got {grid_mode!r}")
        self.grid_mode = grid_mode
        shapes = net.output_shape()
        if in_feature not in shapes:
            raise ValueError(
                f"The attention pool reads {in_feature!r}, which the backbone does not output ({list(shapes)})"
            )
        self.net = net
        self.in_feature = in_feature
        self.attnpool = new_attention_pool(shapes[in_feature].channels, embed_dim, heads, grid_size)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.net(x)

    def forward_with_embeddings(self, x: torch.Tensor):
        """The backbone's features, and global (B x D) and dense (B x D x h x w) embeddings of ``in_feature``."""
        features = self.net(x)
        global_embedding, dense_embedding = dense_attention_pool(
            self.attnpool, features[self.in_feature], self.grid_mode
        )
        return features, global_embedding, dense_embedding

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return self.net.output_shape()

    @property
    def size_divisibility(self) -> int:
        return self.net.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return self.net.padding_constraints
