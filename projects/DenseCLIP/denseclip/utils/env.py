"""Warnings that PyTorch gives about Detectron2's code on every run although nothing is wrong, silenced
one by one by their message, so that what a run prints is worth reading. The package installs the filters
when it is imported (first thing, before it imports Detectron2), in whatever order a script imports the
two: warnings raised while models run are silenced either way; the notices Detectron2 raises while it is
imported are silenced when denseclip comes first."""
import logging
import warnings

__all__ = ["silence_expected_warnings"]


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


_LOG_FILTERS = {
    # Detectron2's ROI pooler asks is_fx_tracing(), which PyTorch now also answers for torch.export;
    # nothing here is traced or exported.
    "torch.fx._symbolic_trace": _DropMessages("is_fx_tracing will return true"),
    # Detectron2's environment report imports torch.utils.cpp_extension, which reports a CUDA toolkit
    # (CUDA_HOME) without a GPU; nothing here compiles CUDA code.
    "torch.utils.cpp_extension": _DropMessages("No CUDA runtime is found"),
}


def silence_expected_warnings() -> None:
    """Install the filters (idempotent). Each matches one message, nothing else."""
    # Detectron2 and fvcore compile a few functions with torch.jit.script when imported; PyTorch
    # deprecates torch.jit.script, and those functions work as they are.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    # Detectron2's anchor generator calls torch.meshgrid without `indexing`; the default it warns about
    # ("ij") is the one the anchors need.
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
    for name, log_filter in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)


silence_expected_warnings()
