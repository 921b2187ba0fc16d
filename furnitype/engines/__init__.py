"""Where the expensive work runs: ``local`` (threads in this process) or ``ray`` (a Ray cluster).

Every engine yields the same ``list[Outcome]`` batches from the same per-batch code
(``furnitype.extract.pipeline``), so the cache and the store do not know which one ran: the driver commits each
batch to the store as it returns. Ray is imported only when the ray engine is asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from furnitype.errors import InputError

if TYPE_CHECKING:
    from furnitype.extract.pipeline import Outcome

ENGINES = ("local", "ray")

#: ``source(spec, paths, batch_size=, workers=)`` -> batches of ``Outcome``, as ``feature_batches``.
BatchSource = Callable[..., Iterator["list[Outcome]"]]


def batch_source(
    engine: str = "local",
    *,
    ray_address: str | None = None,
    ray_workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
) -> BatchSource:
    """The function that turns paths into feature batches for ``engine``; options are checked now.

    Parameters
    ----------
    engine : {"local", "ray"}, default="local"
    ray_address, ray_workers, gpus_per_worker, cpus_per_worker
        ``RayEngine``'s ``address``, ``workers``, ``gpus_per_worker``, ``cpus_per_worker``; only with
        ``engine="ray"``.

    Raises
    ------
    InputError
        An unknown engine, a Ray option with the local engine, or a bad Ray option.
    FurnitypeError
        ``engine="ray"`` and Ray is not installed.
    """
    _check_engine(
        engine,
        ray_address=ray_address,
        ray_workers=ray_workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
    )
    if engine == "local":
        from furnitype.extract.pipeline import feature_batches

        return feature_batches
    from furnitype.engines.ray import RayEngine

    return RayEngine(
        address=ray_address,
        workers=ray_workers,
        gpus_per_worker=0.0 if gpus_per_worker is None else gpus_per_worker,
        cpus_per_worker=1.0 if cpus_per_worker is None else cpus_per_worker,
    )


@contextlib.contextmanager
def joblib_backend(engine: str = "local", *, ray_address: str | None = None) -> Iterator[None]:
    """Run the ``joblib.Parallel`` work inside (classify's cross-validation) on ``engine``.

    ``local`` changes nothing (one process, as without the context); ``ray`` sends each task to Ray.
    """
    _check_engine(engine, ray_address=ray_address)
    if engine == "local":
        yield
        return
    from furnitype.engines.ray import joblib_on_ray

    with joblib_on_ray(ray_address):
        yield


def _check_engine(engine: str, **ray_options) -> None:
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}. Received: engine={engine!r}")
    given = [name for name, value in ray_options.items() if value is not None]
    if engine == "local" and given:
        verb = "apply" if len(given) > 1 else "applies"
        raise InputError(f"{', '.join(given)} {verb} only to the ray engine. Received: engine='local'")
