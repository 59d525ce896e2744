"""
Reading CLIP checkpoints (OpenAI TorchScript archives, open_clip state dicts) and mapping them into
a Detectron2 model that contains a CLIP image encoder (CLIPResNet or CLIPVisionTransformer) and, for
DenseCLIP, a ContextTextEncoder.
"""
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from ..modeling.backbone import CLIPResNet, CLIPVisionTransformer, resize_positional_grid
from ..modeling.text_encoder import ContextTextEncoder

__all__ = [
    "read_checkpoint_file",
    "as_clip_state_dict",
    "describe_clip_architecture",
    "load_clip_weights",
    "ClipLoadReport",
]

logger = logging.getLogger(__name__)

_TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")
_IGNORED_CLIP_KEYS = ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")


def is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())


def read_checkpoint_file(path: str):
    """
    The object a checkpoint file holds, on CPU: a TorchScript archive's state dict, a safetensors
    file's tensors, or what torch.save wrote (tensors, dicts, lists and plain values only). A file
    that is missing, empty, truncated or no checkpoint at all is an error that names it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a checkpoint: download or copy it again")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        if is_torchscript_archive(path):
            return torch.jit.load(path, map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        with open(path, "rb") as f:
            head = f.read(4)
        fix = "Download or copy the file again."
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither a zip archive nor a pickle
            what = "not a checkpoint (neither a PyTorch file, a TorchScript archive nor safetensors)"
        elif "Weights only load failed" in str(e) and "truncated" not in str(e):
            what = "a PyTorch file holding Python objects other than tensors and plain values, which are not loaded"
            fix = "Save the model's state_dict() with torch.save and give that file."
        else:
            what = "truncated or damaged (an incomplete PyTorch file)"
        reason = str(e).splitlines()[0].split(". ")[0]  # torch's first sentence
        raise ValueError(f"{path} is {what} ({reason}). {fix}") from e


def as_clip_state_dict(obj) -> Optional[Dict[str, torch.Tensor]]:
    """
    The CLIP state dict held by ``obj`` (plain, or open_clip's training checkpoint with
    ``state_dict`` and ``module.`` prefixes), in float32; None when ``obj`` is not a CLIP checkpoint.
    """
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            return None
        key = key[len("module."):] if key.startswith("module.") else key
        state[key] = value
    if "visual.conv1.weight" not in state or not torch.is_tensor(state["visual.conv1.weight"]):
        return None
    return {
        key: value.float() if value.is_floating_point() else value
        for key, value in state.items()
        if torch.is_tensor(value) and key not in _IGNORED_CLIP_KEYS
    }


_CLIP_RESNETS = {((3, 4, 6, 3), 64, 1024): "RN50", ((3, 4, 23, 3), 64, 512): "RN101"}
_CLIP_VITS = {(32, 768, 12, 512): "ViT-B/32", (16, 768, 12, 512): "ViT-B/16", (14, 1024, 24, 768): "ViT-L/14"}
# Which configs take which CLIP weights, for error messages.
_CONFIGS_FOR = "R_50 configs for RN50, R_101 for RN101, ViT_B_16 for ViT-B/16"


def _describe_resnet(layers, width, embed) -> str:
    name = _CLIP_RESNETS.get((tuple(layers), width, embed))
    text = f"a ResNet image encoder with LAYERS {list(layers)}, WIDTH {width}, EMBED_DIM {embed}"
    return f"{text} (CLIP {name})" if name else text


def _describe_vit(patch_size, width, layers, embed) -> str:
    name = _CLIP_VITS.get((patch_size, width, layers, embed))
    text = (
        f"a vision transformer with VIT.PATCH_SIZE {patch_size}, VIT.WIDTH {width}, VIT.LAYERS {layers}, "
        f"EMBED_DIM {embed}"
    )
    return f"{text} (CLIP {name})" if name else text


def _is_vit_state(state: Dict[str, torch.Tensor]) -> bool:
    return "visual.class_embedding" in state


def describe_clip_architecture(state: Dict[str, torch.Tensor]) -> str:
    """A short description of the image-encoder architecture a CLIP state dict holds, in MODEL.CLIP's terms."""
    if _is_vit_state(state):
        conv = state["visual.conv1.weight"]
        layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
        embed = state["visual.proj"].shape[1] if "visual.proj" in state else "?"
        return _describe_vit(conv.shape[-1], conv.shape[0], layers, embed)
    layers = [
        len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{i}.")}) for i in range(1, 5)
    ]
    if "visual.attnpool.c_proj.weight" in state:
        embed = state["visual.attnpool.c_proj.weight"].shape[0]
    elif "text_projection" in state:
        embed = state["text_projection"].shape[1]
    else:
        embed = "?"
    return _describe_resnet(layers, state["visual.conv1.weight"].shape[0] * 2, embed)


