"""Detectron2's checkpointer, extended to read CLIP checkpoints and to save atomically."""
import logging
import os
from urllib.parse import urlparse

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..modeling.text_encoder import ContextTextEncoder
from .clip_weights import as_clip_state_dict, find_modules, load_clip_weights, read_checkpoint_file

__all__ = ["DenseCLIPCheckpointer"]

logger = logging.getLogger(__name__)

CLIP_WEIGHTS_HELP = (
    "Training starts from CLIP's weights: OpenAI's RN50.pt / RN101.pt / ViT-B-16.pt TorchScript archives "
    "or open_clip state dicts (.pt, .bin, .safetensors), set as MODEL.WEIGHTS. Nothing is downloaded "
    "for you; see README.md, 'What needs real weights'."
)


class DenseCLIPCheckpointer(DetectionCheckpointer):
    """
    :class:`DetectionCheckpointer` that also:

    1. loads CLIP checkpoints given as MODEL.WEIGHTS into the image and text encoders (positional
       grids resized), and says plainly what it loaded; a checkpoint of another architecture is an
       error that names both architectures;
    2. with ``text_weights`` (MODEL.DENSECLIP.TEXT_WEIGHTS), fills the text encoder from that CLIP
       file whenever the loaded checkpoint has none (e.g. ImageNet weights of the image backbone);
    3. refuses missing, empty, truncated and foreign files, and unconverted release checkpoints,
       with a message that names the file;
    4. writes checkpoints and the ``last_checkpoint`` tag atomically, so a process killed while
       saving never leaves a broken file for ``--resume`` to pick.
    """

    def __init__(self, model, save_dir: str = "", *, text_weights: str = "", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.text_weights = text_weights
        self._text_encoder_loaded = False
        self._path = ""
        self.incompatible = None  # what the last load of a Detectron2-format checkpoint left out

    def load(self, path, *args, **kwargs):
        self._path = path
        for key, file in (("MODEL.WEIGHTS", path), ("MODEL.DENSECLIP.TEXT_WEIGHTS", self.text_weights)):
            if file and not urlparse(file).scheme and not os.path.isfile(file):
                raise FileNotFoundError(
                    f"{key} file not found: {file}. Check the path, or set {key} '' to start from random "
                    f"weights. {CLIP_WEIGHTS_HELP}"
                )
        self._text_encoder_loaded = False
        self.incompatible = None
        loaded = super().load(path, *args, **kwargs)
        if self.text_weights and find_modules(self.model, ContextTextEncoder) and not self._text_encoder_loaded:
            self._load_text_weights()
        return loaded

    def _load_text_weights(self):
        state = as_clip_state_dict(read_checkpoint_file(self.text_weights))
        if state is None:
            raise ValueError(
                f"MODEL.DENSECLIP.TEXT_WEIGHTS {self.text_weights} is not a CLIP checkpoint (no visual.* and "
                f"text keys of OpenAI's or open_clip's CLIP)"
            )
        report = load_clip_weights(self.model, state, self.text_weights, text_only=True)
        logger.info(report.summary(self.text_weights))

    def _load_file(self, filename):
        if filename.endswith(".pkl"):  # Detectron2's pickled model-zoo weights (ImageNet backbones)
            loaded = super()._load_file(filename)
        else:
            loaded = read_checkpoint_file(filename)
            if not isinstance(loaded, dict) or not isinstance(loaded.get("model", loaded.get("state_dict")), dict):
                loaded = {"model": loaded}  # a bare state dict (CLIP)
            elif "model" not in loaded:
                loaded["model"] = loaded.pop("state_dict")
            meta = loaded.get("meta") or {}
            if "mmdet_version" in meta or "mmseg_version" in meta:
                raise ValueError(
                    f"{filename} is an {'MMDetection' if 'mmdet_version' in meta else 'MMSegmentation'} checkpoint "
                    f"(the DenseCLIP release's layout), whose names this model does not use. Convert it first: "
                    f"python tools/convert-denseclip-release-to-d2.py {filename} <output.pth>, then set "
                    f"MODEL.WEIGHTS to the output."
                )
        clip_state = as_clip_state_dict(loaded.get("model"))
        if clip_state is not None:
            return {"model": clip_state, "__author__": "CLIP", "__path__": filename}
        return loaded

    def _load_model(self, checkpoint):
        if checkpoint.get("__author__") != "CLIP":
            self._text_encoder_loaded = any(
                ".text_encoder." in k and not k.endswith(".contexts") for k in checkpoint["model"]
            )
            incompatible = super()._load_model(checkpoint)
            self._check_prompt_fits(incompatible.incorrect_shapes)
            self.incompatible = incompatible
            return incompatible
        path = checkpoint.pop("__path__", "")
        report = load_clip_weights(self.model, checkpoint.pop("model"), path)
        self._text_encoder_loaded = report.text_encoder_tensors > 0
        logger.info(report.summary(path))
        return None

    def check_complete(self, config: str = "") -> None:
        """
        Refuse what the last :meth:`load` left of the model untrained: parameters and buffers that the
        Detectron2-format checkpoint lacks or has in another shape (weights trained with another config;
        Detectron2 only warns and leaves them random). The text encoder counts as loaded when it was
        filled from MODEL.DENSECLIP.TEXT_WEIGHTS; a CLIP checkpoint (where training starts) is not checked.

        Raises:
            ValueError naming the weights, the config (``config``: how to call it), what is missing and the fix.
        """
        if self.incompatible is None:
            return
        filled_text = bool(self.text_weights) and not self._text_encoder_loaded
        reshaped = {key for key, *_ in self.incompatible.incorrect_shapes}
        missing = [
            key for key in self.incompatible.missing_keys
            if key not in reshaped and not (filled_text and ".text_encoder." in f".{key}")
        ]
        if not missing and not reshaped:
            return

        def modules(keys):
            names = sorted({".".join(key.split(".")[:2]) for key in keys})
            return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

        problems = []
        if missing:
            problems.append(f"{len(missing)} of the model's tensors are not in it ({modules(missing)})")
        if reshaped:
            problems.append(f"{len(reshaped)} {'has' if len(reshaped) == 1 else 'have'} another shape ({modules(reshaped)})")
        raise ValueError(
            f"MODEL.WEIGHTS {self._path} does not fit {config or 'the config'}: {' and '.join(problems)}. "
            f"They were trained with another config: give the config they were trained with (the config.yaml "
            f"that training wrote beside them)."
        )

    def _check_prompt_fits(self, incorrect_shapes) -> None:
        """Detectron2 skips tensors whose shape differs from the model's, with a warning. For a trained
        text encoder's positional embedding (PROMPT_LENGTH + NUM_CONTEXT positions) and contexts that
        would leave them random and change every prediction: refuse instead."""
        shapes = {key: (tuple(ours), tuple(theirs)) for key, theirs, ours in incorrect_shapes}
        for name, module in find_modules(self.model, ContextTextEncoder):
            positions, contexts = shapes.get(f"{name}.positional_embedding"), shapes.get(f"{name}.contexts")
            if positions is None and contexts is None:
                continue
            ours = (module.positional_embedding.shape[0], module.num_context)
            theirs = (positions[1][0] if positions else ours[0], contexts[1][0] if contexts else ours[1])
            raise ValueError(
                f"MODEL.WEIGHTS {self._path}: its text encoder was trained with {theirs[0]} token positions "
                f"(PROMPT_LENGTH {theirs[0] - theirs[1]} + NUM_CONTEXT {theirs[1]}), this config's has "
                f"{ours[0]} (MODEL.DENSECLIP.PROMPT_LENGTH {ours[0] - ours[1]} + NUM_CONTEXT {ours[1]}); "
                f"loaded, its prompts would not fit. Set MODEL.DENSECLIP.PROMPT_LENGTH {theirs[0] - theirs[1]} "
                f"and MODEL.DENSECLIP.NUM_CONTEXT {theirs[1]} (the trained values), and use names that fit them."
            )

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
