"""Importing Keras (and TensorFlow) quietly and only when needed: every layer that builds or loads a network
calls ``import_keras`` instead of ``import keras``, so commands that need no network start in well under a second.
"""

from __future__ import annotations

import logging
import os
import sys

from furnitype.errors import FurnitypeError, first_line

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter is not for our users


def import_keras():
    """Import Keras (and TensorFlow) with the C++ start-up chatter on stderr silenced; return the module."""
    if "keras" not in sys.modules:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                import keras  # noqa: F401
        except (ImportError, ValueError) as err:  # Keras raises ValueError for a backend it does not know
            raise _backend_error(err) from err
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    return sys.modules["keras"]


def _backend_error(err: Exception) -> FurnitypeError:
    """What to do when Keras cannot start its backend (one not installed, or a name Keras does not know)."""
    backend = os.environ.get("KERAS_BACKEND") or "configured"
    extras = {"tensorflow": "tensorflow", "jax": "'furnitype[jax]'", "torch": "'furnitype[torch]'"}
    fix = f"pip install {extras[backend]}, or set" if backend in extras else "set"
    return FurnitypeError(
        f"Keras cannot start its {backend} backend ({first_line(err)}); {fix} KERAS_BACKEND to tensorflow, jax "
        "or torch (docs/backends.md)."
    )
