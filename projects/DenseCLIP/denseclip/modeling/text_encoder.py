"""CLIP's text encoder with learnable context tokens, one prompt per class name, and the vocabularies
(any names, tokenized once) it encodes."""
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn

from detectron2.config import configurable

__all__ = ["ACTIVATIONS", "ContextTextEncoder", "Vocabulary", "parse_vocabulary", "tokenize_class_names"]

# MODEL.CLIP.ACTIVATION: every OpenAI CLIP model uses QuickGELU (x * sigmoid(1.702 x)); open_clip
# models trained from scratch without the "-quickgelu" suffix use GELU.
ACTIVATIONS = {"QuickGELU": QuickGELU, "GELU": nn.GELU}

# Token positions of CLIP's text encoder (its positional embedding), the most a prompt can use.
CLIP_CONTEXT_LENGTH = 77

_TOKENIZER = None


def _tokenizer() -> SimpleTokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SimpleTokenizer()
    return _TOKENIZER


def parse_vocabulary(names: Union[str, Sequence[str]]) -> List[str]:
    """
    The names of a vocabulary (names to compute score maps of), given as a list of names or as one
    string of comma-separated names (demo.py's --vocabulary), each stripped of surrounding spaces.

    Raises:
        ValueError for an empty vocabulary or an empty name; TypeError for a name that is not a string.
    """
    if isinstance(names, str):
        names = names.split(",")
    names = list(names)
    not_strings = [name for name in names if not isinstance(name, str)]
    if not_strings:
        raise TypeError(f"Vocabulary names must be strings, got {not_strings!r}")
    stripped = [name.strip() for name in names]
    if not stripped:
        raise ValueError("The vocabulary is empty: give at least one name (or none at all for the model's classes)")
    empty = [str(position) for position, name in enumerate(stripped, 1) if not name]
    if empty:
        raise ValueError(
            f"The vocabulary {names!r} has an empty name (position {', '.join(empty)}): give each name "
            f"between commas, or drop the empty ones"
        )
    return stripped


def tokenize_class_names(class_names: Sequence[str], prompt_length: int) -> torch.Tensor:
    """
    Tokenize each class name with CLIP's BPE into ``prompt_length`` positions:
    start token, the name's tokens, end token, zero padding.

    Returns:
        K x prompt_length int64 tensor.
    Raises:
        ValueError naming every class whose tokens do not fit.
    """
    if len(class_names) == 0:
        raise ValueError("DenseCLIP needs at least one class name for its text prompts")
    tokenizer = _tokenizer()
    encoded = [tokenizer.encode(name) for name in class_names]
    too_long = [
        f"{name!r} ({len(ids)} tokens)"
        for name, ids in zip(class_names, encoded)
        if len(ids) + 2 > prompt_length
    ]
    if too_long:
        longest = max(len(ids) for ids in encoded) + 2
        raise ValueError(
            f"Class names too long for MODEL.DENSECLIP.PROMPT_LENGTH={prompt_length} (start and end "
            f"token included, {prompt_length - 2} name tokens fit): {', '.join(too_long)}. "
            f"Shorten these names (MODEL.DENSECLIP.CLASS_NAMES, the dataset's category names or the "
            f"vocabulary). When training from CLIP weights (their text encoder has {CLIP_CONTEXT_LENGTH} "
            f"positions, for PROMPT_LENGTH + NUM_CONTEXT), MODEL.DENSECLIP.PROMPT_LENGTH {longest} also "
            f"works; a trained model only loads with the PROMPT_LENGTH it was trained with, so with one, "
            f"shorten the names."
        )
    tokens = torch.zeros(len(class_names), prompt_length, dtype=torch.long)
    for row, ids in enumerate(encoded):
        ids = [tokenizer.sot_token_id] + ids + [tokenizer.eot_token_id]
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """K names to score and their prompts' token ids (K x prompt_length, :func:`tokenize_class_names`).
    Made by :meth:`ContextTextEncoder.vocabulary`, which checks that each name fits the prompt."""

    names: Tuple[str, ...]
    token_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.names)


