"""The ray engine against the local one on real photos: rows, difference, throughput, Ray's overhead, the
per-batch time inside a Ray worker, and what a GPU worker would do.

Run by hand (about 15 minutes for 240 VGG16 photos on 2 cores)::

    .venv/bin/python benchmarks/ray_engine.py PHOTOS/ \\
        --weights vgg16_notop.weights.h5 --limit 240 [--ray 2x1,1x2] [--rounds 2]

Everything runs in this process and the Ray it starts (``ray.init(num_cpus=2)``), in this order:

1. **local round 0**: ``extract(engine="local")`` of an evenly spaced sample into a new store (the network's
   first build in this process: the reference store).
2. **Ray start-up**: ``ray.init`` wall, and the CPU its idle processes use in 10 s.
3. **rounds**: local, then each Ray configuration ``WORKERSxCPUS`` (``extract(engine="ray", ray_workers=,
   cpus_per_worker=)``), each into a new store, repeated ``--rounds`` times so that the configurations
   alternate. Wall, and CPU of this process plus every Ray process (sampled from ``/proc`` every 0.2 s).
   A Ray run includes starting its actors (TensorFlow import, network build). Usable CPU swings between 1
   and 2 cores here (other people's work), so compare CPU seconds per image more than wall.
3. **per batch in a worker**: the engine's own worker class, timed, on ``--batch-photos`` photos through Ray
   Data with one actor: actor start, then per batch the wall and CPU of the whole call and of the network
   alone (read + hash + decode is the rest).
4. **rows**: the stores compared (paths, labels, sha256, skips equal; max absolute and relative difference).
5. **GPU projection**: per-worker throughput from the measured decoding CPU per image and VGG16's
   15.5 GMAC (31 GFLOP) per 224 px image at an assumed achieved fraction of each GPU's peak.

The JSON report goes to ``<results>/ray_engine.json`` and a Markdown summary is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from _common import cpu_seconds, evenly_spaced, write_results

from furnitype.engines.ray import _quiet_ray_data

GFLOP_PER_IMAGE = 2 * 15.5  # VGG16 conv base at 224 px: 15.5 GMAC
#: name: (peak TFLOPS at the precision TensorFlow uses for float32 convolutions there, that precision)
GPUS = {
    "T4": (8.1, "fp32"),
    "A10G": (31.2, "fp32 (TF32 tensor cores: up to 62.5)"),
    "A100": (156.0, "TF32 tensor cores"),
    "H100 SXM": (495.0, "TF32 tensor cores"),
}
ACHIEVED = 0.4  # assumed share of the peak a batch-64 VGG16 forward pass reaches


def _descendants_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of each living descendant of ``root``, from ``/proc``."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[tuple[int, float]]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append((int(name), (int(fields[11]) + int(fields[12])) / tick))
    found, stack = {}, [root]
    while stack:
        for pid, cpu in children.get(stack.pop(), []):
            found[pid] = cpu
            stack.append(pid)
    return found


class RayProcessesCpu:
    """CPU seconds of this process's descendants (Ray's), sampled every 0.2 s: one that exits keeps its last
    sample (Ray does not reap its workers into our accounting, so ``RUSAGE_CHILDREN`` misses them)."""

    def __init__(self):
        self.seen: dict[int, float] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.total()
            time.sleep(0.2)

    def total(self) -> float:
        with self.lock:
            for pid, cpu in _descendants_cpu(os.getpid()).items():
                self.seen[pid] = max(cpu, self.seen.get(pid, 0.0))
            return sum(self.seen.values())


def _write_manifest(files, path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows((f.path, f.label) for f in files)
    return path


def _timed_worker_class():
    from furnitype.engines.ray import _Worker  # the engine's own worker, not a copy

    class TimedWorker(_Worker):
        """The engine's worker, timing its start, each call and the network inside it."""

        def __init__(self, spec, threads, cpus):
            wall, cpu = time.perf_counter(), time.process_time()
            super().__init__(spec, threads, cpus)
            self.start = (time.perf_counter() - wall, time.process_time() - cpu)
            network = self.infer
            self.network = [0.0, 0.0]

            def infer(batch):
                wall, cpu = time.perf_counter(), time.process_time()
                out = network(batch)
                self.network[0] += time.perf_counter() - wall
                self.network[1] += time.process_time() - cpu
                return out

            self.infer = infer

        def __call__(self, batch):
            import tensorflow as tf

            self.network = [0.0, 0.0]
            wall, cpu = time.perf_counter(), time.process_time()
            out = super().__call__(batch)
            n = len(out["path"])
            timings = {
                "call_wall": time.perf_counter() - wall,
                "call_cpu": time.process_time() - cpu,
                "net_wall": self.network[0],
                "net_cpu": self.network[1],
                "start_wall": self.start[0],
                "start_cpu": self.start[1],
                "images": float(sum(1 for reason in out["reason"] if not reason)),
                "tf_threads": float(tf.config.threading.get_intra_op_parallelism_threads()),
            }
            out.update({key: np.full(n, value) for key, value in timings.items()})
            return out

    return TimedWorker


