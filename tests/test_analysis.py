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
from fvcore.nn import FlopCountAnalysis
from open_clip.modified_resnet import AttentionPool2d
from torch import nn

from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis as DetectorFlopCountAnalysis

from denseclip import get_denseclip_cfg
from denseclip.modeling.backbone import dense_attention_pool
from denseclip.utils.analysis import IGNORED_OPS, FlopReport, count_flops, parameter_split

from helpers import REPO, count_parameters, load_script, tiny_detector_cfg, tiny_sem_seg_cfg

TINY_MASK_RCNN = os.path.join(REPO, "configs/Shapes-InstanceSegmentation/mask_rcnn_denseclip_tiny_FPN.yaml")
TEXT_ENCODER = "backbone.score_map.text_encoder"


def flops_of(module, inputs) -> FlopReport:
    with torch.no_grad():
        return FlopReport().add(FlopCountAnalysis(module, inputs))


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


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_every_op_counted_or_deliberately_ignored(kind, request):
    model = request.getfixturevalue(kind)
    inference, text = count_flops(model, image())
    assert dict(inference.unsupported) == {} and dict(text.unsupported) == {}
    # DenseCLIP's own parts are in the count: attention pool, context decoder, score map.
    assert {"scaled_dot_product_attention", "einsum"} <= set(inference.by_operator)
    assert inference.by_module["backbone.score_map.context_decoder"] > 0
    assert inference.by_module[TEXT_ENCODER] == 0  # cached: out of the trace
    assert text.total > 0
    assert not set(IGNORED_OPS) & set(inference.by_operator)


@pytest.mark.parametrize("kind", ["mask_rcnn", "retinanet"])
def test_text_encoder_is_exactly_the_difference(kind, request):
    """Traced with its cache off, the model's text encoder costs exactly what is counted apart."""
    model = request.getfixturevalue(kind)
    inference, text = count_flops(model, image())
    encoder = model.backbone.score_map.text_encoder
    encoder.cache_in_eval = False
    try:
        with torch.no_grad():
            if kind == "retinanet":
                uncached = FlopReport().add(DetectorFlopCountAnalysis(model, image()), strip="model.")
            else:
                images = model.preprocess_image(image()).tensor
                uncached = FlopReport().add(FlopCountAnalysis(model.backbone, (images,)), prefix="backbone")
    finally:
        encoder.cache_in_eval = True
    assert uncached.by_module[TEXT_ENCODER] == pytest.approx(text.total, rel=1e-12)



def test_text_encoder_flops_in_closed_form(retinanet):
    """The text encoder runs the S = 1 + M shared rows (start token, contexts) once and each class's
    name positions 1 .. e_k (its end token) only: T = sum e_k rows. Per layer, on the S + T rows:
    q, k, v, output and MLP projections (12 W^2 each), two layer norms (5 flops per element), and
    attention products over each row's keys, the rectangle of fvcore's sdpa count (2 W per pair):
    the prefix S x S, class k e_k x (S + e_k). Then ln_final and the projection on the K end rows."""
    _, text = count_flops(retinanet, image())
    encoder = retinanet.backbone.score_map.text_encoder
    width, layers, dim = encoder.width, len(encoder.transformer.resblocks), encoder.text_projection.shape[1]
    shared, ends = 1 + encoder.num_context, encoder.token_ids.argmax(-1).tolist()
    assert sorted(set(ends)) == [2, 3]  # "cat", "dog": 1 name token; "traffic light": 2
    rows = shared + sum(ends)
    pairs = shared * shared + sum(end * (shared + end) for end in ends)
    layer = 12 * width * width * rows + 2 * width * pairs + 2 * 5 * width * rows
    expected = layers * layer + 5 * len(ends) * width + len(ends) * width * dim
    assert text.total == expected
    assert dict(text.by_operator) == {
        "linear": layers * 12 * width * width * rows, "scaled_dot_product_attention": layers * 2 * width * pairs,
        "layer_norm": 5 * width * (2 * layers * rows + len(ends)), "matmul": len(ends) * width * dim,
    }

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
    flops = flops_of(module, inputs)
    expected = batch * (
        length * dim * dim  # q projection
        + 2 * source * dim * dim  # k, v projections
        + 2 * length * source * dim  # q k^T and attention x v, over all heads
        + length * dim * dim  # output projection
    )
    assert flops.total == expected
    assert op in flops.by_operator
    assert dict(flops.unsupported) == {}


