import math

import open_clip
import pytest
import torch

from detectron2.layers import ShapeSpec

from denseclip.checkpoint import DenseCLIPCheckpointer, as_clip_state_dict, load_clip_weights
from denseclip.modeling import ContextTextEncoder, build_clip_fpn_backbone, tokenize_class_names

from helpers import backbone_cfg, clip_resnet, relative_error, text_encoder, tiny_cfg

NAMES = ["person", "traffic light", "hair drier", "dog"]


def tiny_encoder(**overrides):
    torch.manual_seed(0)
    return text_encoder(NAMES, **overrides)


def test_tokenization_layout():
    tokens = tokenize_class_names(["dog", "traffic light"], prompt_length=5)
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    assert tokens.shape == (2, 5)
    assert tokens[0].tolist() == [tokenizer.sot_token_id, *tokenizer.encode("dog"), tokenizer.eot_token_id, 0, 0]
    assert tokens[1, 0] == tokenizer.sot_token_id and tokens[1, 3] == tokenizer.eot_token_id


def test_name_too_long_for_prompt_is_a_clear_error():
    with pytest.raises(ValueError) as error:
        tokenize_class_names(["dog", "a very long class name"], prompt_length=5)
    message = str(error.value)
    assert "'a very long class name'" in message and "'dog'" not in message
    assert "MODEL.DENSECLIP.PROMPT_LENGTH 7" in message
    # when raising PROMPT_LENGTH applies (CLIP's 77 positions), and what to do with a trained model
    assert "training from CLIP weights" in message and "77 positions" in message
    assert "a trained model only loads with the PROMPT_LENGTH it was trained with" in message


OPENAI_TEXT = {"RN50-quickgelu": 1024, "RN101-quickgelu": 512}  # embedding size of each


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPENAI_TEXT))
@pytest.mark.parametrize("file_format", ["torchscript", "state_dict"])
def test_text_encoder_equals_openai_clip_through_model_weights(name, file_format, open_clip_models, clip_checkpoints):
    """With no contexts and CLIP's 77 positions, the text encoder is CLIP's own: loaded through
    MODEL.WEIGHTS from an OpenAI-style TorchScript archive or an open_clip state dict, it gives
    open_clip's encode_text of OpenAI's architecture (QuickGELU)."""
    cfg = tiny_cfg(class_names=NAMES)
    cfg.MODEL.CLIP.LAYERS = [3, 4, 23, 3] if "RN101" in name else [3, 4, 6, 3]
    cfg.MODEL.CLIP.WIDTH, cfg.MODEL.CLIP.EMBED_DIM, cfg.MODEL.CLIP.INPUT_RESOLUTION = 64, OPENAI_TEXT[name], 224
    cfg.MODEL.CLIP.TEXT.WIDTH, cfg.MODEL.CLIP.TEXT.HEADS, cfg.MODEL.CLIP.TEXT.LAYERS = 512, 8, 12
    cfg.MODEL.DENSECLIP.PROMPT_LENGTH, cfg.MODEL.DENSECLIP.NUM_CONTEXT = 77, 0
    backbone = build_clip_fpn_backbone(backbone_cfg(cfg), ShapeSpec(channels=3)).eval()
    DenseCLIPCheckpointer(backbone).load(clip_checkpoints(name)[file_format])
    text_encoder = next(m for m in backbone.modules() if isinstance(m, ContextTextEncoder))
    assert text_encoder.activation == "QuickGELU"
    with torch.no_grad():
        expected = open_clip_models(name).encode_text(open_clip.get_tokenizer(name)(NAMES))
        actual = text_encoder()
    assert actual.shape == (len(NAMES), OPENAI_TEXT[name])
    assert relative_error(actual, expected) <= 1e-5


def test_gelu_text_encoder_is_another_function(open_clip_models):
    """The activation matters: the same weights with GELU (open_clip's plain "RN50") give other embeddings."""
    clip = open_clip_models("RN50-quickgelu")
    encoders = {}
    for activation in ("QuickGELU", "GELU"):
        encoders[activation] = text_encoder(
            NAMES, embed_dim=1024, width=512, heads=8, layers=12, prompt_length=77, num_context=0,
            activation=activation,
        ).eval()
        load_clip_weights(torch.nn.ModuleDict({"text": encoders[activation], "image": _rn50_image_encoder()}),
                          as_clip_state_dict(clip.state_dict()))
    with torch.no_grad():
        expected = clip.encode_text(open_clip.get_tokenizer("RN50")(NAMES))
        assert relative_error(encoders["QuickGELU"](), expected) <= 1e-5
        assert relative_error(encoders["GELU"](), expected) > 1e-3


