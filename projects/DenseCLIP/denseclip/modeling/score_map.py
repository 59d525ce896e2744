"""Pixel-text score maps: dense CLIP image embeddings matched against context-refined class embeddings."""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from .context_decoder import ContextDecoder
from .text_encoder import ContextTextEncoder

__all__ = ["PixelTextScoreMap"]


class PixelTextScoreMap(nn.Module):
    """
    s = <normalize(z), normalize(t + gamma * decoder(t, [global; z]))> / tau, with z the dense image
    embedding and t the class text embeddings. Computed in float32 (also under autocast).
    """

    @configurable
    def __init__(
        self, *, text_encoder: ContextTextEncoder, context_decoder: ContextDecoder, tau: float, gamma_init: float
    ):
        super().__init__()
        self.text_encoder = text_encoder
        self.context_decoder = context_decoder
        self.gamma = nn.Parameter(torch.full((text_encoder.text_projection.shape[1],), gamma_init))
        self.tau = tau

    @classmethod
    def from_config(cls, cfg):
        return {
            "text_encoder": ContextTextEncoder(cfg),
            "context_decoder": ContextDecoder(cfg),
            "tau": cfg.MODEL.DENSECLIP.TAU,
            "gamma_init": cfg.MODEL.DENSECLIP.GAMMA_INIT,
        }

    @property
    def class_names(self):
        return self.text_encoder.class_names

    def cosine(
        self,
        global_embedding: torch.Tensor,
        dense_embedding: torch.Tensor,
        class_names: Optional[Sequence[str]] = None,
    ) -> torch.Tensor:
        """
        Args:
            global_embedding: B x D.
            dense_embedding: B x D x H x W.
            class_names: the K names to score; None scores the training classes.
        Returns:
            B x K x H x W cosine similarities (float32), before the temperature.
        """
        with torch.autocast(dense_embedding.device.type, enabled=False):
            dense = dense_embedding.float()
            visual = torch.cat([global_embedding.float()[:, None], dense.flatten(2).transpose(1, 2)], dim=1)
            text = self.text_encoder(class_names).float().expand(dense.shape[0], -1, -1)  # B x K x D
            text = text + self.gamma * self.context_decoder(text, visual)
            dense = F.normalize(dense, dim=1)
            text = F.normalize(text, dim=2)
            return torch.einsum("bdhw,bkd->bkhw", dense, text)

    def forward(
        self,
        global_embedding: torch.Tensor,
        dense_embedding: torch.Tensor,
        class_names: Optional[Sequence[str]] = None,
    ) -> torch.Tensor:
        """The B x K x H x W score map: :meth:`cosine` / tau (float32)."""
        return self.cosine(global_embedding, dense_embedding, class_names) / self.tau
