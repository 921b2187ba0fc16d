"""Importing Keras (and TensorFlow) quietly and only when needed: every layer that builds or loads a network
calls ``import_keras`` instead of ``import keras``, so commands that need no network start in well under a second.
"""

from __future__ import annotations

import logging
import os
import sys

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
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    return sys.modules["keras"]
