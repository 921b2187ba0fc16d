"""Importing Keras (and TensorFlow) quietly and only when needed: every layer that builds or loads a network
calls ``import_keras`` instead of ``import keras``, so commands that need no network start in well under a second.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys

from furnitype.errors import FurnitypeError, first_line

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter is not for our users

#: Keras' backends furnitype runs on (Keras also has numpy and openvino ones, for inference only).
BACKENDS = ("tensorflow", "jax", "torch")


def import_keras():
    """Import Keras (and TensorFlow) with the C++ start-up chatter on stderr silenced; return the module."""
    if "keras" not in sys.modules:
        keras_config()  # Keras would hang on a FIFO there, or fail with a traceback on a folder or a JSON list
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
    keras = sys.modules["keras"]
    if keras.config.backend() not in BACKENDS:
        raise FurnitypeError(
            f"furnitype runs on Keras' {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]} backend, not "
            f"{keras.config.backend()}; set KERAS_BACKEND to one of them (docs/backends.md)."
        )
    return keras


def keras_config_path() -> str:
    """Where Keras reads its settings (``keras.json``), found as ``keras.src.backend.config`` finds it."""
    if "KERAS_HOME" in os.environ:  # even empty: Keras then reads keras.json in the working directory
        folder = os.environ["KERAS_HOME"]
    else:
        home = os.path.expanduser("~")
        folder = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    return os.path.expanduser(os.path.join(folder, "keras.json"))


def keras_config() -> dict:
    """Keras' settings file as Keras reads it: {} when there is none or it is not JSON (Keras then uses its
    defaults). A settings file that is not a regular file, or JSON but not an object, is one line."""
    path = keras_config_path()
    if not os.path.exists(path):  # as Keras decides (KERAS_HOME a file, a link that loops: none either)
        return {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opened to check it must not wait for a writer
    except OSError as err:
        raise _config_error(path, err.strerror or type(err).__name__) from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _config_error(path, "not a regular file")
        with os.fdopen(fd, encoding="utf-8", closefd=False) as fh:
            config = json.load(fh)
    except ValueError:
        return {}
    except OSError as err:
        raise _config_error(path, err.strerror or type(err).__name__) from err
    finally:
        os.close(fd)
    if not isinstance(config, dict):
        raise _config_error(path, "not a JSON object")
    return config


def _config_error(path: str, why: str) -> FurnitypeError:
    return FurnitypeError(
        f"Keras cannot read its settings file {path} ({why}); remove it, or set KERAS_HOME to another folder."
    )


def _backend_error(err: Exception) -> FurnitypeError:
    """What to do when Keras cannot start its backend (one not installed, or a name Keras does not know)."""
    backend = os.environ.get("KERAS_BACKEND") or "configured"
    extras = {"tensorflow": "tensorflow", "jax": "'furnitype[jax]'", "torch": "'furnitype[torch]'"}
    fix = f"pip install {extras[backend]}, or set" if backend in extras else "set"
    return FurnitypeError(
        f"Keras cannot start its {backend} backend ({first_line(err)}); {fix} KERAS_BACKEND to tensorflow, jax "
        "or torch (docs/backends.md)."
    )
