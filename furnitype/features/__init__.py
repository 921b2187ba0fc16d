"""The HDF5 feature store (see ``store`` for the layout, ``cache`` for how an extraction changes it)."""

from furnitype.features.store import SETTING_KEYS, FeatureSet, compact, load, read_meta, save, summary

__all__ = ["SETTING_KEYS", "FeatureSet", "compact", "load", "read_meta", "save", "summary"]
