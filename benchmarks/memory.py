"""Peak memory of inference per input pixel of one photo, per backbone: the ``bytes_per_pixel`` of the registry.

Run by hand (a few minutes on 2 cores)::

    .venv/bin/python benchmarks/memory.py [--sizes 600 1000] [--backbones vgg16 inception]

For each backbone and image size, a fresh child process builds the conv base (random weights, average
pooling) as ``extract`` does (one traced graph), traces it without running it, then runs one batch of
``--batch`` random photos; the growth of peak RSS (``ru_maxrss``) over the resident memory before that call,
divided by the batch's input pixels, is the working memory per pixel. ``furnitype.extract.backbones``
registers a value a little above the largest measured one: it only has to tell what cannot fit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from _common import write_results


def child(backbone: str, size: int, batch: int) -> dict:
    """Measure in this process (a fresh one)."""
    import numpy as np

    from furnitype.extract.backbones import get_backbone
    from furnitype.keras_loader import import_keras

    keras = import_keras()
    import tensorflow as tf

    entry = get_backbone(backbone)
    builder = getattr(getattr(keras.applications, entry.keras_name), entry.builder)
    model = builder(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
    forward = tf.function(lambda x: model(x, training=False),
                          input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])
    forward.get_concrete_function()  # traced now, not run: the run below is the first to allocate
    x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    with open("/proc/self/statm") as fh:
        resident = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    forward(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"backbone": backbone, "size": size, "batch": batch,
            "bytes_per_pixel": (peak - resident) / (batch * size * size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "inception"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[600, 1000])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--results", default="benchmarks/results/memory.json")
    parser.add_argument("--child", nargs=3, metavar=("BACKBONE", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    measured = []
    for backbone in args.backbones:
        for size in args.sizes:
            cmd = [sys.executable, __file__, "--child", backbone, str(size), str(args.batch)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            measured.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{backbone:10} {size:5} px  batch {args.batch}: {measured[-1]['bytes_per_pixel']:6.0f} bytes/pixel")
    write_results(args.results, {"measured": measured, "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
