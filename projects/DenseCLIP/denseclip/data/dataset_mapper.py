"""Detectron2's DatasetMapper, with image-reading errors that name the file and the fix."""
from detectron2.data import DatasetMapper

__all__ = ["DenseCLIPDatasetMapper"]


class DenseCLIPDatasetMapper(DatasetMapper):
    """Same as :class:`DatasetMapper`; a missing or undecodable image raises an OSError naming it."""

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except OSError as e:  # FileNotFoundError, PIL.UnidentifiedImageError, truncated files
            file_name = dataset_dict.get("file_name", "<no file_name>")
            raise OSError(
                f"Cannot read image {file_name} (image_id {dataset_dict.get('image_id', '?')}): {e}. "
                f"Restore or replace the file, or remove its entry from the dataset's annotation file."
            ) from e
