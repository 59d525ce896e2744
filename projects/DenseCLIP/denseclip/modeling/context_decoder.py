"""DenseCLIP's context decoder: class text embeddings attend to the image (vision-to-language prompting)."""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

__all__ = ["ContextDecoder", "ContextDecoderLayer", "DecoderAttention"]


class DecoderAttention(nn.Module):
    """
    Multi-head attention as the release's context decoder has it: q, k, v projections without bias,
    an output projection with bias, and dropout after the output projection only (none on the
    attention weights).
    """

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"The context decoder's width {width} is not divisible by its {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.out_proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """query: B x Q x C, memory: B x N x C -> B x Q x C."""
        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(memory))
        v = self._split_heads(self.v_proj(memory))
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C / heads)) v
        x = x.transpose(1, 2).flatten(2)
        return self.dropout(self.out_proj(x))


class ContextDecoderLayer(nn.Module):
    """Pre-norm: self-attention over the text tokens, cross-attention to the image, MLP (GELU)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = DecoderAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.cross_attn = DecoderAttention(width, heads, dropout)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(4 * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, text: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.norm1(text)
        text = text + self.self_attn(x, x)
        text = text + self.cross_attn(self.norm2(text), memory)
        return text + self.mlp(self.norm3(text))


class ContextDecoder(nn.Module):
    """
    Transformer decoder over the K text embeddings, with the image tokens as memory.

    memory: LayerNorm(D) -> Linear(D, width) -> LayerNorm(width)
    text:   LayerNorm(D) -> Linear(D, width)
    layers: ContextDecoderLayer x ``layers``
    output: LayerNorm(width) -> Linear(width, D)
    Linear weights start truncated-normal with std 0.02, biases at 0.
    """

    @configurable
    def __init__(self, *, visual_dim: int, width: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.memory_proj = nn.Sequential(
            nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width), nn.LayerNorm(width)
        )
        self.text_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width))
        self.layers = nn.ModuleList([ContextDecoderLayer(width, heads, dropout) for _ in range(layers)])
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, visual_dim))
        self.apply(self._init_weights)

    @classmethod
    def from_config(cls, cfg):
        decoder = cfg.MODEL.DENSECLIP.CONTEXT_DECODER
        return {
            "visual_dim": cfg.MODEL.CLIP.EMBED_DIM,
            "width": decoder.WIDTH,
            "heads": decoder.HEADS,
            "layers": decoder.LAYERS,
            "dropout": decoder.DROPOUT,
        }

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """
        Args:
            text: B x K x D text embeddings.
            visual: B x N x D image tokens (global token first, then the H*W dense ones).
        Returns:
            B x K x D update for the text embeddings.
        """
        memory = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.layers:
            x = layer(x, memory)
        return self.out_proj(x)
