"""Pixel-text score maps: dense CLIP image embeddings matched against context-refined class embeddings."""
from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from .context_decoder import ContextDecoder
from .text_encoder import ContextTextEncoder, Vocabulary

__all__ = ["FrozenTextEmbeddings", "PixelTextScoreMap"]

Names = Union[None, str, Sequence[str], Vocabulary]


class FrozenTextEmbeddings(nn.Module):
    """
    A text encoder's K x D embeddings of some vocabularies, computed once and kept as buffers: the text
    side of an exported graph (:meth:`PixelTextScoreMap.frozen_text_embeddings`). Called like the encoder.
    """

    def __init__(self, text_encoder: ContextTextEncoder, vocabularies: Sequence[Vocabulary]):
        super().__init__()
        self.class_names = list(text_encoder.class_names)
        self._encoder_vocabulary = text_encoder.vocabulary
        self._names = {}
        with torch.no_grad():
            for index, vocabulary in enumerate([text_encoder.classes, *vocabularies]):
                self._names[vocabulary.names] = f"embeddings_{index}"
                self.register_buffer(f"embeddings_{index}", text_encoder(vocabulary).detach().clone())

    def vocabulary(self, names: Names = None) -> Vocabulary:
        return self._encoder_vocabulary(names)

    def forward(self, vocabulary: Names = None) -> torch.Tensor:
        names = self.vocabulary(vocabulary).names
        if names not in self._names:
            raise ValueError(f"No text embeddings were frozen for {list(names)}; name them when freezing (--vocabulary)")
        return getattr(self, self._names[names])


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

    def vocabulary(self, names: Names = None) -> Vocabulary:
        """Names to score (a list, or one string of comma-separated names), parsed and tokenized once
        into a :class:`Vocabulary` whose text embeddings are then cached; None gives the training classes.
        A name that does not fit the prompt is refused here, with the fix."""
        return self.text_encoder.vocabulary(names)

    @contextmanager
    def frozen_text_embeddings(self, vocabularies: Sequence[Vocabulary] = ()) -> Iterator[None]:
        """Within the context the text encoder is replaced by its embeddings of the classes and of
        ``vocabularies``, computed once (:class:`FrozenTextEmbeddings`): what an exported graph holds."""
        text_encoder = self.text_encoder
        self.text_encoder = FrozenTextEmbeddings(text_encoder, vocabularies)
        try:
            yield
        finally:
            self.text_encoder = text_encoder

    def cosine(self, global_embedding: torch.Tensor, dense_embedding: torch.Tensor, vocabulary: Names = None) -> torch.Tensor:
        """
        Args:
            global_embedding: B x D.
            dense_embedding: B x D x H x W.
            vocabulary: the K names to score (:meth:`vocabulary`); None scores the training classes.
        Returns:
            B x K x H x W cosine similarities (float32), before the temperature.
        """
        with torch.autocast(dense_embedding.device.type, enabled=False):
            dense = dense_embedding.float()
            visual = torch.cat([global_embedding.float()[:, None], dense.flatten(2).transpose(1, 2)], dim=1)
            text = self.text_encoder(vocabulary).float().expand(dense.shape[0], -1, -1)  # B x K x D
            text = text + self.gamma * self.context_decoder(text, visual)
            dense = F.normalize(dense, dim=1)
            text = F.normalize(text, dim=2)
            return torch.einsum("bdhw,bkd->bkhw", dense, text)

    def forward(self, global_embedding: torch.Tensor, dense_embedding: torch.Tensor, vocabulary: Names = None) -> torch.Tensor:
        """The B x K x H x W score map: :meth:`cosine` / tau (float32)."""
        return self.cosine(global_embedding, dense_embedding, vocabulary) / self.tau
