"""Stage one: pretrained convolutional bases over image files (the use case is ``furnitype.extraction``)."""

from furnitype.extract.backbones import list_backbones
from furnitype.extract.pipeline import ExtractSpec, Outcome, feature_batches

__all__ = ["ExtractSpec", "Outcome", "feature_batches", "list_backbones"]
