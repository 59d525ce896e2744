"""
Outputs of the three small models recorded once and compared on every run: inference (detections, masks,
label maps, score maps of the classes and of a vocabulary; whole image, sliding windows, multi-scale +
flip), the exported TorchScript and ONNX graphs, and the losses of three training steps. A change of the
package's structure must leave every number equal: to 1e-6 of the largest value of each tensor on the
machine that recorded them. Another CPU's float32 kernels (other vector widths, other summation orders)
move them by up to about 5e-6, so the comparison allows 1e-5 (TOLERANCE), and of the training steps it
compares the first: AdamW's first steps magnify that rounding (on another CPU the Mask R-CNN's third-step
classification loss moved by 9%, its second step's losses by up to 4e-4).

The text encoder's grouped forward (each class run up to its end token) came after the recording; it equals
the full forward to float64 rounding (tests/test_text_encoder.py) but sums in another order in float32. So
the comparison of everything recorded runs the encoder's reference path (the shared-prefix forward, its
fallback for other blocks), and the grouped path is compared on the inference outputs.

The configs are stored beside the numbers (tests/data/recorded_outputs/*.yaml: the keys that differ from
the defaults when they were recorded), so that later changes of the repository's small configs do not
move the reference. Weights are drawn per parameter name (the names are the checkpoints' format, which
must not change either), not in the order modules are built.

    python tests/test_recorded_outputs.py --record   # rewrite the reference (only on purpose)
"""
import argparse
import os
import sys
import zlib

import pytest
import torch

import denseclip.modeling.text_encoder as text_encoder_module

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from denseclip import get_denseclip_cfg
from denseclip.export import export_model
from denseclip.modeling.test_time_augmentation import SemanticSegmentorWithTTA
from denseclip.solver import build_optimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import REPO  # noqa: E402

DATA = os.path.join(REPO, "tests", "data", "recorded_outputs")
VOCABULARY = ["circle", "red ring", "moon"]
# (resized image size, original height and width) of the two inference inputs
INPUTS = [((64, 96), (40, 60)), ((96, 64), (48, 32))]
TOLERANCE = 1e-5

# The small configs as they were recorded, with what the recording needs on top.
SOURCES = {
    "retinanet": ("configs/Shapes-Detection/retinanet_denseclip_tiny_FPN.yaml", [
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "8",
        "MODEL.DENSECLIP.RETURN_SCORE_MAPS", "True"]),
    "mask_rcnn": ("configs/Shapes-InstanceSegmentation/mask_rcnn_denseclip_tiny_FPN.yaml", [
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "8"]),
    "semantic": ("configs/Shapes-SemanticSegmentation/semantic_fpn_denseclip_tiny.yaml", [
        "MODEL.DENSECLIP.RETURN_SCORE_MAPS", "True", "TEST.SEM_SEG.CROP_SIZE", "(64, 64)",
        "TEST.SEM_SEG.STRIDE", "(43, 43)", "TEST.AUG.SCALE_RATIOS", "(0.75, 1.25)", "TEST.AUG.FLIP", "True",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "256"]),
}
CLASSES = {
    "retinanet": ["circle", "square", "triangle", "star", "ring"],
    "mask_rcnn": ["circle", "square", "triangle", "star", "ring"],
    "semantic": ["circle", "square", "triangle", "star", "ring", "background"],
}


def config_diff(cfg, defaults, prefix=""):
    """The (key, value) pairs of ``cfg`` that differ from ``defaults``, as KEY VALUE strings."""
    pairs = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            pairs += config_diff(value, defaults.get(key, {}), name + ".")
        elif defaults.get(key) != value:
            pairs.append((name, value))
    return pairs


def recorded_cfg(name: str):
    with open(os.path.join(DATA, f"{name}.yaml")) as f:
        lines = [line.rstrip("\n").split(": ", 1) for line in f if line.strip() and not line.startswith("#")]
    opts = [item for key, value in lines for item in (key, value)]
    cfg = get_denseclip_cfg("", opts)
    cfg.freeze()
    return cfg


def write_recorded_cfg(name: str) -> None:
    config_file, opts = SOURCES[name]
    cfg = get_denseclip_cfg(os.path.join(REPO, config_file), [*opts, "MODEL.DENSECLIP.CLASS_NAMES", str(CLASSES[name])])
    lines = [f"{key}: {value!r}" for key, value in config_diff(cfg, get_denseclip_cfg())]
    with open(os.path.join(DATA, f"{name}.yaml"), "w") as f:
        f.write(f"# {config_file} as it was recorded, with {' '.join(opts)}\n")
        f.write("\n".join(lines) + "\n")