class _Baddbmm(nn.Module):
    def forward(self, bias, a, b):
        return torch.baddbmm(bias, a, b)


def test_baddbmm_closed_form():
    flops = flops_of(_Baddbmm(), (torch.randn(3, 4, 6), torch.randn(3, 4, 5), torch.randn(3, 5, 6)))
    assert flops.total == 3 * 4 * 5 * 6


class _DensePool(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return dense_attention_pool(self.pool, x)


def test_dense_attention_pool_closed_form():
    batch, channels, height, width, out_dim = 2, 32, 3, 4, 24
    pool = AttentionPool2d(spacial_dim=4, embed_dim=channels, num_heads=4, output_dim=out_dim).eval()
    flops = flops_of(_DensePool(pool), (torch.randn(batch, channels, height, width),))
    tokens = height * width + 1  # the mean token, then every location
    expected = batch * (
        height * width * channels  # the mean token (a reduction: one add per element)
        + 3 * tokens * channels * channels  # q, k, v projections
        + 2 * tokens * tokens * channels  # attention products
        + tokens * channels * out_dim  # c_proj
    )
    assert flops.total == expected


def test_rcnn_dummy_workload_scales_with_boxes(mask_rcnn):
    full, _ = count_flops(mask_rcnn, image())
    tenth, _ = count_flops(mask_rcnn, image(), num_boxes=100, num_masks=10)
    other_image, _ = count_flops(mask_rcnn, image(160, seed=1))
    box = ("roi_heads.box_pooler", "roi_heads.box_head", "roi_heads.box_predictor")
    mask = ("roi_heads.mask_pooler", "roi_heads.mask_head")
    for branch in (box, mask):
        assert sum(full.by_module[m] for m in branch) == pytest.approx(10 * sum(tenth.by_module[m] for m in branch))
        assert all(full.by_module[m] > 0 for m in branch)
    assert full.by_module["roi_heads"] == pytest.approx(sum(full.by_module[m] for m in box + mask), rel=1e-12)
    assert full.total == pytest.approx(sum(full.by_module[m] for m in ("backbone", "proposal_generator", "roi_heads")))
    # A fixed workload: what the image yields does not matter.
    assert other_image.by_module["roi_heads"] == full.by_module["roi_heads"]
    assert other_image.by_module["backbone"] > full.by_module["backbone"]


def test_parameter_split(mask_rcnn):
    """The frozen text encoder in closed form (CLIP's text transformer of the tiny config: width 64,
    2 layers, 13 positions, projection to 64); inference is every other module, the contexts included."""
    width, layers, embed = 64, 2, 64
    block = 2 * (2 * width) + (3 * width * width + 3 * width) + (width * width + width)  # ln_1, ln_2, attention
    block += (width * 4 * width + 4 * width) + (4 * width * width + width)  # MLP
    text = 49408 * width + 13 * width + layers * block + 2 * width + width * embed
    backbone = mask_rcnn.backbone
    inference = sum(count_parameters(m) for m in (
        backbone.bottom_up, backbone.neck, backbone.score_map.context_decoder, mask_rcnn.proposal_generator,
        mask_rcnn.roi_heads,
    )) + backbone.score_map.gamma.numel() + backbone.score_map.text_encoder.contexts.numel()
    assert parameter_split(mask_rcnn) == {"inference": inference, "text_encoder": text}


def test_analyze_model_table_and_summary_count_the_same(mask_rcnn, capsys):
    """The parameter table's model row is everything; the summary says how that splits (inference + text
    encoder), so the two add up."""
    load_script("tools/analyze_model.py").main(["--config-file", TINY_MASK_RCNN, "--tasks", "parameter"])
    printed = capsys.readouterr().out
    total = sum(p.numel() for p in mask_rcnn.parameters()) / 1e6
    text = sum(p.numel() for n, p in mask_rcnn.named_parameters() if n.startswith(TEXT_ENCODER) and "contexts" not in n) / 1e6
    assert float(re.search(r"\| model +\| ([\d.]+)M", printed).group(1)) == round(total, 1)
    summary = re.search(r"Parameters: ([\d.]+)M in all .* = ([\d.]+)M for inference \+ ([\d.]+)M of the frozen text encoder", printed)
    assert summary, printed
    assert [float(x) for x in summary.groups()] == [round(total, 2), round(total - text, 2), round(text, 2)]
    assert f"({TEXT_ENCODER})" in printed


def test_analyze_model_input_size_is_height_then_width():
    """As the README says: --input-size H W."""
    tool = load_script("tools/analyze_model.py")
    (batch,) = tool.flop_inputs(None, tool.parse_args(["--config-file", TINY_MASK_RCNN, "--input-size", "96", "160"]))
    assert batch[0]["image"].shape == (3, 96, 160) and (batch[0]["height"], batch[0]["width"]) == (96, 160)


@pytest.mark.slow
def test_analyze_model_json_prints_one_object():
    command = [
        sys.executable, os.path.join(REPO, "tools/analyze_model.py"), "--config-file", TINY_MASK_RCNN,
        "--input-size", "128", "160", "--format", "json", "MODEL.ROI_HEADS.NUM_CLASSES", "5",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, check=True)
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert report["input"] == [128, 160]
    assert report["unsupported_ops"] == {}
    assert report["rcnn_dummy_workload"] == {"box_proposals": 1000, "mask_boxes": 100}
    top_level = {k: v for k, v in report["gflops_by_module"].items() if "." not in k}
    assert set(top_level) == {"backbone", "proposal_generator", "roi_heads"}
    assert sum(top_level.values()) == pytest.approx(report["gflops"], abs=1e-3)
    assert 0 < report["gflops_text_encoder"]
    assert 0 < report["params_m"] and 0 < report["params_m_text_encoder"]


@pytest.fixture(scope="module")
def benchmark_main():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        from benchmark import main
    finally:
        sys.path.pop(0)
    return main


def positive_finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


BENCHMARK_ARGS = ["--config-file", TINY_MASK_RCNN, "--warmup", "1", "--iterations", "2", "--input-size", "128", "128",
                  "--threads", "1"]


def table_rows(printed: str) -> dict:
    """The benchmark's table: {model: [numbers of its row]} (None for "OOM")."""
    rows = {}
    for line in printed.splitlines():
        cells = line.split()
        if len(cells) >= 4 and cells[0] in ("baseline", "denseclip", "denseclip_uncached", "detectron2"):
            rows[cells[0]] = [None if c == "OOM" else float(c) for c in cells[1:]]
    return rows


@pytest.mark.slow
def test_benchmark_inference_smoke(benchmark_main, capsys):
    benchmark_main(BENCHMARK_ARGS + ["--task", "inference"])
    printed = capsys.readouterr().out
    assert "baseline (CLIP): the same config, GeneralizedRCNN" in printed
    rows = table_rows(printed)
    assert set(rows) == {"baseline", "denseclip", "denseclip_uncached"}
    assert all(positive_finite(value) for row in rows.values() for value in row), printed


def test_benchmark_table_beside_detectron2_at_a_tiny_size(benchmark_main, capsys):
    """Each row: seconds per batch of 2, images per second, and the ratios to the CLIP baseline and
    to Detectron2's own RetinaNet R50-FPN, which are the rows' seconds divided."""
    config = os.path.join(REPO, "configs/Shapes-Detection/retinanet_denseclip_tiny_FPN.yaml")
    benchmark_main(["--config-file", config, "--detectron2", "--warmup", "0", "--iterations", "1",
                    "--input-size", "64", "64", "--batch-size", "2", "--threads", "1"])
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("inference of 2 x 64 x 64 on cpu, float32, 1 CPU threads")
    assert "detectron2: COCO-Detection/retinanet_R_50_FPN_1x.yaml, random weights" in printed
    rows = table_rows(printed)
    assert set(rows) == {"baseline", "denseclip", "denseclip_uncached", "detectron2"}
    seconds = {name: row[0] for name, row in rows.items()}
    for name, (second, images, to_clip, to_d2) in rows.items():
        assert second > 0
        assert images == pytest.approx(2 / second, rel=0.01, abs=0.01)
        assert to_clip == pytest.approx(second / seconds["baseline"], rel=0.01, abs=0.002)
        assert to_d2 == pytest.approx(second / seconds["detectron2"], rel=0.01, abs=0.002)
    assert rows["baseline"][2] == rows["detectron2"][3] == 1.0


@pytest.mark.slow
def test_benchmark_train_smoke(benchmark_main, capsys):
    benchmark_main(BENCHMARK_ARGS + ["--task", "train", "--format", "json"])
    result = json.loads(capsys.readouterr().out)
    assert positive_finite(result["ratio"]["denseclip"])
    assert all(positive_finite(s) for s in result["seconds"].values())
    assert result["peak_memory_mb"] is None and result["memory_ratio"] is None  # measured on GPUs only


def test_semantic_fpn_flops_follow_the_segmentation_release_rules():
    """A tiny CLIP-baseline Semantic FPN on the segmentation ViT (patch 16, width 64, 4 blocks, 2 heads;
    FPN and head 16 channels, 3 classes) on one 64 x 96 image, against the release's counting rules
    written out: fvcore's 2021 handles, attention products counted, transposed convolutions over their
    output size, batch norm 2 and layer / group norm 5 per element, resizing 4 (bilinear) or 1 (nearest)
    per output element."""
    torch.manual_seed(0)
    cfg = tiny_sem_seg_cfg(denseclip=False, vit=True)
    model = build_model(cfg).eval()
    height, width, w, c, k = 64, 96, 64, 16, 3
    inference, text = count_flops(model, [{"image": torch.rand(3, height, width) * 255, "height": height, "width": width}])
    h, v = height // 16, width // 16  # the patch grid
    tokens = 1 + h * v
    resize = 4 * w * h * v  # the positional grid resized from 4 x 4 to 4 x 6 (booked to the pyramid, its caller)
    vit = (
        w * 3 * 16 * 16 * h * v  # patch embedding
        + 5 * tokens * w  # ln_pre
        + 4 * (10 * tokens * w + 12 * tokens * w * w + 2 * tokens * tokens * w)  # 4 blocks: 2 norms, q/k/v/out, MLP, attention products
    )
    sizes = [(h * 4) * (v * 4), (h * 2) * (v * 2), h * v, (h // 2) * (v // 2)]  # s4, s8, s16, s32 positions
    pyramid = (
        4 * 5 * w * h * v  # a GroupNorm per level
        + w * w * 4 * sizes[1] + 2 * w * sizes[1] + w * w * 4 * sizes[0]  # fpn1: transposed conv, BN, transposed conv
        + w * w * 4 * sizes[1]  # fpn2: transposed conv
    )
    fpn = sum(w * c * n + c * c * 9 * n for n in sizes) + c * sum(sizes[:3])  # laterals, outputs; nearest top-down
    conv_bn = lambda n: c * c * 9 * n + 2 * c * n  # noqa: E731
    up = lambda n: 4 * c * n  # bilinear x2 to n positions  # noqa: E731
    head = (
        conv_bn(sizes[0])
        + conv_bn(sizes[1]) + up(sizes[0])
        + conv_bn(sizes[2]) + up(sizes[1]) + conv_bn(sizes[1]) + up(sizes[0])
        + conv_bn(sizes[3]) + up(sizes[2]) + conv_bn(sizes[2]) + up(sizes[1]) + conv_bn(sizes[1]) + up(sizes[0])
        + c * k * sizes[0]  # classifier
    )
    # Booked to the segmentor, which calls the head's layers: each coarser level resized to stride 4
    # before the sum, as the release's head does (identities here, counted as in the release's count),
    # and the logits resized to the input.
    logits = 3 * up(sizes[0]) + 4 * k * height * width
    assert dict(inference.unsupported) == {}
    assert inference.by_module["backbone.bottom_up.vit"] == vit
    assert inference.by_module["backbone.bottom_up"] == vit + resize + pyramid
    assert inference.by_module["sem_seg_head"] == head
    assert inference.total == vit + resize + pyramid + fpn + head + logits
    assert text.total == 0  # no text encoder in a CLIP baseline


def test_semantic_fpn_flops_total_every_counted_op():
    """DenseCLIP's segmentor runs its attention pool and score map through methods, not submodule calls:
    the total still holds every counted operator, and nothing of the cached text encoder."""
    torch.manual_seed(0)
    model = build_model(tiny_sem_seg_cfg(denseclip=True)).eval()
    inference, text = count_flops(model, [{"image": torch.rand(3, 64, 96) * 255, "height": 64, "width": 96}])
    assert dict(inference.unsupported) == {} and text.total > 0
    assert inference.total == sum(inference.by_operator.values())
    assert {"scaled_dot_product_attention", "einsum", "linear"} <= set(inference.by_operator)
    assert inference.by_module[TEXT_ENCODER] == 0
