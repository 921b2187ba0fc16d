"""The HDF5 feature store (see ``store`` for the layout)."""

from furnitype.features.store import SETTING_KEYS, FeatureSet, load, read_meta, save

__all__ = ["SETTING_KEYS", "FeatureSet", "load", "read_meta", "save"]
