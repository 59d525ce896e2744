"""DenseCLIP's context decoder: class text embeddings attend to the image (vision-to-language prompting)."""
import torch
from torch import nn

__all__ = ["ContextDecoder"]


class ContextDecoder(nn.Module):
    """
    Pre-norm transformer decoder over the K text embeddings, with the image tokens as memory.

    memory: LayerNorm(D) -> Linear(D, width) -> LayerNorm(width)
    text:   LayerNorm(D) -> Linear(D, width)
    layers: self-attention over text, cross-attention to memory, MLP (width -> 4 width -> width, GELU)
    output: LayerNorm(width) -> Linear(width, D)
    """

    def __init__(
        self,
        visual_dim: int = 1024,
        width: int = 256,
        heads: int = 4,
        layers: int = 3,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.memory_proj = nn.Sequential(
            nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width), nn.LayerNorm(width)
        )
        self.text_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width))
        layer = nn.TransformerDecoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=4 * width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers=layers)
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, visual_dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            # q/k/v live in one packed matrix, not in nn.Linear modules.
            nn.init.trunc_normal_(module.in_proj_weight, std=0.02)
            nn.init.zeros_(module.in_proj_bias)
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
        x = self.decoder(x, memory)
        return self.out_proj(x)