def _describe_model(image_encoder: nn.Module) -> str:
    if isinstance(image_encoder, CLIPVisionTransformer):
        blocks = len(image_encoder.transformer.resblocks)
        return _describe_vit(image_encoder.patch_size[0], image_encoder.width, blocks, image_encoder.embed_dim)
    layers = [len(stage) for stage in image_encoder.stages]
    return _describe_resnet(layers, image_encoder.conv1.weight.shape[0] * 2, image_encoder.embed_dim)


def find_modules(model: nn.Module, cls) -> List[tuple]:
    """(name, module) of every submodule of ``model`` of type ``cls``: where weights of that kind go,
    whatever model (detector, segmentor, backbone alone) holds them."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


@dataclass
class ClipLoadReport:
    """What a CLIP checkpoint provided to a model."""

    image_encoder_tensors: int = 0
    text_encoder_tensors: int = 0
    resized: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    not_from_clip: int = 0
    text_activation: Optional[str] = None
    text_only: bool = False

    def summary(self, path: str) -> str:
        if self.text_only:
            lines = [
                f"Loaded the text encoder from CLIP weights {path} (MODEL.DENSECLIP.TEXT_WEIGHTS): "
                f"{self.text_encoder_tensors} tensors."
            ]
        else:
            lines = [
                f"Loaded CLIP weights from {path}: {self.image_encoder_tensors} image-encoder tensors, "
                f"{self.text_encoder_tensors} text-encoder tensors."
            ]
        if self.text_activation:
            lines.append(
                f"  Text encoder activation: {self.text_activation} (MODEL.CLIP.ACTIVATION; OpenAI's CLIP "
                f"models use QuickGELU, open_clip models trained without '-quickgelu' use GELU)."
            )
        lines += [f"  {note}" for note in self.resized + self.notes]
        if self.unused:
            lines.append(f"  Not used by this model: {', '.join(self.unused)}.")
        if not self.text_only:
            lines.append(
                f"  {self.not_from_clip} other tensors (FPN, heads, context decoder, learnable contexts) "
                f"are not part of CLIP and keep their fresh initialisation, as intended."
            )
        return "\n".join(lines)


def _clip_to_model_keys(state, image_prefix, text_prefix, image_encoder, text_encoder, report):
    """Rename (and resize) CLIP tensors to the model's names."""
    mapped = {}
    for key, value in state.items():
        if key.startswith("visual."):
            name = key[len("visual."):]
            if image_encoder is None:  # text only: the image encoder's weights come from elsewhere
                if name == "conv1.weight":
                    report.unused.append("visual.* (the image encoder's weights come from MODEL.WEIGHTS)")
                continue
            if isinstance(image_encoder, CLIPVisionTransformer):
                value = _vit_tensor(name, value, image_encoder, report)
                if value is not None:
                    mapped[image_prefix + name] = value
                continue
            if name.startswith("attnpool.") and image_encoder.attnpool is None:
                if name == "attnpool.positional_embedding":
                    report.unused.append("visual.attnpool (the CLIP baseline has no attention pool)")
                continue
            if name == "attnpool.positional_embedding":
                value = _grid_for(value, image_encoder.input_resolution, 32, "attention-pool", report)
            mapped[image_prefix + name] = value
        elif key.startswith(_TEXT_PREFIXES):
            if text_encoder is None:
                if key == "positional_embedding":
                    report.unused.append("the text encoder (the CLIP baseline uses no text)")
                continue
            if key == "positional_embedding":
                needed = text_encoder.positional_embedding.shape[0]
                if value.shape[0] < needed:
                    raise ValueError(
                        f"The checkpoint's text encoder has {value.shape[0]} positions, fewer than the "
                        f"{needed} that MODEL.DENSECLIP.PROMPT_LENGTH + NUM_CONTEXT need"
                    )
                value = value[:needed]
            mapped[text_prefix + key] = value
        elif not key.startswith("attn_mask"):
            report.unused.append(key)
    return mapped


def _grid_for(value: torch.Tensor, input_resolution: int, stride: int, what: str, report) -> torch.Tensor:
    """A (1 + side^2) x C positional embedding resized to the grid of ``input_resolution / stride``."""
    side = input_resolution // stride
    if value.shape[0] == side * side + 1:
        return value
    old = int(round((value.shape[0] - 1) ** 0.5))
    report.resized.append(
        f"{what} positional grid interpolated {old}x{old} -> {side}x{side} "
        f"(MODEL.CLIP.INPUT_RESOLUTION {input_resolution})"
    )
    return resize_positional_grid(value, (side, side))


