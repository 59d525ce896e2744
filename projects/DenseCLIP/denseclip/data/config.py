"""Config keys of the input pipeline owned by ``denseclip.data``; ``add_denseclip_config`` calls
:func:`add_input_config`."""

__all__ = ["add_input_config"]


def add_input_config(cfg) -> None:
    """Add the input pipeline's keys to a Detectron2 config, in place (setting a key already there to its
    default is harmless, so calling this twice is too)."""
    # How every resize of the input pipeline interpolates (training and test mappers, the predictor):
    # "pil", Detectron2's ResizeTransform (PIL's antialiasing bilinear filter for uint8 images); or
    # "opencv", the release's cv2.resize (INTER_LINEAR images, INTER_NEAREST label maps, as MMCV's
    # imrescale). The output size is the same with both. See denseclip/data/resize.py.
    cfg.INPUT.RESIZE_BACKEND = "pil"


def _add_to_detectron2_defaults() -> None:
    """Transitional: until ``add_denseclip_config`` calls :func:`add_input_config`, give Detectron2's
    default config (which ``get_cfg()`` clones) the keys, so that YAML files that set them load.
    Remove this and its call in ``denseclip/data/__init__.py`` once config.py calls add_input_config."""
    from detectron2.config import defaults

    if "RESIZE_BACKEND" not in defaults._C.INPUT:
        add_input_config(defaults._C)
