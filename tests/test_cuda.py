"""
The CUDA path, on a GPU: training of the shapes configs (detection, instance and semantic segmentation) in float32 (equal to the CPU's) and with AMP,
PyTorch's SyncBatchNorm in one and two processes, inference with score maps and a vocabulary (equal
to the CPU's), and a converted release checkpoint evaluated. Skipped where torch.cuda.is_available()
is False (``pytest -ra`` says so); ``pytest -m cuda`` runs only these.

Comparing float32 results with the CPU's: TF32 is turned off (cuDNN convolutions use it by default,
with a 10-bit mantissa) and cuDNN picks deterministic algorithms, so both devices compute in full
float32; they still sum in different orders, so results agree within a tolerance, not bit for bit.
Randomness drawn from each device's own generator is taken out of the comparisons: no dropout, and
sampling batch sizes above the number of anchors and proposals, so every candidate is used on both
devices (in another order, which the mean losses do not see).
"""
import os

import numpy as np
import pytest
import torch

from detectron2.engine import AMPTrainer, create_ddp_model, launch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, pairwise_iou
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from denseclip import DenseCLIPCheckpointer
from denseclip.engine import DenseCLIPPredictor, DenseCLIPTrainer
from denseclip.solver import build_optimizer

from helpers import TINY_SHAPES_CONFIGS, dataset_opts, load_cfg, run_script, tiny_opts, write_coco_dataset
from test_release_conversion import release_state_dict

DEVICE = "cuda"
KINDS = sorted(TINY_SHAPES_CONFIGS)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

# Every anchor and proposal sampled (see the module's docstring), no dropout.
ALL_CANDIDATES = [
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "1000000", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "1000000",
    "MODEL.DENSECLIP.CONTEXT_DECODER.DROPOUT", "0.0",
]


@pytest.fixture(autouse=True)
def full_float32():
    """TF32 off and deterministic cuDNN algorithms for the test, then the settings as they were."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
    ) = saved


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory):
    return write_coco_dataset(str(tmp_path_factory.mktemp("cuda_dataset")), num_images=8)


def shapes_cfg(kind, device, opts=()):
    """The shapes config of ``kind`` on ``device`` (its own 5 class names, no data read)."""
    return load_cfg(TINY_SHAPES_CONFIGS[kind], ["MODEL.DEVICE", device, *opts])


def fixed_batch(num_classes=5, size=128, images=2):
    """Training inputs of size x size with three boxes each (classes, box-shaped masks), drawn on the CPU."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(images):
        corner = torch.rand(3, 2, generator=generator) * size * 0.5
        boxes = torch.cat([corner, corner + 16 + torch.rand(3, 2, generator=generator) * size * 0.4], dim=1)
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
            mask[y0:y1, x0:x1] = True
        instances = Instances(
            (size, size), gt_boxes=Boxes(boxes), gt_classes=torch.randint(num_classes, (3,), generator=generator),
            gt_masks=BitMasks(masks),
        )
        image = torch.rand(3, size, size, generator=generator) * 255
        batch.append({"image": image, "height": size, "width": size, "instances": instances})
    return batch


def sgd_losses(cfg, state, batch, iterations):
    """Per iteration, the loss dict (floats) of plain SGD steps at SOLVER.BASE_LR from ``state``."""
    model = build_model(cfg)
    model.load_state_dict(state)
    model.train()
    optimizer = build_optimizer(cfg, model)
    history = []
    with EventStorage(0) as storage:
        for iteration in range(iterations):
            storage.iter = iteration
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            history.append({name: value.item() for name, value in losses.items()})
    return history


@pytest.mark.parametrize("kind", KINDS)
def test_float32_training_steps_equal_the_cpu(kind):
    # SGD rather than the configs' AdamW: AdamW's first steps move every weight by about lr whatever
    # its gradient's size, so gradients that are rounding noise on one device would move weights too.
    opts = [*ALL_CANDIDATES, "SOLVER.OPTIMIZER", "SGD"]
    cpu_cfg, cuda_cfg = shapes_cfg(kind, "cpu", opts), shapes_cfg(kind, DEVICE, opts)
    torch.manual_seed(0)
    state = build_model(cpu_cfg).state_dict()
    batch = fixed_batch()
    on_cpu = sgd_losses(cpu_cfg, state, batch, iterations=3)
    on_cuda = sgd_losses(cuda_cfg, state, batch, iterations=3)
    assert all(np.isfinite(list(losses.values())).all() for losses in on_cuda)
    for iteration, (expected, got) in enumerate(zip(on_cpu, on_cuda)):
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-3, abs=1e-5), (iteration, name)
    assert on_cpu[-1] != on_cpu[0]  # the steps changed the model


