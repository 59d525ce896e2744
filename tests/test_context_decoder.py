import pytest
import torch
import torch.nn.functional as F

from denseclip.modeling import ContextDecoder, PixelTextScoreMap

from test_text_encoder import tiny_encoder


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_release_shapes_and_parameter_count():
    decoder = ContextDecoder(visual_dim=1024, width=256, heads=4, layers=3, dropout=0.1)
    assert len(decoder.decoder.layers) == 3
    layer = decoder.decoder.layers[0]
    assert layer.norm_first and layer.self_attn.num_heads == 4 and layer.linear1.out_features == 1024
    assert count(decoder) / 1e6 == pytest.approx(3.95, abs=0.05)  # DESIGN.md: about 3.9M
    out = decoder(torch.randn(2, 80, 1024), torch.randn(2, 1 + 25 * 40, 1024))
    assert out.shape == (2, 80, 1024)


def test_initialisation():
    torch.manual_seed(0)
    decoder = ContextDecoder(visual_dim=1024)
    linear = decoder.memory_proj[1].weight
    assert linear.std().item() == pytest.approx(0.02, rel=0.05)
    assert decoder.decoder.layers[0].self_attn.in_proj_weight.std().item() == pytest.approx(0.02, rel=0.05)
    biases = [p for n, p in decoder.named_parameters() if n.endswith("bias") and "norm" not in n]
    assert biases and all((b == 0).all() for b in biases)


def test_score_map_is_cosine_over_tau_with_refined_text():
    torch.manual_seed(0)
    encoder = tiny_encoder(num_context=2).eval()
    decoder = ContextDecoder(visual_dim=32, width=16, heads=2, layers=1).eval()
    score_map = PixelTextScoreMap(encoder, decoder, embed_dim=32, tau=0.07, gamma_init=1e-4)
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
    assert scores.abs().max() <= 1 / 0.07 + 1e-4
