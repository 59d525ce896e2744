import open_clip
import pytest
import torch

from denseclip.checkpoint import as_clip_state_dict, load_clip_weights
from denseclip.modeling import ContextTextEncoder, tokenize_class_names

NAMES = ["person", "traffic light", "hair drier", "dog"]


def tiny_encoder(num_context=4, names=NAMES, **kwargs):
    torch.manual_seed(0)
    return ContextTextEncoder(names, embed_dim=32, width=32, heads=2, layers=1, num_context=num_context, **kwargs)


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


def test_zero_context_matches_open_clip_encode_text(open_clip_rn50):
    encoder = ContextTextEncoder(NAMES, embed_dim=1024, num_context=0).eval()
    load_clip_weights(torch.nn.ModuleDict({"text": encoder, "image": _rn50_image_encoder()}),
                      as_clip_state_dict(open_clip_rn50.state_dict()))
    with torch.no_grad():
        expected = open_clip_rn50.encode_text(open_clip.get_tokenizer("RN50")(NAMES))
        actual = encoder()
    assert actual.shape == (4, 1024)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def _rn50_image_encoder():
    from denseclip.modeling import CLIPResNet

    return CLIPResNet([3, 4, 6, 3], input_resolution=224)


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
