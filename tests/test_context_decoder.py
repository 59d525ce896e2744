import math

import pytest
import torch
import torch.nn.functional as F

from denseclip.modeling import ContextDecoder, PixelTextScoreMap

from helpers import context_decoder_parameters, count_parameters, text_encoder


def test_release_shapes_names_and_parameter_count():
    decoder = ContextDecoder(visual_dim=1024, width=256, heads=4, layers=3, dropout=0.1)
    assert count_parameters(decoder) == context_decoder_parameters(1024, 256, 3)
    names = [n for n, _ in decoder.named_parameters()]
    assert not [n for n in names if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    assert {n.split(".", 2)[2] for n in names if n.startswith("layers.0.")} == {
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
        *(f"{attn}.{p}_proj.weight" for attn in ("self_attn", "cross_attn") for p in "qkv"),
        *(f"{attn}.out_proj.{p}" for attn in ("self_attn", "cross_attn") for p in ("weight", "bias")),
        "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias",
    }
    out = decoder(torch.randn(2, 80, 1024), torch.randn(2, 1 + 25 * 40, 1024))
    assert out.shape == (2, 80, 1024)


def test_initialisation():
    torch.manual_seed(0)
    decoder = ContextDecoder(visual_dim=1024, width=256, heads=4, layers=3, dropout=0.1)
    linears = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.std().item() == pytest.approx(0.02, rel=0.1) for m in linears if m.weight.numel() > 10000)
    assert all((m.bias == 0).all() for m in linears if m.bias is not None)
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)


def release_attention(attention, query, memory, heads):
    """softmax(q k^T / sqrt(d)) v over heads, q/k/v projected without bias, then the output projection."""
    b, n, c = query.shape
    d = c // heads
    q = (query @ attention.q_proj.weight.T).view(b, n, heads, d).transpose(1, 2)
    k = (memory @ attention.k_proj.weight.T).view(b, -1, heads, d).transpose(1, 2)
    v = (memory @ attention.v_proj.weight.T).view(b, -1, heads, d).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    x = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return x @ attention.out_proj.weight.T + attention.out_proj.bias


def test_dropout_sits_where_the_release_puts_it():
    """In training, dropout acts after each attention's output projection, after the MLP's GELU and
    after the MLP, and nowhere else (not on the attention weights): the release's layer, recomputed
    by hand with the dropout draws recorded at exactly those places, gives the module's output."""
    torch.manual_seed(0)
    decoder = ContextDecoder(visual_dim=32, width=16, heads=2, layers=2, dropout=0.5).train()
    drawn = []  # (input, output) of every dropout call, in call order
    for module in decoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda m, args, out: drawn.append((args[0], out)))
    text, visual = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    out = decoder(text, visual)
    assert len(drawn) == 4 * 2
    assert any((o == 0).any() for _, o in drawn)  # dropout did draw

    draws = iter(drawn)

    def dropout(x):
        recorded_input, recorded_output = next(draws)
        torch.testing.assert_close(x, recorded_input)  # this place, and this tensor, is dropped out
        return recorded_output

    with torch.no_grad():
        memory = decoder.memory_proj(visual)
        x = decoder.text_proj(text)
        for layer in decoder.layers:
            q = layer.norm1(x)
            x = x + dropout(release_attention(layer.self_attn, q, q, heads=2))
            x = x + dropout(release_attention(layer.cross_attn, layer.norm2(x), memory, heads=2))
            hidden = dropout(F.gelu(layer.norm3(x) @ layer.mlp[0].weight.T + layer.mlp[0].bias))
            x = x + dropout(hidden @ layer.mlp[3].weight.T + layer.mlp[3].bias)
        expected = decoder.out_proj(x)
    torch.testing.assert_close(out.detach(), expected)


def test_score_map_is_cosine_over_tau_with_refined_text():
    torch.manual_seed(0)
    encoder = text_encoder(["cat", "dog", "traffic light", "person"], num_context=2).eval()
    decoder = ContextDecoder(visual_dim=32, width=16, heads=2, layers=1, dropout=0.1).eval()
    score_map = PixelTextScoreMap(text_encoder=encoder, context_decoder=decoder, tau=0.07, gamma_init=1e-4)
    assert torch.equal(score_map.gamma, torch.full((32,), 1e-4))
    global_embedding, dense = torch.randn(2, 32), torch.randn(2, 32, 3, 5)
    with torch.no_grad():
        scores = score_map(global_embedding, dense)
        text = encoder().expand(2, -1, -1)
        visual = torch.cat([global_embedding[:, None], dense.flatten(2).transpose(1, 2)], dim=1)
        text = text + 1e-4 * decoder(text, visual)
        expected = torch.einsum(
            "bdhw,bkd->bkhw", F.normalize(dense, dim=1), F.normalize(text, dim=-1)
        ) / 0.07
    assert scores.shape == (2, 4, 3, 5) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected)