def _vit_tensor(name: str, value: torch.Tensor, image_encoder: CLIPVisionTransformer, report):
    """A ViT tensor as the model takes it: the positional grid resized if the model's differs, None
    for the output projection the CLIP baseline has not got."""
    if name in ("ln_post.weight", "ln_post.bias", "proj") and image_encoder.proj is None:
        if name == "proj":
            report.unused.append("visual.ln_post and visual.proj (the CLIP baseline uses no embeddings)")
        return None
    if name == "positional_embedding" and value.dim() == 2:
        side = image_encoder.input_resolution // image_encoder.patch_size[0]
        value = _grid_for(value, image_encoder.input_resolution, image_encoder.patch_size[0], "ViT", report)
        report.notes.append(
            f"ViT positional grid {side}x{side} ({value.shape[0]} x {value.shape[1]}) kept; each input's "
            f"patch grid gets it resized on the fly."
        )
    return value


def _describe_text(text_encoder: Optional[ContextTextEncoder]) -> str:
    if text_encoder is None:
        return "no text encoder"
    return (
        f"a text encoder of TEXT.WIDTH {text_encoder.width}, TEXT.LAYERS {len(text_encoder.transformer.resblocks)}, "
        f"EMBED_DIM {text_encoder.text_projection.shape[1]}"
    )


def load_clip_weights(
    model: nn.Module, state: Dict[str, torch.Tensor], path: str = "", text_only: bool = False
) -> ClipLoadReport:
    """
    Load a CLIP state dict (CLIP key names) into the CLIP image encoder (CLIPResNet or
    CLIPVisionTransformer) and ContextTextEncoder of ``model``; with ``text_only``, into the text
    encoder alone (the image encoder may be any backbone).

    Raises:
        ValueError if the checkpoint's architecture does not fit the model's, naming both.
    """
    texts = find_modules(model, ContextTextEncoder)
    text_prefix, text_encoder = (texts[0][0] + ".", texts[0][1]) if texts else ("", None)
    if text_only:
        if text_encoder is None:
            raise ValueError("This model has no text encoder to load CLIP's text weights into")
        image_prefix, image_encoder = None, None
    else:
        encoders = find_modules(model, (CLIPResNet, CLIPVisionTransformer))
        if len(encoders) != 1:
            raise ValueError(
                f"Expected one CLIP image encoder (CLIPResNet, CLIPVisionTransformer) in the model to load "
                f"CLIP weights into, found {len(encoders)}. For another image backbone, give CLIP's weights "
                f"as MODEL.DENSECLIP.TEXT_WEIGHTS (text encoder only)."
            )
        image_prefix, image_encoder = encoders[0][0] + ".", encoders[0][1]

    report = ClipLoadReport(text_only=text_only)
    mapped = _clip_to_model_keys(state, image_prefix, text_prefix, image_encoder, text_encoder, report)
    own = model.state_dict()
    clip_owned = [
        k for k in own
        if (image_prefix and k.startswith(image_prefix)) or (text_encoder is not None and k.startswith(text_prefix))
    ]
    # BatchNorm step counters mean nothing to frozen statistics; either side may lack them.
    mapped = {k: v for k, v in mapped.items() if k in own or not k.endswith("num_batches_tracked")}
    clip_owned = [k for k in clip_owned if not k.endswith(("contexts", "num_batches_tracked"))]
    problems = []
    missing = [k for k in clip_owned if k not in mapped]
    unexpected = [k for k in mapped if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
        for k in mapped
        if k in own and mapped[k].shape != own[k].shape
    ]
    if missing:
        problems.append(f"{len(missing)} model tensors have no counterpart (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors have no place in the model (e.g. {unexpected[0]})")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors differ in shape (e.g. {mismatched[0]})")
    if problems:
        where = f"CLIP checkpoint {path}" if path else "The CLIP checkpoint"
        if text_only:
            checkpoint_text = describe_clip_architecture(state) + (
                f" and a text encoder of width {state['token_embedding.weight'].shape[1]}"
                if "token_embedding.weight" in state else ""
            )
            raise ValueError(
                f"{where} does not fit the model's text encoder: it holds {checkpoint_text}; the model has "
                f"{_describe_text(text_encoder)} (MODEL.CLIP.TEXT, MODEL.CLIP.EMBED_DIM). {'; '.join(problems)}."
            )
        raise ValueError(
            f"{where} does not fit the model's architecture: it holds {describe_clip_architecture(state)}; "
            f"the model is configured (MODEL.CLIP) with {_describe_model(image_encoder)}. "
            f"{'; '.join(problems)}. Use the config that matches these weights ({_CONFIGS_FOR}) or the "
            f"weights that match the config."
        )
    model.load_state_dict(mapped, strict=False)
    report.image_encoder_tensors = sum(k.startswith(image_prefix) for k in mapped) if image_prefix else 0
    report.text_encoder_tensors = len(mapped) - report.image_encoder_tensors
    report.not_from_clip = len(own) - len(mapped)
    report.text_activation = text_encoder.activation if text_encoder is not None else None
    return report