def test_contexts_start_as_the_release_does():
    """The release's rule: torch's trunc_normal_ defaults, mean 0, std 1, cut at -2 and 2."""
    torch.manual_seed(0)
    contexts = text_encoder(NAMES, width=512, num_context=8).contexts
    assert contexts.shape == (8, 512)
    assert contexts.abs().max().item() <= 2.0
    assert contexts.abs().max().item() > 1.9  # the cut is reached, nothing is rescaled
    # Standard deviation of a unit normal truncated at +-2: sqrt(1 - 4 phi(2) / (2 Phi(2) - 1)).
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    expected_std = math.sqrt(1 - 4 * phi2 / math.erf(2 / math.sqrt(2)))
    assert contexts.std().item() == pytest.approx(expected_std, rel=0.03)
    assert abs(contexts.mean().item()) < 0.05


def _rn50_image_encoder():
    return clip_resnet(layers=[3, 4, 6, 3], width=64, embed_dim=1024, input_resolution=224)


def test_contexts_sit_after_start_token_and_are_the_only_trainable_part():
    encoder = tiny_encoder(num_context=4).train()
    assert encoder.positional_embedding.shape == (5 + 4, 32)
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable == ["contexts"]
    out = encoder()
    out.sum().backward()
    assert encoder.contexts.grad is not None and encoder.contexts.grad.abs().sum() > 0

    # Same result as running the K full sequences [start, contexts, name, end, pad] through the
    # transformer (encode() shares the start-and-contexts prefix between classes).
    with torch.no_grad():
        x = encoder.token_embedding(encoder.token_ids)
        x = torch.cat([x[:, :1], encoder.contexts.expand(4, -1, -1), x[:, 1:]], dim=1)
        x = encoder.ln_final(encoder.transformer(x + encoder.positional_embedding, attn_mask=encoder.attn_mask))
        end = encoder.token_ids.argmax(-1) + 4
        expected = x[torch.arange(4), end] @ encoder.text_projection
    torch.testing.assert_close(out.detach(), expected)


def test_eval_cache_runs_transformer_once_and_follows_changes():
    encoder = tiny_encoder().eval()
    runs = []
    encoder.token_embedding.register_forward_hook(lambda *args: runs.append(1))  # once per encode
    first = encoder()
    for _ in range(3):
        assert encoder() is first
    assert len(runs) == 1

    with torch.no_grad():
        encoder.contexts.add_(1.0)  # as an optimizer step would
    changed = encoder()
    assert len(runs) == 2 and not torch.allclose(changed, first)

    encoder.load_state_dict(tiny_encoder().state_dict())
    torch.testing.assert_close(encoder(), first)
    assert len(runs) == 3

    encoder.train()
    encoder()
    encoder()
    assert len(runs) == 5  # training always recomputes (the contexts are learning)


def test_cache_can_be_disabled():
    encoder = tiny_encoder(cache_in_eval=False).eval()
    runs = []
    encoder.token_embedding.register_forward_hook(lambda *args: runs.append(1))  # once per encode
    torch.testing.assert_close(encoder(), encoder())
    assert len(runs) == 2


# Names of 1, 2 and 3 BPE tokens: three prompt lengths, so three groups in encode().
LENGTHS_NAMES = ["dog", "traffic light", "fire hydrant", "person", "chest of drawers", "hair drier", "sky"]


def randomized_encoder(names=LENGTHS_NAMES, dtype=torch.float64, **overrides):
    """A two-layer tiny encoder whose every frozen tensor is random (open_clip starts attention and
    projection biases at 0 and LayerNorms at 1: a misplaced bias or norm would not show)."""
    torch.manual_seed(0)
    encoder = text_encoder(names, layers=2, **overrides).to(dtype)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_final"):
                parameter.copy_(torch.randn_like(parameter) * 0.2 + (name.endswith("weight")))
    return encoder


def full_prompts(encoder, token_ids):
    """The K full prompts [start, contexts, name, end, pad] through open_clip's TextTransformer parts:
    K x D embeddings read at the end token."""
    x = encoder.token_embedding(token_ids)
    count, contexts = len(token_ids), encoder.contexts if encoder.contexts is not None else x.new_zeros(0, x.shape[-1])
    x = torch.cat([x[:, :1], contexts.expand(count, -1, -1), x[:, 1:]], dim=1) + encoder.positional_embedding
    x = encoder.ln_final(encoder.transformer(x, attn_mask=encoder.attn_mask.to(x.dtype)))
    end = token_ids.argmax(-1) + len(contexts)
    return x[torch.arange(count), end] @ encoder.text_projection


