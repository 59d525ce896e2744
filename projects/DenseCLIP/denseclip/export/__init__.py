"""TorchScript and ONNX export of DenseCLIP models (tools/deploy/export_model.py)."""
from .exporter import (
    EXPORT_FORMATS,
    EXPORT_METHODS,
    METADATA_NAME,
    ONNX_OPSET,
    check_exportable,
    export_model,
    max_input_side,
)