def seeded_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Every floating-point parameter and buffer drawn from a generator seeded by its name: weights
    N(0, 1 / fan_in), 1-d tensors around their usual values (norm scales near 1, biases near 0,
    running variances near 1)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            if tensor.dim() > 1:
                values = noise / max(1, tensor[0].numel()) ** 0.5
            elif name.endswith("running_var"):
                values = 1.0 + 0.1 * noise.abs()
            elif name.endswith("weight"):  # 1-d weights are the norms' scales
                values = 1.0 + 0.1 * noise
            else:
                values = 0.1 * noise
            tensor.copy_(values.to(tensor.dtype))
    return model


def image(size, seed):
    """A 3 x h x w float image (0-255) of coloured rectangles on noise."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(3, *size, generator=generator) * 80
    for _ in range(3):
        y, x = (int(torch.randint(0, s // 2, (1,), generator=generator)) for s in size)
        pixels[:, y : y + size[0] // 3, x : x + size[1] // 3] = torch.rand(3, 1, 1, generator=generator) * 255
    return pixels


def inference_inputs():
    return [{"image": image(size, seed), "height": h, "width": w} for seed, (size, (h, w)) in enumerate(INPUTS)]


def training_batch(name: str):
    """Two 64 x 96 training inputs with two objects each (boxes, classes, box masks) or label maps."""
    from detectron2.structures import BitMasks, Boxes, Instances

    batch = []
    for seed, boxes in enumerate([[[4, 6, 40, 50], [50, 10, 90, 40]], [[10, 20, 60, 60], [62, 2, 94, 30]]]):
        entry = {"image": image((64, 96), 10 + seed), "height": 64, "width": 96}
        classes = torch.tensor([seed, 2 + seed])
        if name == "semantic":
            labels = torch.full((64, 96), 5, dtype=torch.long)
            for (x1, y1, x2, y2), label in zip(boxes, classes.tolist()):
                labels[y1:y2, x1:x2] = label
            labels[:3, :] = 255
            entry["sem_seg"] = labels
        else:
            masks = torch.zeros(2, 64, 96, dtype=torch.bool)
            for mask, (x1, y1, x2, y2) in zip(masks, boxes):
                mask[y1:y2, x1:x2] = True
            instances = Instances((64, 96), gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)), gt_classes=classes)
            instances.gt_masks = BitMasks(masks)
            entry["instances"] = instances
        batch.append(entry)
    return batch


def build(name: str):
    cfg = recorded_cfg(name)
    return cfg, seeded_weights(build_model(cfg))


# ------------------------------------------------------------------------------------------------------------
# What the recording runs. Only these functions call the package's inference options.
# ------------------------------------------------------------------------------------------------------------


def run_model(model, inputs, vocabulary=None):
    model.eval()
    if vocabulary is not None:
        inputs = [{**x, "vocabulary": vocabulary} for x in inputs]
    with torch.no_grad():
        return model(inputs)


def run_tta(cfg, model, inputs):
    model.eval()
    with torch.no_grad():
        return SemanticSegmentorWithTTA(cfg, model)(inputs)


def run_exported(cfg, model, fmt, folder, vocabulary=None):
    """The exported graph's outputs on the two inference inputs (traced on a third size)."""
    sys.path.insert(0, os.path.join(REPO, "tools", "deploy"))
    from exported_predictor import ExportedPredictor

    model.eval()
    os.makedirs(folder, exist_ok=True)
    export_model(cfg, model, image((80, 112), 7), (100, 140), folder, fmt, score_maps=True, vocabulary=vocabulary)
    predictor = ExportedPredictor(os.path.join(folder, "model.ts" if fmt == "torchscript" else "model.onnx"))
    return [predictor.run(x["image"].numpy(), x["height"], x["width"]) for x in inference_inputs()]


# ------------------------------------------------------------------------------------------------------------


def flat(outputs) -> dict:
    """{name: tensor} of a list of per-image outputs (Instances fields, label maps, score maps, arrays)."""
    result = {}
    for index, output in enumerate(outputs):
        for key, value in output.items():
            if key == "instances":
                fields = {"boxes": value.pred_boxes.tensor, "scores": value.scores, "classes": value.pred_classes}
                if value.has("pred_masks"):
                    fields["masks"] = value.pred_masks
                result.update({f"{index}.{k}": v for k, v in fields.items()})
            elif isinstance(value, torch.Tensor) or hasattr(value, "dtype"):
                result[f"{index}.{key}"] = torch.as_tensor(value)
    return result


def training_losses(name: str, cfg, model, steps: int = 3):
    """The loss dict of each of ``steps`` AdamW steps on one fixed batch (dropout seeded per step)."""
    model.train()
    optimizer = build_optimizer(cfg, model)
    batch, losses = training_batch(name), []
    with EventStorage(0):
        for step in range(steps):
            torch.manual_seed(step)
            loss_dict = model(batch)
            losses.append({k: v.detach().clone() for k, v in loss_dict.items()})
            optimizer.zero_grad()
            sum(loss_dict.values()).backward()
            optimizer.step()
    return {f"step{i}.{k}": v for i, step_losses in enumerate(losses) for k, v in step_losses.items()}