def per_batch_in_worker(ray, spec, paths: list[str], batch_size: int, cpus: int) -> dict:
    """One actor of the engine's worker class over ``paths``: its start and per-batch times (first batch out)."""
    blocks = -(-len(paths) // batch_size)
    dataset = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks).map_batches(
        _timed_worker_class(),
        fn_constructor_kwargs={"spec": spec, "threads": None, "cpus": cpus},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=cpus,
    )
    with _quiet_ray_data(ray):
        blocks = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    rows = [{k: float(block[k][0]) for k in ("call_wall", "call_cpu", "net_wall", "net_cpu", "images")}
            for block in blocks]
    steady = rows[1:] if len(rows) > 1 else rows
    images = sum(r["images"] for r in steady)

    def per_image(key: str) -> float:
        return 1000 * sum(r[key] for r in steady) / images

    return {
        "batches": len(rows),
        "batch_size": batch_size,
        "cpus": cpus,
        "tensorflow_threads": int(blocks[0]["tf_threads"][0]),
        "actor_start_wall_s": float(blocks[0]["start_wall"][0]),
        "actor_start_cpu_s": float(blocks[0]["start_cpu"][0]),
        "batch_wall_s_median": statistics.median(r["call_wall"] for r in steady),
        "network_wall_ms_per_image": per_image("net_wall"),
        "network_cpu_ms_per_image": per_image("net_cpu"),
        "read_decode_wall_ms_per_image": per_image("call_wall") - per_image("net_wall"),
        "read_decode_cpu_ms_per_image": per_image("call_cpu") - per_image("net_cpu"),
    }


