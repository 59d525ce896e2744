"""TorchScript and ONNX export (tools/deploy/): the exported graphs against the eager model they came from."""
import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

from denseclip.checkpoint import DenseCLIPCheckpointer
from denseclip.engine import DenseCLIPPredictor, DenseCLIPTrainer
from denseclip.export import export_model

from helpers import (
    REPO, TINY_SHAPES_CONFIGS, dataset_opts, load_cfg, randomize_batchnorm, randomize_layernorm, tiny_cfg, tiny_opts,
    tiny_sem_seg_cfg, write_coco_dataset,
)


def load_tool(name):
    """A script of tools/deploy as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", "deploy", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


exported_predictor = load_tool("exported_predictor")

SAMPLE_SIZE = (112, 80)  # the traced sample (resized); every comparison runs other sizes
TEST_SIZES = [((96, 128), (190, 250)), ((128, 64), (128, 64))]  # (resized, original)


def random_model(kind, *opts):
    """A shapes config with seeded random weights (BatchNorm statistics too), in eval mode."""
    cfg = load_cfg(TINY_SHAPES_CONFIGS[kind], ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", *opts])
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(cfg)).eval()
    if kind == "retinanet":  # its initial classifier scores every anchor near the prior: near-ties
        torch.nn.init.normal_(model.head.cls_score.weight, std=0.1)
    return cfg, model


def sample_image(size, seed):
    """A 3 x h x w float image of coloured rectangles on noise."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, *size, generator=generator) * 80
    for _ in range(3):
        y, x = (torch.randint(0, s // 2, (1,), generator=generator).item() for s in size)
        image[:, y : y + size[0] // 3, x : x + size[1] // 3] = torch.rand(3, 1, 1, generator=generator) * 255
    return image


def eager_outputs(model, image, height, width, vocabulary=None):
    """The eager model's output with the score maps of ``vocabulary`` (default: its classes)."""
    vocabulary = model.class_names if vocabulary is None else vocabulary
    with torch.no_grad():
        (output,) = model([{"image": image, "height": height, "width": width, "vocabulary": vocabulary}])
    return output


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-instance IoU of two N x H x W boolean stacks (1 where both are empty)."""
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def assert_matches_eager(exported: dict, eager: dict, masks: bool, score_maps: bool = True):
    """The issue's tolerances: same detections in the same order, boxes within 1e-3 relative, mask IoU
    >= 0.99, score maps within 1e-4 relative (largest difference / largest value)."""
    instances = eager["instances"]
    assert len(instances) > 0, "the comparison needs detections"
    assert exported["boxes"].shape == (len(instances), 4)
    np.testing.assert_array_equal(exported["classes"], instances.pred_classes.numpy())
    np.testing.assert_allclose(exported["scores"], instances.scores.numpy(), rtol=1e-4, atol=1e-6)
    boxes = instances.pred_boxes.tensor.numpy()
    assert np.abs(exported["boxes"] - boxes).max() <= 1e-3 * np.abs(boxes).max()
    assert ("masks" in exported) == masks
    if masks:
        assert exported["masks"].dtype == np.bool_ and exported["masks"].shape == tuple(instances.pred_masks.shape)
        assert mask_iou(exported["masks"], instances.pred_masks.numpy()).min() >= 0.99
    assert ("score_maps" in exported) == score_maps
    if score_maps:
        assert_close_relative(exported["score_maps"], eager["score_maps"].numpy())


def assert_close_relative(exported: np.ndarray, reference: np.ndarray, tolerance: float = 1e-4):
    assert exported.shape == reference.shape
    assert np.abs(exported - reference).max() <= tolerance * np.abs(reference).max()


# Mask R-CNN's TorchScript graph is compared below, with a vocabulary and trained
@pytest.mark.parametrize("kind, fmt", [("retinanet", "torchscript"), ("retinanet", "onnx"), ("mask_rcnn", "onnx")])
def test_exported_graph_matches_eager_on_other_sizes(kind, fmt, tmp_path):
    cfg, model = random_model(kind)
    path, metadata = export_model(
        cfg, model, sample_image(SAMPLE_SIZE, 0), (150, 107), str(tmp_path), fmt, score_maps=True
    )
    assert os.path.basename(path) == {"torchscript": "model.ts", "onnx": "model.onnx"}[fmt]
    assert metadata["score_map_names"] == metadata["class_names"] == ["circle", "square", "triangle", "star", "ring"]
    predictor = exported_predictor.ExportedPredictor(path)
    for seed, (size, (height, width)) in enumerate(TEST_SIZES, start=1):
        image = sample_image(size, seed)
        exported = predictor.run(image.numpy(), height, width)
        assert_matches_eager(exported, eager_outputs(model, image, height, width), masks=kind == "mask_rcnn")


@pytest.mark.parametrize("vit, fmt", [(False, "onnx"), (True, "torchscript")])
def test_semantic_segmentor_export_matches_eager_on_other_sizes(vit, fmt, tmp_path):
    """The ADE20K Semantic FPN configs shrunk (CLIP ResNet or ViT), whole-image test. The sample is 64 x 64,
    where the positional grid needs no resizing; the other sizes need it, and one is not a multiple of 32."""
    cfg = tiny_sem_seg_cfg(vit=vit)
    cfg.TEST.SEM_SEG.MODE = "whole"
    torch.manual_seed(0)
    model = randomize_layernorm(randomize_batchnorm(build_model(cfg))).eval()
    path, metadata = export_model(cfg, model, sample_image((64, 64), 0), (64, 64), str(tmp_path), fmt, score_maps=True)
    assert metadata["outputs"] == ["score_maps", "sem_seg"] and metadata["max_input_side"] is None
    predictor = exported_predictor.ExportedPredictor(path)
    odd = ((100, 76), (100, 76))  # run unpadded: the FPN and head resize between levels of uneven sizes
    for seed, (size, (height, width)) in enumerate([*TEST_SIZES, odd], start=1):
        image = sample_image(size, seed)
        eager = eager_outputs(model, image, height, width)
        exported = predictor.run(image.numpy(), height, width)
        assert exported["sem_seg"].shape == (3, height, width)
        assert_close_relative(exported["sem_seg"], eager["sem_seg"].numpy())
        assert_close_relative(exported["score_maps"], eager["score_maps"].numpy())


def test_graph_holds_baked_text_embeddings_not_the_text_encoder(tmp_path):
    """A baked vocabulary gives the eager model's score maps for that vocabulary; the graph stores the
    K x D embeddings of the classes and of the vocabulary (the score-map module's, frozen) instead of the
    text encoder's weights, and the model is left as it was."""
    cfg, model = random_model("mask_rcnn")
    vocabulary = ["cat", "dog", "traffic light"]
    text_encoder = model.score_map.text_encoder
    path, _ = export_model(cfg, model, sample_image(SAMPLE_SIZE, 0), SAMPLE_SIZE, str(tmp_path), vocabulary=vocabulary)
    assert model.score_map.text_encoder is text_encoder and not model.training
    predictor = exported_predictor.ExportedPredictor(path)
    assert predictor.score_map_names == vocabulary and "score_maps" in predictor.metadata["outputs"]
    for seed, (size, (height, width)) in enumerate(TEST_SIZES, start=1):
        image = sample_image(size, seed)
        eager = eager_outputs(model, image, height, width, vocabulary)
        exported = predictor.run(image.numpy(), height, width)
        assert exported["score_maps"].shape[0] == 3
        assert_matches_eager(exported, eager, masks=True)
        # the same image's score maps of the model's own classes differ: the vocabulary was used
        classes = eager_outputs(model, image, height, width)["score_maps"]
        assert not np.allclose(exported["score_maps"], classes[:3].numpy(), rtol=1e-2)

    state = torch.jit.load(path).state_dict()
    embed_dim = text_encoder.text_projection.shape[1]
    assert not any("text_encoder.transformer" in k or "token_embedding" in k or "contexts" in k for k in state)
    baked = {k: v.shape for k, v in state.items() if ".text_encoder.embeddings_" in k}
    assert sorted(baked.values()) == sorted([torch.Size([5, embed_dim]), torch.Size([3, embed_dim])])
    size = lambda module: sum(t.numel() for t in (*module.parameters(), *module.buffers()))  # noqa: E731
    assert sum(t.numel() for t in state.values()) == size(model) - size(text_encoder) + (5 + 3) * embed_dim


def test_what_cannot_be_exported_is_refused(tmp_path):
    image = sample_image(SAMPLE_SIZE, 0)
    cfg, model = random_model("retinanet")
    with pytest.raises(ValueError, match="--export-method tracing"):
        export_model(cfg, model, image, SAMPLE_SIZE, str(tmp_path), "torchscript", "scripting")
    with pytest.raises(ValueError, match="--format must be one of"):
        export_model(cfg, model, image, SAMPLE_SIZE, str(tmp_path), "caffe2")
    with pytest.raises(ValueError, match="PROMPT_LENGTH"):
        export_model(cfg, model, image, SAMPLE_SIZE, str(tmp_path), vocabulary=["a rather long name of a thing"])
    # the tiny configs' positional grid covers 128 px
    big_cfg, big_model = random_model("retinanet", "INPUT.MAX_SIZE_TEST", "160")
    with pytest.raises(ValueError, match="INPUT.MAX_SIZE_TEST 128 or less"):
        export_model(big_cfg, big_model, image, SAMPLE_SIZE, str(tmp_path))
    sliding = tiny_sem_seg_cfg()
    with pytest.raises(ValueError, match="TEST.SEM_SEG.MODE whole"):
        export_model(sliding, build_model(sliding), image, SAMPLE_SIZE, str(tmp_path))
    baseline = tiny_cfg(denseclip=False)
    with pytest.raises(ValueError, match="Detectron2's own tools/deploy/export_model.py"):
        export_model(baseline, build_model(baseline), image, SAMPLE_SIZE, str(tmp_path))
    assert not os.listdir(tmp_path)

    path, metadata = export_model(cfg, model, image, SAMPLE_SIZE, str(tmp_path))
    assert metadata["max_input_side"] == 128 and "score_maps" not in metadata["outputs"]
    with pytest.raises(ValueError, match="at most 128 px"):
        exported_predictor.ExportedPredictor(path).run(np.zeros((3, 96, 160), np.float32), 96, 160)


@pytest.fixture(scope="module")
def trained_mask_rcnn(tmp_path_factory):
    """A tiny Mask R-CNN trained 4 iterations on a generated COCO-format dataset: (cfg, weights file)."""
    folder = str(tmp_path_factory.mktemp("export_trained"))
    dataset = write_coco_dataset(folder, num_images=6)
    opts = [*dataset_opts(*dataset), *tiny_opts("mask_rcnn", folder, 4), "MODEL.DENSECLIP.RETURN_SCORE_MAPS", "True",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]  # 4 iterations: every detection counts for a non-zero AP
    cfg = load_cfg(TINY_SHAPES_CONFIGS["mask_rcnn"], opts)
    cfg.DATASETS.TEST = ()
    trainer = DenseCLIPTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return opts, os.path.join(folder, "model_final.pth")


NO_PACKAGE_RUNNER = r"""
import importlib.abc, json, sys
import numpy as np

class Block(importlib.abc.MetaPathFinder):
    names = {"denseclip", "detectron2", "open_clip", "fvcore", "torch", "torchvision"}
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"{name} must not be needed to run an exported model")

sys.meta_path.insert(0, Block())
sys.path = [p for p in sys.path if "projects" not in p and p not in ("", ".")]
tools, image_file, out = sys.argv[1:4]
sys.path.insert(0, tools)
from exported_predictor import ExportedPredictor

image = np.load(image_file)
results = {}
for model in sys.argv[4:]:
    if model.endswith(".ts"):
        Block.names -= {"torch", "torchvision"}  # TorchScript needs torch and torchvision only
    results.update({f"{model.rsplit('.', 1)[1]}/{k}": v for k, v in ExportedPredictor(model)(image).items()})
np.savez(out, **results)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"denseclip", "detectron2", "open_clip", "torch"})))
"""


def test_trained_model_runs_without_the_package_and_evaluates_alike(trained_mask_rcnn, tmp_path):
    """export_model.py on a trained model: its TorchScript and ONNX files, run by exported_predictor.py in a
    process that cannot import this package nor Detectron2 (nor torch, for ONNX), give DenseCLIPPredictor's
    outputs on a BGR image; --run-eval measures the eager model's AP."""
    opts, weights = trained_mask_rcnn
    export_tool = load_tool("export_model")
    config = os.path.join(REPO, TINY_SHAPES_CONFIGS["mask_rcnn"])
    exported = {}
    for fmt in ("onnx", "torchscript"):
        out = str(tmp_path / fmt)
        flags = ["--config-file", config, "--format", fmt, "--output", out, "--score-maps"]
        if fmt == "onnx":
            flags.append("--run-eval")
        exported[fmt] = export_tool.main([*flags, *opts, "MODEL.WEIGHTS", weights])
    metrics, exported["onnx"] = exported["onnx"], str(tmp_path / "onnx" / "model.onnx")

    cfg = load_cfg(TINY_SHAPES_CONFIGS["mask_rcnn"], [*opts, "MODEL.WEIGHTS", weights])
    model = DenseCLIPTrainer.build_model(cfg)
    DenseCLIPCheckpointer(model).load(weights)
    eager_metrics = DenseCLIPTrainer.test(cfg, model)
    assert sorted(metrics) == sorted(eager_metrics) == ["bbox", "score_maps", "segm"]
    for task, values in eager_metrics.items():
        np.testing.assert_allclose([metrics[task][k] for k in values], list(values.values()), atol=0.05)
    # what the evaluator saw (after 4 iterations AP is about 0): the eager model's detections
    with open(tmp_path / "onnx" / "inference" / "coco_instances_results.json") as f:
        exported_results = json.load(f)
    with open(os.path.join(cfg.OUTPUT_DIR, "inference", "coco_instances_results.json")) as f:
        eager_results = json.load(f)
    assert len(exported_results) == len(eager_results) > 0
    for got, want in zip(exported_results, eager_results):
        assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
        assert got["score"] == pytest.approx(want["score"], rel=1e-4)
        np.testing.assert_allclose(got["bbox"], want["bbox"], atol=1e-3 * 96)

    image = cv2.imread(os.path.join(os.path.dirname(opts[1]), "images", "0.png"))  # the dataset's first image
    image = np.ascontiguousarray(cv2.resize(image, (150, 110))[:, :, ::-1])  # another size and colour order
    np.save(tmp_path / "image.npy", image)
    process = subprocess.run(
        [sys.executable, "-c", NO_PACKAGE_RUNNER, os.path.join(REPO, "tools", "deploy"), str(tmp_path / "image.npy"),
         str(tmp_path / "out.npz"), exported["onnx"], exported["torchscript"]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert process.returncode == 0, process.stdout[-3000:]
    assert json.loads(process.stdout.strip().splitlines()[-1]) == ["torch"]
    results = np.load(tmp_path / "out.npz")
    reference = DenseCLIPPredictor(cfg, score_maps=True)(image)
    for suffix in ("onnx", "ts"):
        outputs = {k.split("/")[1]: results[k] for k in results.files if k.startswith(suffix + "/")}
        assert_matches_eager(outputs, reference, masks=True)


@pytest.mark.slow
def test_full_size_rn50_exports_and_matches_eager(tmp_path):
    """The COCO RN50 DenseCLIP Mask R-CNN config (random weights, score threshold 0) traced on the CPU."""
    cfg = load_cfg(
        os.path.join(REPO, "configs/COCO-InstanceSegmentation/mask_rcnn_denseclip_R_50_FPN_1x.yaml"),
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
         "TEST.DETECTIONS_PER_IMAGE", "10", "DATASETS.TEST", "()",
         # the graph's batched NMS runs all classes at once (as Detectron2's traced models): keep it small
         "MODEL.RPN.PRE_NMS_TOPK_TEST", "300", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"],
    )
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(cfg)).eval()
    path, _ = export_model(cfg, model, sample_image((256, 320), 0), (256, 320), str(tmp_path), score_maps=True)
    image = sample_image((320, 224), 1)
    exported = exported_predictor.ExportedPredictor(path).run(image.numpy(), 400, 280)
    assert_matches_eager(exported, eager_outputs(model, image, 400, 280), masks=True)