def outputs_of(name: str, folder: str) -> dict:
    """Every recorded tensor of one small model."""
    cfg, model = build(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = inference_inputs()
    record = {f"whole.{k}": v for k, v in flat(run_model(model, inputs)).items()}
    record.update({f"vocabulary.{k}": v for k, v in flat(run_model(model, inputs, VOCABULARY)).items()})
    if name == "semantic":
        slide_cfg = cfg.clone()
        slide_cfg.defrost()
        slide_cfg.TEST.SEM_SEG.MODE = "slide"
        slide = build_model(slide_cfg)
        slide.load_state_dict(state)
        record.update({f"slide.{k}": v for k, v in flat(run_model(slide, inputs)).items()})
        record.update({f"tta.{k}": v for k, v in flat(run_tta(cfg, model, inputs)).items()})
    formats = {"retinanet": ["onnx"], "mask_rcnn": ["torchscript"], "semantic": ["torchscript", "onnx"]}[name]
    for fmt in formats:
        vocabulary = VOCABULARY if name == "mask_rcnn" else None
        exported = run_exported(cfg, model, fmt, os.path.join(folder, fmt), vocabulary)
        record.update({f"{fmt}.{k}": v for k, v in flat(exported).items()})
    model.load_state_dict(state)
    record.update({f"train.{k}": v for k, v in training_losses(name, cfg, model).items()})
    record["state_dict_keys"] = sorted(state)
    return record


def compare(actual: dict, expected: dict, tolerance: float = TOLERANCE) -> list:
    """Differences beyond ``tolerance`` (relative to each reference tensor's largest value), as messages."""
    problems = []
    if actual["state_dict_keys"] != expected["state_dict_keys"]:
        problems.append("the state dict's names changed (checkpoints would no longer load)")
    keys = set(actual) - {"state_dict_keys"}
    reference = set(expected) - {"state_dict_keys"}
    if keys != reference:
        problems.append(f"outputs added {sorted(keys - reference)}, missing {sorted(reference - keys)}")
    for key in sorted(keys & reference):
        got, want = actual[key], expected[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            problems.append(f"{key}: {got.dtype} {tuple(got.shape)} instead of {want.dtype} {tuple(want.shape)}")
            continue
        if not want.is_floating_point():
            if not torch.equal(got, want):
                problems.append(f"{key}: {int((got != want).sum())} elements differ")
            continue
        scale = want.abs().max().clamp(min=1e-12) if want.numel() else 1.0
        error = ((got - want).abs().max() / scale).item() if want.numel() else 0.0
        if error > tolerance:
            problems.append(f"{key}: relative difference {error:.2e}")
    return problems


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference_text_encoder(monkeypatch):
    """The text encoder on its shared-prefix path, the forward the outputs were recorded with."""
    monkeypatch.setattr(text_encoder_module, "_is_packed_attention_block", lambda block: False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_outputs_equal_the_recorded_ones(name, tmp_path, reference_text_encoder):
    expected = torch.load(os.path.join(DATA, f"{name}.pt"))
    actual = outputs_of(name, str(tmp_path))
    compared = {k for k in expected if not k.startswith("train.") or k.startswith("train.step0.")}
    assert any(k.startswith("train.step0.") for k in compared)
    assert not compare({k: actual[k] for k in compared}, {k: expected[k] for k in compared})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_grouped_text_encoder_gives_the_recorded_inference_outputs(name, tmp_path):
    """Training steps are left out: AdamW's first steps magnify float32 rounding (1e-6 becomes 1e-2)."""
    expected = torch.load(os.path.join(DATA, f"{name}.pt"))
    actual = outputs_of(name, str(tmp_path))
    inference = {k for k in expected if not k.startswith("train.")}
    assert not compare({k: actual[k] for k in inference}, {k: expected[k] for k in inference})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the reference from the current code")
    parser.add_argument("--configs", action="store_true", help="also rewrite the stored configs from configs/")
    args = parser.parse_args()
    import tempfile

    torch.set_num_threads(1)
    text_encoder_module._is_packed_attention_block = lambda block: False  # see the module docstring
    os.makedirs(DATA, exist_ok=True)
    for name in sorted(SOURCES):
        if args.configs:
            write_recorded_cfg(name)
        with tempfile.TemporaryDirectory() as folder:
            record = outputs_of(name, folder)
        if args.record:
            torch.save(record, os.path.join(DATA, f"{name}.pt"))
            print(f"{name}: recorded {len(record) - 1} tensors")
        else:
            problems = compare(record, torch.load(os.path.join(DATA, f"{name}.pt")))
            print(f"{name}: {'equal' if not problems else problems}")


if __name__ == "__main__":
    main()
