"""Detectron2's checkpointer, extended to read CLIP checkpoints and to save atomically."""
import logging
import os
from urllib.parse import urlparse

import torch

from detectron2.checkpoint import DetectionCheckpointer

from .clip_weights import as_clip_state_dict, load_clip_weights, read_checkpoint_file

__all__ = ["DenseCLIPCheckpointer"]

logger = logging.getLogger(__name__)

CLIP_WEIGHTS_HELP = (
    "Training starts from CLIP's weights: OpenAI's RN50.pt / RN101.pt TorchScript archives or "
    "open_clip state dicts (.pt, .bin, .safetensors), set as MODEL.WEIGHTS. Nothing is downloaded "
    "for you; see README.md, 'CLIP weights'."
)


class DenseCLIPCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` that also:

    1. loads CLIP checkpoints given as MODEL.WEIGHTS into the image and text encoders (positional
       grids resized), and says plainly what it loaded; a checkpoint of another architecture is an
       error that names both architectures;
    2. fails with a clear message when the weights file does not exist;
    3. writes checkpoints and the ``last_checkpoint`` tag atomically, so a process killed while
       saving never leaves a broken file for ``--resume`` to pick.
    """

    def load(self, path, *args, **kwargs):
        if path and not urlparse(path).scheme and not os.path.isfile(path):
            raise FileNotFoundError(
                f"MODEL.WEIGHTS file not found: {path}. Check the path, or set MODEL.WEIGHTS '' to start "
                f"from random weights. {CLIP_WEIGHTS_HELP}"
            )
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        if filename.endswith(".pkl"):  # Detectron2's pickled model-zoo weights (ImageNet backbones)
            loaded = super()._load_file(filename)
        else:
            loaded = read_checkpoint_file(filename)
            if not isinstance(loaded, dict) or not isinstance(loaded.get("model", loaded.get("state_dict")), dict):
                loaded = {"model": loaded}  # a bare state dict (CLIP)
            elif "model" not in loaded:
                loaded["model"] = loaded.pop("state_dict")
            if "mmdet_version" in (loaded.get("meta") or {}):
                raise ValueError(
                    f"{filename} is an MMDetection checkpoint (the DenseCLIP release's layout), whose names "
                    f"this model does not use. Convert it first: python tools/convert-denseclip-mmdet-to-d2.py "
                    f"{filename} <output.pth>, then set MODEL.WEIGHTS to the output."
                )
        clip_state = as_clip_state_dict(loaded.get("model"))
        if clip_state is not None:
            return {"model": clip_state, "__author__": "CLIP", "__path__": filename}
        return loaded

    def _load_model(self, checkpoint):
        if checkpoint.get("__author__") != "CLIP":
            return super()._load_model(checkpoint)
        path = checkpoint.pop("__path__", "")
        report = load_clip_weights(self.model, checkpoint.pop("model"), path)
        logger.info(report.summary(path))
        return None

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(save_file, lambda f: f.write(last_filename_basename.encode()))


def _atomic_write(path: str, write) -> None:
    """Write to a temporary file next to ``path``, flush it to disk, then rename it over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