SEM_SEG_CONFIG = "configs/Shapes-SemanticSegmentation/semantic_fpn_denseclip_tiny.yaml"


def sem_seg_batch(num_classes=6, size=128, images=2):
    """Training inputs of size x size with a label map of random rectangles (255 in one corner: ignored)."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(images):
        labels = torch.full((size, size), num_classes - 1, dtype=torch.long)
        for _ in range(3):
            x0, y0 = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            labels[y0 : y0 + size // 3, x0 : x0 + size // 3] = int(torch.randint(num_classes - 1, (1,), generator=generator))
        labels[:8, :8] = 255
        image = torch.rand(3, size, size, generator=generator) * 255
        batch.append({"image": image, "height": size, "width": size, "sem_seg": labels})
    return batch


@pytest.mark.parametrize("amp", [False, True])
def test_semantic_segmentor_training_on_cuda(amp):
    """Float32 steps equal the CPU's; with autocast the first step's losses equal float32's up to rounding."""
    opts = ["MODEL.DENSECLIP.CONTEXT_DECODER.DROPOUT", "0.0", "MODEL.SEM_SEG_HEAD.DROPOUT", "0.0", "SOLVER.OPTIMIZER", "SGD"]
    cpu_cfg, cuda_cfg = (load_cfg(SEM_SEG_CONFIG, ["MODEL.DEVICE", device, *opts]) for device in ("cpu", DEVICE))
    torch.manual_seed(0)
    state = build_model(cpu_cfg).state_dict()
    batch = sem_seg_batch()
    on_cpu = sgd_losses(cpu_cfg, state, batch, iterations=3)
    with torch.autocast("cuda", enabled=amp):
        on_cuda = sgd_losses(cuda_cfg, state, batch, iterations=1 if amp else 3)
    assert set(on_cuda[0]) == {"loss_sem_seg", "loss_score_map"}
    assert all(np.isfinite(list(losses.values())).all() for losses in on_cuda)
    tolerance = dict(rel=2e-2, abs=1e-3) if amp else dict(rel=1e-3, abs=1e-5)
    for iteration, (expected, got) in enumerate(zip(on_cpu, on_cuda)):
        for name in expected:
            assert got[name] == pytest.approx(expected[name], **tolerance), (iteration, name)
    assert on_cpu[-1] != on_cpu[0]


def run_trainer(cfg, iterations):
    """DenseCLIPTrainer for ``iterations`` on the seeded data order; the losses per iteration, the
    dtypes of the image encoder's first convolution and of the score map, and the peak memory."""
    seed_all_rng(0)
    trainer = DenseCLIPTrainer(cfg)
    trainer.resume_or_load(resume=False)
    dtypes = {}

    def record(name):
        def hook(module, inputs, output):
            dtypes.setdefault(name, output.dtype)

        return hook

    backbone = trainer.model.backbone
    backbone.bottom_up.conv1.register_forward_hook(record("conv1"))
    backbone.score_map.register_forward_hook(record("score_map"))
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20
    history = {name: [v for v, _ in trainer.storage.history(name).values()] for name in trainer.storage.histories()
               if name.startswith("loss_") or name == "total_loss"}
    return trainer, history, dtypes, peak


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_float32_and_amp(kind, coco_dataset, tmp_path):
    opts = [*dataset_opts(*coco_dataset), "DATASETS.TEST", "()", "MODEL.DENSECLIP.CONTEXT_DECODER.DROPOUT", "0.0"]
    runs = {}
    for amp in (False, True):
        cfg = shapes_cfg(kind, DEVICE, [*opts, *tiny_opts(kind, str(tmp_path / str(amp)), 10), "SOLVER.AMP.ENABLED", str(amp)])
        trainer, history, dtypes, peak = run_trainer(cfg, 10)
        assert isinstance(trainer._trainer, AMPTrainer) == amp
        assert dtypes == {"conv1": torch.float16 if amp else torch.float32, "score_map": torch.float32}
        assert len(history["total_loss"]) == 10 and np.isfinite(history["total_loss"]).all()
        print(f"{kind} {'AMP' if amp else 'float32'}: peak memory of 10 training steps (4 x 96 x 96) {peak:.1f} MB")
        runs[amp] = history
    # Same weights and data at the first step: float16 autocast changes the losses by rounding only.
    for name, values in runs[False].items():
        assert runs[True][name][0] == pytest.approx(values[0], rel=2e-2, abs=1e-3), name


