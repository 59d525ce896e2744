from . import datasets  # noqa: F401  (registers the generated dataset)
from .dataset_mapper import DenseCLIPDatasetMapper