class ContextTextEncoder(TextTransformer):
    """
    CLIP's text transformer (open_clip's module, frozen) encoding, for each class k,
    ``[start] [ctx_1] .. [ctx_M] [name_k tokens] [end] [pad]..`` where the M context vectors are
    learned and shared by all classes. The output is read at the end token and projected.

    Parameter names match CLIP checkpoints' text keys (``transformer.*``, ``token_embedding.weight``,
    ``positional_embedding``, ``ln_final.*``, ``text_projection``); ``contexts`` is DenseCLIP's own.
    Only the first ``prompt_length + num_context`` positional embeddings are kept.

    It encodes the training classes, or any other names (a :class:`Vocabulary`, made once by
    :meth:`vocabulary`) with the same learned contexts. In eval mode each vocabulary's K x D output is
    computed once and reused until any of the module's tensors change (an optimizer step, loading
    weights, moving devices); requests from several threads share the cache.
    """

    _CACHED_VOCABULARIES = 8
    _LOCK = threading.Lock()  # one cache update at a time (a class attribute: modules stay copyable)

    @configurable
    def __init__(
        self,
        class_names: Sequence[str],
        *,
        embed_dim: int,
        width: int,
        heads: int,
        layers: int,
        vocab_size: int,
        prompt_length: int,
        num_context: int,
        activation: str,
        cache_in_eval: bool,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"MODEL.CLIP.ACTIVATION must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        super().__init__(
            context_length=prompt_length + num_context,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            output_dim=embed_dim,
            act_layer=ACTIVATIONS[activation],
        )
        self.class_names: List[str] = list(class_names)
        self.prompt_length = prompt_length
        self.num_context = num_context
        self.activation = activation
        self.register_buffer(
            "token_ids", tokenize_class_names(self.class_names, prompt_length), persistent=False
        )
        self.requires_grad_(False)  # CLIP's text encoder stays frozen; only the contexts learn.
        if num_context > 0:
            self.contexts = nn.Parameter(torch.empty(num_context, width))
            nn.init.trunc_normal_(self.contexts)  # the release's start: std 1, cut at +-2
        else:
            self.contexts = None
        self.cache_in_eval = cache_in_eval
        self._embeddings: "OrderedDict[Tuple[str, ...], Tuple[tuple, torch.Tensor]]" = OrderedDict()
        self._vocabularies: "OrderedDict[Tuple[str, ...], Vocabulary]" = OrderedDict()

    @classmethod
    def from_config(cls, cfg):
        text = cfg.MODEL.CLIP.TEXT
        if not cfg.MODEL.DENSECLIP.CLASS_NAMES:
            raise ValueError(
                "DenseCLIP's text encoder needs the class names of its prompts: MODEL.DENSECLIP.CLASS_NAMES "
                "(a DenseCLIP meta-architecture takes them from the metadata of DATASETS.TRAIN[0])"
            )
        return {
            "class_names": list(cfg.MODEL.DENSECLIP.CLASS_NAMES),
            "embed_dim": cfg.MODEL.CLIP.EMBED_DIM,
            "width": text.WIDTH,
            "heads": text.HEADS,
            "layers": text.LAYERS,
            "vocab_size": text.VOCAB_SIZE,
            "prompt_length": cfg.MODEL.DENSECLIP.PROMPT_LENGTH,
            "num_context": cfg.MODEL.DENSECLIP.NUM_CONTEXT,
            "activation": cfg.MODEL.CLIP.ACTIVATION,
            "cache_in_eval": cfg.MODEL.DENSECLIP.CACHE_TEXT_EMBEDDINGS,
        }

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def encode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """
        Run the transformer on K tokenized names: K x D class embeddings (float32, autocast off).

        The first 1 + M positions (start token and contexts) are the same for every class, and the
        causal mask keeps them from seeing the class tokens; so they are computed once, and only
        the class positions run per class, attending to the shared prefix. Same result as running
        the K full sequences, with about 1 / 3 of the work for COCO's prompts.
        """
        with torch.autocast(token_ids.device.type, enabled=False):
            embeddings = self.token_embedding(token_ids)  # K x P x W
            num_classes, shared = embeddings.shape[0], 1 + self.num_context
            prefix = embeddings[:1, :1]
            if self.contexts is not None:
                prefix = torch.cat([prefix, self.contexts[None].to(prefix.dtype)], dim=1)
            prefix = prefix + self.positional_embedding[:shared]  # 1 x (1 + M) x W
            suffix = embeddings[:, 1:] + self.positional_embedding[shared:]  # K x (P - 1) x W
            mask = self.attn_mask
            for block in self.transformer.resblocks:
                # open_clip's ResidualAttentionBlock, with the class positions as queries.
                keys = block.ln_1(torch.cat([prefix.expand(num_classes, -1, -1), suffix], dim=1))
                suffix = suffix + block.ls_1(
                    block.attention(q_x=keys[:, shared:], k_x=keys, v_x=keys, attn_mask=mask[shared:])
                )
                suffix = suffix + block.ls_2(block.mlp(block.ln_2(suffix)))
                prefix = block(prefix, attn_mask=mask[:shared, :shared])
            x = self.ln_final(suffix)
            # The end token has the largest id; it sits at its token position - 1 in the suffix.
            end = token_ids.argmax(dim=-1) - 1
            x = x[torch.arange(num_classes, device=x.device), end]
            return x @ self.text_projection

    @property
    def classes(self) -> Vocabulary:
        """The training classes as a vocabulary."""
        return Vocabulary(tuple(self.class_names), self.token_ids)

    def vocabulary(self, names: Union[None, str, Sequence[str], Vocabulary] = None) -> Vocabulary:
        """
        ``names`` (a list, or one string of comma-separated names: :func:`parse_vocabulary`) parsed and
        tokenized into a :class:`Vocabulary`, once per name list; None gives the training classes.

        Raises:
            ValueError naming the names that do not fit the prompt (:func:`tokenize_class_names`).
        """
        if isinstance(names, Vocabulary):
            return names
        if names is None:
            return self.classes
        key = tuple(parse_vocabulary(names))
        if key == tuple(self.class_names):
            return self.classes
        with self._LOCK:
            vocabulary = self._vocabularies.get(key)
        if vocabulary is None:
            vocabulary = Vocabulary(key, tokenize_class_names(key, self.prompt_length))
            with self._LOCK:
                self._vocabularies[key] = vocabulary
                while len(self._vocabularies) > self._CACHED_VOCABULARIES:
                    self._vocabularies.popitem(last=False)
        return vocabulary

    def _tensors_version(self):
        return tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))

    def forward(self, vocabulary: Union[None, str, Sequence[str], Vocabulary] = None) -> torch.Tensor:
        """
        Args:
            vocabulary: what to encode (:meth:`vocabulary`): None encodes the training classes.
        Returns:
            K x D text embeddings, cached in eval mode.
        """
        vocabulary = self.vocabulary(vocabulary)
        token_ids = vocabulary.token_ids.to(self.token_ids.device)
        if self.training or not self.cache_in_eval:
            self._embeddings.clear()
            return self.encode(token_ids)
        key, version = vocabulary.names, self._tensors_version()
        with self._LOCK:
            cached = self._embeddings.get(key)
        if cached is None or cached[0] != version:
            with torch.no_grad():
                cached = (version, self.encode(token_ids))
        with self._LOCK:
            self._embeddings[key] = cached
            self._embeddings.move_to_end(key)
            while len(self._embeddings) > self._CACHED_VOCABULARIES:
                self._embeddings.popitem(last=False)
        return cached[1]

    def train(self, mode: bool = True):
        if mode:
            self._embeddings.clear()  # training recomputes every time; free the memory
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_context={self.num_context}, activation={self.activation}"