def embeddings_and_context_gradients(encode, encoder, token_ids):
    out = encode(token_ids)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (gradient,) = torch.autograd.grad((out * weights).sum(), encoder.contexts)
    return out.detach(), gradient


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_encode_equals_full_prompts_with_context_gradients(dtype, tolerance):
    """Shared prefix keys and values, each class run up to its end token, grouped by length: the same
    embeddings and context gradients as the full causal forward of every prompt."""
    encoder = randomized_encoder(dtype=dtype).train()
    ids = encoder.token_ids
    assert sorted(set(ids.argmax(-1).tolist())) == [2, 3, 4]  # three lengths
    out, gradient = embeddings_and_context_gradients(encoder.encode, encoder, ids)
    expected, expected_gradient = embeddings_and_context_gradients(lambda t: full_prompts(encoder, t), encoder, ids)
    assert out.shape == (len(LENGTHS_NAMES), 32) and out.dtype == dtype
    assert relative_error(out, expected) <= tolerance
    assert relative_error(gradient, expected_gradient) <= tolerance


def test_vocabulary_through_forward_equals_full_prompts():
    encoder = randomized_encoder().train()
    vocabulary = ["conveyer belt", "cat", "wine glass", "skyscraper", "potted plant", "sofa"]
    expected = full_prompts(encoder, tokenize_class_names(vocabulary, 5))
    assert relative_error(encoder(vocabulary), expected) <= 1e-12
    assert relative_error(encoder(), full_prompts(encoder, encoder.token_ids)) <= 1e-12


def test_without_contexts_equals_full_prompts():
    encoder = randomized_encoder(num_context=0, prompt_length=7).eval()
    with torch.no_grad():
        assert relative_error(encoder(), full_prompts(encoder, encoder.token_ids)) <= 1e-12


def test_length_groups_computed_once_per_class_set(monkeypatch):
    from denseclip.modeling import text_encoder as module

    computed = []
    group = module._group_by_length
    monkeypatch.setattr(module, "_group_by_length", lambda *args: computed.append(1) or group(*args))
    encoder = randomized_encoder().train()
    for _ in range(3):
        encoder()
    assert len(computed) == 1
    vocabulary = ["cat", "conveyer belt"]
    for _ in range(3):
        encoder(vocabulary)  # tokenized anew each time: recognized by its token ids
    assert len(computed) == 2
    encoder()
    assert len(computed) == 2
    groups = encoder._length_groups(tokenize_class_names(vocabulary, 5))
    assert groups.sizes == ((1, 2), (1, 4)) and groups.end_rows.tolist() == [1, 5]


def _spy_on_fallback(encoder, monkeypatch):
    """Calls of encoder._encode_shared_prefix, recorded in the returned list."""
    calls, shared_prefix = [], encoder._encode_shared_prefix
    monkeypatch.setattr(encoder, "_encode_shared_prefix", lambda ids: calls.append(1) or shared_prefix(ids))
    return calls


def test_shared_prefix_fallback_gives_the_same_embeddings(monkeypatch):
    encoder = randomized_encoder().train()
    shared_prefix = encoder._encode_shared_prefix
    fallback = _spy_on_fallback(encoder, monkeypatch)
    out = encoder.encode(encoder.token_ids)
    assert fallback == []  # open_clip's plain blocks take the grouped path
    assert relative_error(shared_prefix(encoder.token_ids), out) <= 1e-12


def _layer_scale(block):
    block.ls_1 = open_clip.transformer.LayerScale(block.ln_1.normalized_shape[0], 0.5).double()


def _attention_with(**options):
    def change(block):
        old = block.attn
        block.attn = torch.nn.MultiheadAttention(old.embed_dim, old.num_heads, batch_first=True, **options).double()
        block.attn.load_state_dict(old.state_dict(), strict=False)
    return change


class _SubclassedBlock(open_clip.transformer.ResidualAttentionBlock):
    pass


def _subclass(block):
    block.__class__ = _SubclassedBlock


@pytest.mark.parametrize("change", [_layer_scale, _attention_with(add_bias_kv=True), _attention_with(add_zero_attn=True),
                                    _subclass], ids=["layer_scale", "bias_kv", "zero_attn", "subclass"])
def test_non_standard_block_takes_the_shared_prefix_fallback(change, monkeypatch):
    """A block the grouped path cannot reproduce from in_proj / out_proj alone (the second of two
    here) runs the shared-prefix path, which still gives the full prompts' embeddings."""
    encoder = randomized_encoder().train()
    change(encoder.transformer.resblocks[1])
    fallback = _spy_on_fallback(encoder, monkeypatch)
    out = encoder.encode(encoder.token_ids)
    assert fallback == [1]
    assert relative_error(out, full_prompts(encoder, encoder.token_ids)) <= 1e-12


def test_attention_dropout_takes_the_fallback_only_in_training(monkeypatch):
    encoder = randomized_encoder()
    _attention_with(dropout=0.5)(encoder.transformer.resblocks[0])
    fallback = _spy_on_fallback(encoder, monkeypatch)
    encoder.train().encode(encoder.token_ids)
    assert fallback == [1]
    with torch.no_grad():
        out = encoder.eval().encode(encoder.token_ids)
        assert fallback == [1]
        assert relative_error(out, full_prompts(encoder, encoder.token_ids)) <= 1e-12