def compare(a_path: Path, b_path: Path) -> dict:
    from furnitype.features import load

    a, b = load(a_path), load(b_path)
    same = (list(a.paths) == list(b.paths) and list(a.labels) == list(b.labels)
            and list(a.sha256) == list(b.sha256) and a.skipped == b.skipped)
    diff = np.abs(a.features - b.features) if same else np.array([np.inf])
    scale = np.maximum(np.abs(b.features), 1e-12) if same else np.array([1.0])
    return {"rows": len(a.paths), "same_rows": same, "max_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / scale).max()), "max_abs_value": float(np.abs(b.features).max())}


def projection(read_decode_cpu_ms: float, cpus_per_worker: int) -> list[dict]:
    decode_rate = 1000 * cpus_per_worker / read_decode_cpu_ms
    rows = []
    for name, (tflops, precision) in GPUS.items():
        network_rate = tflops * 1000 * ACHIEVED / GFLOP_PER_IMAGE
        rows.append({"gpu": name, "peak_tflops": tflops, "precision": precision,
                     "network_img_s": network_rate, "decode_img_s": decode_rate,
                     "worker_img_s": min(network_rate, decode_rate),
                     "bound": "network" if network_rate < decode_rate else "decoding"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="photos, one subfolder per class")
    parser.add_argument("--weights", required=True, help="VGG16 weights file (or none for random weights)")
    parser.add_argument("--limit", type=int, default=240, help="an evenly spaced sample of N photos (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ray", default="2x1,1x2", help="Ray configurations WORKERSxCPUS_PER_WORKER, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of local and each Ray configuration, interleaved")
    parser.add_argument("--batch-photos", type=int, default=96, help="photos of the per-batch timing")
    parser.add_argument("--cpus-per-gpu-worker", type=int, default=8, help="decoding CPUs of a projected worker")
    parser.add_argument("--results", default="benchmarks/results/ray", help="folder of the stores and the JSON report")
    args = parser.parse_args()

    from furnitype.extract.images import list_images
    from furnitype.extract.pipeline import ExtractSpec
    from furnitype.extraction import extract

    results = Path(args.results)
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    files = evenly_spaced(list_images([args.folder]).files, args.limit)
    manifest = _write_manifest(files, results / "sample.csv")
    common = {"backbone": "vgg16", "weights": args.weights, "batch_size": args.batch_size, "progress": False,
              "manifest": manifest}
    report: dict = {"photos": len(files), "batch_size": args.batch_size, "cpu_count": os.cpu_count(), "runs": []}

    ray_cpu = RayProcessesCpu()

    def run(name: str, round_: int, **options) -> None:
        out = results / f"{name}-{round_}.h5"
        wall, cpu, tree = time.perf_counter(), cpu_seconds(), ray_cpu.total()
        result = extract([], **common, out=out, **options)
        wall, cpu, tree = time.perf_counter() - wall, cpu_seconds() - cpu, ray_cpu.total() - tree
        report["runs"].append({"run": name, "round": round_, "wall_s": wall, "driver_cpu_s": cpu,
                               "ray_processes_cpu_s": tree, "img_s": result.extracted / wall,
                               "cpu_ms_per_image": 1000 * (cpu + tree) / result.extracted,
                               "extracted": result.extracted, "skipped": result.skipped, "store": str(out)})
        print(json.dumps(report["runs"][-1]), file=sys.stderr)

    import ray

    run("local", 0)  # the network's first build in this process, outside the rounds
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    report["ray_init_s"] = time.perf_counter() - started
    idle = ray_cpu.total()
    time.sleep(10)
    report["ray_idle_cpu_s_per_10s"] = ray_cpu.total() - idle
    configs = [tuple(int(n) for n in c.split("x")) for c in args.ray.split(",")]
    for round_ in range(1, args.rounds + 1):
        run("local", round_)
        for workers, cpus in configs:
            run(f"ray {workers}x{cpus}", round_, engine="ray", ray_workers=workers, cpus_per_worker=cpus)
    spec = ExtractSpec("vgg16", str(Path(args.weights).resolve()))
    paths = [f.path for f in files[: args.batch_photos]]
    report["worker"] = per_batch_in_worker(ray, spec, paths, args.batch_size, cpus=2)
    ray.shutdown()

    reference = Path(report["runs"][0]["store"])
    report["rows"] = {r["store"]: compare(Path(r["store"]), reference) for r in report["runs"][1:]}
    report["gpu_projection"] = {"assumed_achieved_share_of_peak": ACHIEVED,
                                "cpus_per_worker": args.cpus_per_gpu_worker,
                                "rows": projection(report["worker"]["read_decode_cpu_ms_per_image"],
                                                   args.cpus_per_gpu_worker)}
    write_results(results / "ray_engine.json", report)
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"{report['photos']} photos, VGG16 224 px, batch {report['batch_size']}, "
             f"{report['cpu_count']} cores shared with other work", "",
             "| run | round | wall s | img/s | CPU ms/img (all processes) | CPU s in Ray's processes |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["runs"]:
        lines.append(f"| {r['run']} | {r['round']} | {r['wall_s']:.1f} | {r['img_s']:.2f} | "
                     f"{r['cpu_ms_per_image']:.0f} | {r['ray_processes_cpu_s']:.1f} |")
    lines += ["", f"ray.init: {report['ray_init_s']:.1f} s; idle Ray: {report['ray_idle_cpu_s_per_10s']:.2f} CPU s "
              "per 10 s", ""]
    for name, r in report["rows"].items():
        lines.append(f"{Path(name).stem} vs local-0: {r['rows']} rows, same rows/skips: {r['same_rows']}, max |diff| "
                     f"{r['max_abs_diff']:.3g} (largest |value| {r['max_abs_value']:.3g}), max relative "
                     f"{r['max_rel_diff']:.3g}")
    w = report["worker"]
    lines += ["", f"inside one Ray worker ({w['cpus']} CPUs, TensorFlow threads {w['tensorflow_threads']}; "
              f"{w['batches']} batches of {w['batch_size']}, first left out): actor start "
              f"{w['actor_start_wall_s']:.1f} s wall / {w['actor_start_cpu_s']:.1f} s CPU; batch "
              f"{w['batch_wall_s_median']:.2f} s wall (median); network {w['network_wall_ms_per_image']:.0f} ms wall, "
              f"{w['network_cpu_ms_per_image']:.0f} ms CPU per image; read+hash+decode "
              f"{w['read_decode_wall_ms_per_image']:.1f} ms wall, {w['read_decode_cpu_ms_per_image']:.1f} ms CPU "
              "per image", "",
              f"| GPU | peak TFLOPS | network img/s at {ACHIEVED:.0%} | decoding img/s "
              f"({report['gpu_projection']['cpus_per_worker']} CPUs) | worker img/s | bound by |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in report["gpu_projection"]["rows"]:
        lines.append(f"| {r['gpu']} | {r['peak_tflops']:g} ({r['precision']}) | {r['network_img_s']:.0f} | "
                     f"{r['decode_img_s']:.0f} | {r['worker_img_s']:.0f} | {r['bound']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