def test_syncbn_in_one_process_is_pytorchs_and_equals_batchnorm():
    cfg = shapes_cfg("retinanet", DEVICE, ["MODEL.CLIP.NORM", "SyncBN", *ALL_CANDIDATES])
    torch.manual_seed(0)
    synced = build_model(cfg).train()
    assert any(type(m) is torch.nn.SyncBatchNorm for m in synced.modules())
    plain = build_model(shapes_cfg("retinanet", DEVICE, ["MODEL.CLIP.NORM", "BN", *ALL_CANDIDATES])).train()
    plain.load_state_dict(synced.state_dict())
    batch = fixed_batch()
    with EventStorage(0):
        expected, got = plain(batch), synced(batch)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    bn = "backbone.bottom_up.bn1.running_var"
    torch.testing.assert_close(synced.state_dict()[bn], plain.state_dict()[bn])


def _syncbn_worker(state_file, output_file):
    """One process of a 2-GPU launch: a forward pass of its image with SyncBatchNorm under DDP."""
    cfg = shapes_cfg("retinanet", DEVICE, ["MODEL.CLIP.NORM", "SyncBN", *ALL_CANDIDATES])
    model = build_model(cfg)
    model.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True))
    model = create_ddp_model(model.train(), broadcast_buffers=False, device_ids=[comm.get_local_rank()])
    rank = comm.get_rank()
    with EventStorage(0):
        model(fixed_batch()[rank : rank + 1])
    if rank == 0:
        stats = {k: v.cpu() for k, v in model.module.state_dict().items() if k.endswith(("running_mean", "running_var"))}
        torch.save(stats, output_file)
    comm.synchronize()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_syncbn_across_two_processes_equals_batchnorm_over_both_images(tmp_path):
    torch.manual_seed(0)
    model = build_model(shapes_cfg("retinanet", DEVICE, ["MODEL.CLIP.NORM", "BN", *ALL_CANDIDATES])).train()
    state_file, output_file = str(tmp_path / "state.pth"), str(tmp_path / "stats.pth")
    torch.save(model.state_dict(), state_file)
    launch(_syncbn_worker, 2, dist_url="auto", args=(state_file, output_file))
    with EventStorage(0):
        model(fixed_batch())  # one process, both images: what the two processes' statistics must equal
    synced = torch.load(output_file, weights_only=True)
    assert len(synced) > 10
    for name, value in synced.items():
        torch.testing.assert_close(value, model.state_dict()[name].cpu(), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_train_net_on_two_gpus_with_syncbn_and_amp(coco_dataset, tmp_path):
    result = run_script([
        "train_net.py", "--num-gpus", "2", "--config-file", TINY_SHAPES_CONFIGS["mask_rcnn"],
        *dataset_opts(*coco_dataset), *tiny_opts("mask_rcnn", str(tmp_path), 5), "DATASETS.TEST", "()",
        "MODEL.DEVICE", DEVICE, "MODEL.CLIP.NORM", "SyncBN", "SOLVER.AMP.ENABLED", "True",
    ])
    assert result.returncode == 0, result.stdout[-3000:]
    assert os.path.isfile(tmp_path / "model_final.pth")


def test_train_net_on_one_gpu_with_syncbn(coco_dataset, tmp_path):
    opts = [*dataset_opts(*coco_dataset), *tiny_opts("retinanet", str(tmp_path), 5), "MODEL.DEVICE", DEVICE,
            "MODEL.CLIP.NORM", "SyncBN"]
    result = run_script(["train_net.py", "--num-gpus", "1", "--config-file", TINY_SHAPES_CONFIGS["retinanet"], *opts])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in result.stdout


def matched(expected: Instances, got: Instances, top: int = 10):
    """Each of ``expected``'s ``top`` best detections has one in ``got`` of the same class, box IoU > 0.99
    and score within 1e-4."""
    expected, got = expected[:top], got.to("cpu")
    iou = pairwise_iou(expected.pred_boxes, got.pred_boxes)
    same = (expected.pred_classes[:, None] == got.pred_classes[None]) & (iou > 0.99)
    close = (expected.scores[:, None] - got.scores[None]).abs() < 1e-4
    return bool((same & close).any(dim=1).all())


def test_inference_with_score_maps_and_a_vocabulary_equals_the_cpu(tmp_path):
    cfg = shapes_cfg("mask_rcnn", "cpu", ["MODEL.DENSECLIP.CONTEXT_DECODER.DROPOUT", "0.0"])
    torch.manual_seed(0)
    weights = str(tmp_path / "model.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    image = (np.random.default_rng(0).random((128, 160, 3)) * 255).astype(np.uint8)
    vocabulary = ["circle", "ring", "traffic cone"]
    outputs, predictors = {}, {}
    for device in ("cpu", DEVICE):
        device_cfg = shapes_cfg("mask_rcnn", device, ["MODEL.WEIGHTS", weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
        predictors[device] = DenseCLIPPredictor(device_cfg, vocabulary=vocabulary)
        outputs[device] = predictors[device](image)
    cpu, cuda = outputs["cpu"], outputs[DEVICE]
    assert cuda["score_maps"].device.type == "cuda" and cuda["score_maps"].shape == (3, 128, 160)
    torch.testing.assert_close(cuda["score_maps"].cpu(), cpu["score_maps"], rtol=1e-4, atol=1e-4)
    assert len(cpu["instances"]) > 0 and matched(cpu["instances"], cuda["instances"])
    # The cached text embeddings live on the GPU with the model, equal to the CPU's.
    text = predictors[DEVICE].model.backbone.score_map.text_encoder
    assert text(vocabulary).device.type == "cuda"
    torch.testing.assert_close(text(vocabulary).cpu(), predictors["cpu"].model.backbone.score_map.text_encoder(vocabulary),
                               rtol=1e-5, atol=1e-5)


def test_model_moved_to_cuda_after_cpu_inference_recomputes_its_cached_text():
    cfg = shapes_cfg("retinanet", "cpu")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    text = model.backbone.score_map.text_encoder
    on_cpu = text()  # cached on the CPU
    model.to(DEVICE)
    on_cuda = text()
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        (output,) = model([{"image": torch.rand(3, 128, 128) * 255, "height": 128, "width": 128}])
    assert output["instances"].scores.device.type == "cuda"


def test_converted_release_checkpoint_evaluated_on_cuda(coco_dataset, tmp_path):
    opts = [*dataset_opts(*coco_dataset), *tiny_opts("mask_rcnn", str(tmp_path), 1)]
    cfg = shapes_cfg("mask_rcnn", "cpu", opts)
    release, converted = str(tmp_path / "release.pth"), str(tmp_path / "converted.pth")
    state = release_state_dict(cfg, "mask_rcnn", guided=True, num_classes=3)
    torch.save({"state_dict": state, "meta": {"CLASSES": ("apple", "bottle", "cup"), "mmdet_version": "2.17.0"}}, release)
    result = run_script(["tools/convert-denseclip-mmdet-to-d2.py", release, converted,
                         "--config-file", TINY_SHAPES_CONFIGS["mask_rcnn"], *opts])
    assert result.returncode == 0, result.stdout[-3000:]
    results = {}
    for device in ("cpu", DEVICE):
        device_cfg = shapes_cfg("mask_rcnn", device, [*opts, "MODEL.WEIGHTS", converted])
        model = DenseCLIPTrainer.build_model(device_cfg)
        DenseCLIPCheckpointer(model).load(converted)
        assert next(model.parameters()).device.type == torch.device(device).type
        results[device] = DenseCLIPTrainer.test(device_cfg, model)
    print(f"converted release checkpoint on {DEVICE}: {dict(results[DEVICE])}")
    for task in ("bbox", "segm", "score_maps"):
        expected, got = results["cpu"][task], results[DEVICE][task]
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert np.isnan(value) == np.isnan(got[name]) and np.nan_to_num(got[name]) == pytest.approx(np.nan_to_num(value), abs=0.5), (task, name)
