"""FLOP / parameter counting (denseclip.utils.analysis, tools/analyze_model.py) and tools/benchmark.py,
on tiny models and small inputs."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d
from torch import nn

from detectron2.modeling import build_model

from denseclip import get_denseclip_cfg
from denseclip.modeling.backbone.clip_resnet import dense_attention_pool
from denseclip.utils.analysis import (
    IGNORED_OPS,
    SCRIPTED_HELPERS,
    analyze_flops,
    cached_text_embeddings,
    count_inference_flops,
    count_module_flops,
    count_rcnn_flops,
    parameter_split,
)

from helpers import tiny_detector_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MASK_RCNN = os.path.join(ROOT, "configs/Shapes-InstanceSegmentation/mask_rcnn_denseclip_tiny_FPN.yaml")
TEXT_ENCODER = "backbone.bottom_up.score_map.text_encoder"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine's cores are shared: oversubscribed intra-op threads make tiny models crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image(size=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, size, size, generator=generator) * 255, "height": size, "width": size}]


@pytest.fixture(scope="module")
def mask_rcnn():
    torch.manual_seed(0)
    return build_model(get_denseclip_cfg(TINY_MASK_RCNN, ["MODEL.DEVICE", "cpu"])).eval()


@pytest.fixture(scope="module")
def retinanet():
    torch.manual_seed(0)
    return build_model(tiny_detector_cfg("retinanet")).eval()


def assert_all_ops_accounted(count):
    assert dict(count.unsupported) == {}
    for op in count.ignored:
        name = op[len("prim::CallFunction["):-1] if op.startswith("prim::CallFunction[") else op
        assert name in IGNORED_OPS or name in SCRIPTED_HELPERS, op


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_every_op_counted_or_deliberately_ignored(kind, request):
    model = request.getfixturevalue(kind)
    report = analyze_flops(model, [image()])
    assert_all_ops_accounted(report.inference)
    assert_all_ops_accounted(report.text_encoder)
    # DenseCLIP's own parts are in the count: attention pool, context decoder, score map.
    assert {"scaled_dot_product_attention", "einsum"} <= set(report.inference.by_operator)
    assert report.inference.by_module["backbone.bottom_up.score_map.context_decoder"] > 0
    assert report.inference.by_module[TEXT_ENCODER] == 0  # cached: out of the trace
    assert report.text_encoder.total > 0


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_text_encoder_is_exactly_the_difference(kind, request):
    model = request.getfixturevalue(kind)
    report = analyze_flops(model, [image()])
    with cached_text_embeddings(model, enabled=False):
        uncached = count_inference_flops(model, image())
    assert uncached.by_module[TEXT_ENCODER] == pytest.approx(report.text_encoder.total, rel=1e-12)
    assert uncached.total == pytest.approx(report.total_with_text_encoder, rel=1e-12)
    assert report.inference.total < uncached.total


class _Attention(nn.Module):
    def __init__(self, dim, heads, batch_first):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=batch_first)

    def forward(self, query, memory=None):
        memory = query if memory is None else memory  # self-attention: the same tensor, not a copy
        return self.attention(query, memory, memory, need_weights=False)[0]


# batch_first=True in eval under no_grad takes nn.MultiheadAttention's fused fast path for
# self-attention; otherwise it runs linear layers around scaled_dot_product_attention.
@pytest.mark.parametrize(
    "batch_first, cross, op",
    [
        (True, False, "_native_multi_head_attention"),
        (False, False, "scaled_dot_product_attention"),
        (False, True, "scaled_dot_product_attention"),
    ],
)
def test_multi_head_attention_closed_form(batch_first, cross, op):
    batch, length, source, dim, heads = 2, 5, 7 if cross else 5, 16, 4
    module = _Attention(dim, heads, batch_first).eval()
    shape = (lambda n: (batch, n, dim)) if batch_first else (lambda n: (n, batch, dim))
    query = torch.randn(shape(length))
    inputs = (query, torch.randn(shape(source))) if cross else (query,)
    count = count_module_flops(module, inputs)
    expected = batch * (
        length * dim * dim  # q projection
        + 2 * source * dim * dim  # k, v projections
        + 2 * length * source * dim  # q k^T and attention x v, over all heads
        + length * dim * dim  # output projection
    )
    assert count.total == expected
    assert op in count.by_operator
    assert dict(count.unsupported) == {}


class _Baddbmm(nn.Module):
    def forward(self, bias, a, b):
        return torch.baddbmm(bias, a, b)


def test_baddbmm_closed_form():
    count = count_module_flops(_Baddbmm(), (torch.randn(3, 4, 6), torch.randn(3, 4, 5), torch.randn(3, 5, 6)))
    assert count.total == 3 * 4 * 5 * 6


class _DensePool(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return dense_attention_pool(self.pool, x)


def test_dense_attention_pool_closed_form():
    batch, channels, height, width, out_dim = 2, 32, 3, 4, 24
    pool = AttentionPool2d(spacial_dim=4, embed_dim=channels, num_heads=4, output_dim=out_dim).eval()
    count = count_module_flops(_DensePool(pool), (torch.randn(batch, channels, height, width),))
    tokens = height * width + 1  # the mean token, then every location
    expected = batch * (
        height * width * channels  # the mean token (a reduction: one add per element)
        + 3 * tokens * channels * channels  # q, k, v projections
        + 2 * tokens * tokens * channels  # attention products
        + tokens * channels * out_dim  # c_proj
    )
    assert count.total == expected


def box_branch(count):
    return sum(count.by_module[f"roi_heads.{m}"] for m in ("box_pooler", "box_head", "box_predictor"))


def mask_branch(count):
    return count.by_module["roi_heads.mask_pooler"] + count.by_module["roi_heads.mask_head"]


def test_rcnn_dummy_workload_scales_with_boxes(mask_rcnn):
    with cached_text_embeddings(mask_rcnn):
        full = count_rcnn_flops(mask_rcnn, image())
        tenth = count_rcnn_flops(mask_rcnn, image(), num_box_proposals=100, num_mask_boxes=10)
        other_image = count_rcnn_flops(mask_rcnn, image(160, seed=1))
    assert box_branch(full) == pytest.approx(10 * box_branch(tenth), rel=1e-12)
    assert mask_branch(full) == pytest.approx(10 * mask_branch(tenth), rel=1e-12)
    assert full.by_module["roi_heads"] == pytest.approx(box_branch(full) + mask_branch(full), rel=1e-12)
    # A fixed workload: what the image yields does not matter.
    assert other_image.by_module["roi_heads"] == full.by_module["roi_heads"]
    assert other_image.by_module["backbone"] > full.by_module["backbone"]


def test_parameter_split(mask_rcnn):
    split = parameter_split(mask_rcnn)
    text = sum(p.numel() for n, p in mask_rcnn.named_parameters() if "text_encoder." in n and not n.endswith("contexts"))
    assert split["text_encoder"] == text > 0
    assert split["inference"] + split["text_encoder"] == sum(p.numel() for p in mask_rcnn.parameters())


def test_analyze_model_json_prints_one_object():
    command = [
        sys.executable, os.path.join(ROOT, "tools/analyze_model.py"), "--config-file", TINY_MASK_RCNN,
        "--input-size", "128", "160", "--format", "json", "MODEL.ROI_HEADS.NUM_CLASSES", "5",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert report["input_size"] == [128, 160]
    assert report["unsupported_ops"] == {}
    assert report["rcnn_dummy_workload"] == {"box_proposals": 1000, "mask_boxes": 100}
    assert set(report["gflops_by_module"]) == {"backbone", "proposal_generator", "roi_heads"}
    assert sum(report["gflops_by_module"].values()) == pytest.approx(report["gflops"], abs=1e-3)
    assert report["gflops_total_with_text_encoder"] == pytest.approx(
        report["gflops"] + report["gflops_text_encoder"], abs=1e-3
    )
    assert 0 < report["params_m"] and 0 < report["params_m_text_encoder"]
    assert report["params_m_total"] == pytest.approx(report["params_m"] + report["params_m_text_encoder"], abs=1e-3)


@pytest.fixture(scope="module")
def benchmark_main():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from benchmark import main
    finally:
        sys.path.pop(0)
    return main


def positive_finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


BENCHMARK_ARGS = ["--config-file", TINY_MASK_RCNN, "--warmup", "1", "--iterations", "2", "--input-size", "128", "128",
                  "--threads", "1"]


def test_benchmark_inference_smoke(benchmark_main, capsys):
    benchmark_main(BENCHMARK_ARGS + ["--task", "inference"])
    printed = capsys.readouterr().out
    ratios = [float(r) for r in re.findall(r"ratio to CLIP ([0-9.]+)", printed)]
    assert len(ratios) == 2 and all(positive_finite(r) for r in ratios), printed


def test_benchmark_train_smoke(benchmark_main, capsys):
    benchmark_main(BENCHMARK_ARGS + ["--task", "train", "--format", "json"])
    result = json.loads(capsys.readouterr().out)
    assert positive_finite(result["ratio"])
    assert all(positive_finite(s) for s in result["seconds"].values())
    assert all(positive_finite(m) for m in result["peak_memory_mb"].values())
    assert positive_finite(result["memory_ratio"])
