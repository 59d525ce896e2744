"""CLIP's text encoder with learnable context tokens, one prompt per class name, and the vocabularies
(any names, tokenized once) it encodes."""
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, TextTransformer
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
        names = names.split(",") if names.strip() else []  # a blank string names nothing: empty, not one empty name
    names = list(names)
    not_strings = [name for name in names if not isinstance(name, str)]
    if not_strings:
        raise TypeError(f"Vocabulary names must be strings, got {not_strings!r}")
    stripped = [name.strip() for name in names]
    if not stripped:
        raise ValueError("The vocabulary is empty: give at least one name (a model's own classes need no vocabulary)")
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
        causal mask keeps them from seeing the class tokens; so they run once, their keys and values
        are projected once per layer, and each class runs only its name positions up to its end
        token (the later ones cannot reach it), classes of one length together. Same result as
        running the K full sequences, with 1 / 5.6 of their work for COCO's prompts.
        """
        if not all(_is_packed_attention_block(block) for block in self.transformer.resblocks):
            return self._encode_shared_prefix(token_ids)
        with torch.autocast(token_ids.device.type, enabled=False):
            groups = self._length_groups(token_ids)
            embeddings = self.token_embedding(token_ids)  # K x P x W
            shared = 1 + self.num_context
            prefix = embeddings[0, :1]
            if self.contexts is not None:
                prefix = torch.cat([prefix, self.contexts.to(prefix.dtype)])
            prefix = prefix + self.positional_embedding[:shared]  # (1 + M) x W
            # Token position p of a name sits at position M + p of its prompt.
            names = embeddings[groups.row_classes, groups.row_positions]
            names = names + self.positional_embedding[groups.row_positions + shared - 1]  # T x W
            x = torch.cat([prefix, names])  # the prefix's rows, then the names' rows group by group
            mask = self.attn_mask.to(x.dtype)
            for block in self.transformer.resblocks:
                attn = block.attn
                qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
                x = x + attn.out_proj(_grouped_attention(qkv, shared, groups.sizes, attn.num_heads, mask))
                x = x + block.mlp(block.ln_2(x))
            x = self.ln_final(x[shared + groups.end_rows])
            return x @ self.text_projection

    def _encode_shared_prefix(self, token_ids: torch.Tensor) -> torch.Tensor:
        """
        :meth:`encode` for any open_clip block with an ``attention(q_x, k_x, v_x)`` method: the
        prefix runs once, every class runs all P - 1 name positions attending to it (K x D).
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

    _LENGTH_GROUP_SETS = 8
    _last_length_groups = None  # (token-id tensor, its version, its groups) of the last call
    _length_group_cache = None  # token-id content -> groups, most recent last

    def _length_groups(self, token_ids: torch.Tensor) -> "_LengthGroups":
        """:func:`_group_by_length` of K x P token ids, computed once per class set: the same tensor
        (the training classes' buffer) is recognized without reading it back from its device."""
        last = self._last_length_groups
        if last is not None and last[0] is token_ids and last[1] == token_ids._version:
            return last[2]
        ids = token_ids.detach().cpu().numpy()  # unlike tolist(), leaves no op in a traced graph
        key = (str(token_ids.device), ids.shape, ids.tobytes())
        with self._LOCK:
            if self._length_group_cache is None:
                self._length_group_cache = OrderedDict()
            cache = self._length_group_cache
            groups = cache.get(key)
            if groups is None:
                groups = cache[key] = _group_by_length(ids.tolist(), token_ids.device)
                while len(cache) > self._LENGTH_GROUP_SETS:
                    cache.popitem(last=False)
            cache.move_to_end(key)
        self._last_length_groups = (token_ids, token_ids._version, groups)
        return groups

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


def _is_packed_attention_block(block: nn.Module) -> bool:
    """
    Whether a block is open_clip's plain ResidualAttentionBlock, ``x + attn(ln_1(x))`` then
    ``x + mlp(ln_2(x))``, with nn.MultiheadAttention's packed q/k/v projection and nothing else:
    no layer scales, no extra key/value biases or zero attention, no active dropout. Only these
    blocks can be run by :func:`_grouped_attention` from ``in_proj_weight`` and ``out_proj``.
    """
    if type(block) is not ResidualAttentionBlock:
        return False
    if type(block.ls_1) is not nn.Identity or type(block.ls_2) is not nn.Identity:
        return False
    attn = block.attn
    return (
        type(attn) is nn.MultiheadAttention
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
        and (attn.dropout == 0 or not attn.training)
    )


class _LengthGroups(NamedTuple):
    """The name positions that matter, grouped by prompt length (see :func:`_group_by_length`)."""

    sizes: Tuple[Tuple[int, int], ...]  # (classes, positions) of each group, shortest first
    row_classes: torch.Tensor  # T: the class of each name row
    row_positions: torch.Tensor  # T: its token position, 1 .. the class's end token
    end_rows: torch.Tensor  # K: the row of each class's end token


def _group_by_length(token_ids: List[List[int]], device: torch.device) -> _LengthGroups:
    """
    Rows for the positions 1 .. end of each class's K x P token ids (the end token has the
    largest id), classes of the same end position in one group, in class order within a group.
    """
    ends = [max(range(len(ids)), key=ids.__getitem__) for ids in token_ids]
    sizes, row_classes, row_positions, end_rows = [], [], [], [0] * len(ends)
    for length in sorted(set(ends)):
        classes = [k for k, end in enumerate(ends) if end == length]
        sizes.append((len(classes), length))
        for k in classes:
            row_classes += [k] * length
            row_positions += range(1, length + 1)
            end_rows[k] = len(row_classes) - 1
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return _LengthGroups(tuple(sizes), as_tensor(row_classes), as_tensor(row_positions), as_tensor(end_rows))


def _grouped_attention(
    qkv: torch.Tensor, shared: int, sizes: Sequence[Tuple[int, int]], heads: int, mask: torch.Tensor
) -> torch.Tensor:
    """
    Multi-head attention of :meth:`ContextTextEncoder.encode`'s rows, before the output projection.

    Args:
        qkv: (S + T) x 3W packed queries, keys and values: the S shared prefix rows, then each
            group's classes x positions rows.
        sizes: (classes, positions) of each group.
        mask: the causal mask (additive).
    Returns:
        (S + T) x W: the prefix attends to itself, each name position to the whole prefix (its
        keys and values shared by all classes) and to its class's positions up to its own.
    """
    width = qkv.shape[-1] // 3

    def split(rows, classes, positions):  # 3 tensors, classes x heads x positions x W / heads
        return rows.view(classes, positions, 3, heads, width // heads).permute(2, 0, 3, 1, 4)

    prefix_q, prefix_k, prefix_v = split(qkv[:shared], 1, shared)
    outputs = [F.scaled_dot_product_attention(prefix_q, prefix_k, prefix_v, attn_mask=mask[:shared, :shared])]
    start = shared
    for classes, positions in sizes:
        q, k, v = split(qkv[start : start + classes * positions], classes, positions)
        k = torch.cat([prefix_k.expand(classes, -1, -1, -1), k], dim=2)
        v = torch.cat([prefix_v.expand(classes, -1, -1, -1), v], dim=2)
        # The causal mask's rows for these positions: aligned bottom-right, as the queries are the
        # keys' last positions.
        name_mask = mask[shared : shared + positions, : shared + positions]
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=name_mask))
        start += classes * positions
    return torch.cat([out.transpose(1, 2).reshape(-1, width) for out in outputs])
