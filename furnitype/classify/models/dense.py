"""``dense``: a small Keras head on the features, stopped early on photos held out by content."""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from furnitype.classify.models.base import (
    CLASS_WEIGHT,
    COUNT,
    FRACTION,
    NON_NEGATIVE_INT,
    POSITIVE,
    FeatureClassifier,
)
from furnitype.classify.runfiles import Damage, file_inside
from furnitype.classify.split import ContentSplit
from furnitype.errors import StoreError, first_line
from furnitype.outputs import progress_bar

#: Whether a fit draws its epochs as a progress bar (on a terminal): ``epoch_progress`` sets it.
_EPOCH_BAR: ContextVar[bool] = ContextVar("furnitype_epoch_bar", default=False)


@contextmanager
def epoch_progress(enabled: bool = True) -> Iterator[None]:
    """Within it, a dense head's fit draws a bar of its epochs (up to ``max_epochs``) when stderr is a terminal."""
    token = _EPOCH_BAR.set(enabled)
    try:
        yield
    finally:
        _EPOCH_BAR.reset(token)


class DenseModel(FeatureClassifier):
    """Keras head: standardisation, ``Dense(hidden_units, relu)``, ``Dropout``, ``Dense(softmax)``.

    Trained with Adam on sparse categorical cross-entropy; early stopping watches the loss on a validation
    part of the training rows (``validation_fraction`` of each class's distinct photos) and restores the best
    epoch's weights. Without validation rows it trains ``max_epochs``. Stored as a ``.keras`` file and loaded
    with ``safe_mode=True``; Keras and TensorFlow are imported only when a dense model is used.

    Parameters
    ----------
    hidden_units : int, default=256
    dropout : float, default=0.5
        Dropout rate after the hidden layer, in [0, 1).
    learning_rate : float, default=1e-3
    batch_size : int, default=64
    max_epochs : int, default=200
    patience : int, default=10
        Epochs without a better validation loss before training stops.
    validation_fraction : float, default=0.15
        Share of the training photos held out for early stopping, in [0, 1); 0 trains ``max_epochs``.
    class_weight : {None, "balanced"}, default=None
        ``"balanced"`` weights each class by ``n_rows / (n_classes * class_rows)`` in the loss.
    random_state : int, default=0
        Seeds the validation split, the initial weights, dropout and shuffling.

    Attributes
    ----------
    model_ : keras.Model
    best_epoch_, epochs_run_ : int
        The epoch whose weights were kept, and the epochs trained.
    n_validation_ : int
        Rows held out for early stopping.
    """

    name = "dense"
    payload = "model.keras"
    _parameter_constraints = {
        "hidden_units": [COUNT],
        "dropout": [FRACTION],
        "learning_rate": [POSITIVE],
        "batch_size": [COUNT],
        "max_epochs": [COUNT],
        "patience": [COUNT],
        "validation_fraction": [FRACTION],
        "class_weight": CLASS_WEIGHT,
        "random_state": [NON_NEGATIVE_INT],
    }
    _fitted_info = {"best_epoch": [COUNT], "epochs_run": [COUNT], "n_validation": [NON_NEGATIVE_INT]}

    def __init__(
        self,
        *,
        hidden_units: int = 256,
        dropout: float = 0.5,
        learning_rate: float = 1e-3,
        batch_size: int = 64,
        max_epochs: int = 200,
        patience: int = 10,
        validation_fraction: float = 0.15,
        class_weight: str | None = None,
        random_state: int = 0,
    ):
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.random_state = random_state

    @classmethod
    def prepare(cls) -> None:
        _keras()

    def chosen(self) -> str:
        return f"epoch {self.best_epoch_}/{self.epochs_run_}"

    def tuning(self) -> str:
        return (
            f"the dense head is not tuned beyond early stopping (best epoch {self.best_epoch_} of "
            f"{self.epochs_run_}, {self.n_validation_} validation rows)"
        )

    def fit_notes(self) -> list[str]:
        if self.n_validation_:
            return []
        return [f"no validation photos, so no early stopping ({self.epochs_run_} epochs)."]

    def versions(self) -> dict:
        return {**super().versions(), "keras": _keras().__version__}

    def _fit(self, X, y, groups, n_classes):
        keras = _keras()
        keras.utils.set_random_seed(self.random_state)
        if self.validation_fraction > 0:
            splitter = ContentSplit(self.validation_fraction, random_state=self.random_state)
            fit_rows, val_rows = next(splitter.split(X, y.astype(str), groups))
        else:
            fit_rows, val_rows = np.arange(len(y)), np.array([], dtype=int)
        X_fit, y_fit = X[fit_rows], y[fit_rows]
        model = keras.Sequential(
            [
                keras.Input(shape=(X.shape[1],)),
                keras.layers.Normalization(mean=X_fit.mean(axis=0), variance=X_fit.var(axis=0)),
                keras.layers.Dense(self.hidden_units, activation="relu"),
                keras.layers.Dropout(self.dropout, seed=self.random_state),
                keras.layers.Dense(n_classes, activation="softmax"),
            ],
            name="furnitype_dense_head",
        )
        model.compile(optimizer=keras.optimizers.Adam(self.learning_rate), loss="sparse_categorical_crossentropy")
        callbacks, validation = [], None
        if len(val_rows):
            stopper = keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=self.patience, restore_best_weights=True
            )
            callbacks, validation = [stopper], (X[val_rows], y[val_rows])
        class_weight = None
        if self.class_weight == "balanced":
            present = np.unique(y_fit)
            weights = compute_class_weight("balanced", classes=present, y=y_fit)
            class_weight = dict(zip(present.tolist(), weights.tolist(), strict=True))
        stops = "early stopping" if callbacks else "no early stopping"
        bar = progress_bar(enabled=_EPOCH_BAR.get(), total=self.max_epochs, unit="epoch", leave=False,
                           desc=f"dense (at most {self.max_epochs} epochs, {stops})")
        counter = keras.callbacks.LambdaCallback(on_epoch_end=lambda _epoch, _logs: bar.update(1))
        with bar:
            history = model.fit(
                X_fit,
                y_fit,
                batch_size=self.batch_size,
                epochs=self.max_epochs,
                validation_data=validation,
                class_weight=class_weight,
                callbacks=[*callbacks, counter],
                shuffle=True,
                verbose=0,
            )
        self.model_ = model
        self.epochs_run_ = len(history.history["loss"])
        self.best_epoch_ = int(callbacks[0].best_epoch) + 1 if callbacks else self.epochs_run_
        self.n_validation_ = len(val_rows)

    def _predict_proba(self, X):
        to_numpy = _keras().ops.convert_to_numpy
        chunks = [to_numpy(self.model_(X[i : i + 4096], training=False)) for i in range(0, len(X), 4096)]
        proba = np.concatenate(chunks).astype(np.float64) if chunks else np.zeros((0, len(self.classes_)))
        return proba / proba.sum(axis=1, keepdims=True).clip(min=1e-12)

    def _save_payload(self, path: Path) -> None:
        with warnings.catch_warnings():  # raised inside Keras' own saving code with numpy 2 (harmless)
            warnings.filterwarnings("ignore", "__array__ implementation doesn't accept", DeprecationWarning)
            self.model_.save(path)

    def _load_payload(self, directory: Path) -> None:
        keras = _keras()
        path = file_inside(directory, self.payload)
        try:  # non-blocking: a FIFO put there since ``file_inside`` looked must not make this wait
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as fh:
                archive = zipfile.is_zipfile(fh)
        except OSError as err:
            raise StoreError(f"cannot read {path}: {err.strerror or err}") from err
        if not archive:  # Keras would call it "File not found"
            raise Damage(self.payload, "not a Keras model file (a .keras file is a zip archive; this one is not)")
        try:
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as err:  # noqa: BLE001 - Keras raises many types for a damaged or foreign file
            raise Damage(self.payload, f"not a loadable Keras model ({first_line(err)})") from err
        shapes = (getattr(model, "input_shape", None), getattr(model, "output_shape", None))
        expected = ((None, self.n_features_in_), (None, len(self.classes_)))
        if not isinstance(model, keras.Model) or shapes != expected:
            raise Damage(
                self.payload,
                f"a network from {shapes[0]} to {shapes[1]}, not from {self.n_features_in_} features to "
                f"{len(self.classes_)} classes",
            )
        self.model_ = model


def _keras():
    from furnitype.keras_loader import import_keras

    return import_keras()
