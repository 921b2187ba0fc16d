"""Stage one: pretrained convolutional bases over image files, into the HDF5 feature store."""

from furnitype.extract.backbones import list_backbones
from furnitype.extract.run import ExtractResult, extract

__all__ = ["ExtractResult", "extract", "list_backbones"]
