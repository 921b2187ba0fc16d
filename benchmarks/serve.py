"""``furnitype serve`` under load: latency, throughput against offline ``extract``, "more like this", a soak.

Run by hand, once per precision (a run trained on a store of that precision, the store as the catalogue)::

    .venv/bin/python benchmarks/serve.py PHOTOS/ --run RUN --catalogue STORE.h5 --weights vgg16_notop.weights.h5 \\
        [--clients 1,8,32] [--pairs 3] [--soak-minutes 10] [--server-args "--max-wait-ms 0"] [--out results.json]
    .venv/bin/python benchmarks/serve.py --table RESULTS.json...     # the tables of saved results, as Markdown

The server is ``furnitype serve RUN --catalogue STORE --weights W --port 0`` in a child process, on loopback; the
load is an asyncio httpx generator in this process (one connection per client, each client sends its next request
when the last is answered). Every upload is one real photo of PHOTOS with a few bytes appended after its end
(decoders ignore them), so that no two uploads share a sha256: an uploaded photo the catalogue holds would be
answered from its stored row, without the network.

- **start to ready**: wall and CPU seconds from starting the server to its ``ready on`` line (CPU from
  ``/proc/PID/stat``); next to it, in a fresh worker process, ``import tensorflow`` and the network build (an
  ``extract`` of one photo with the store's settings: the build and one photo through it).
- **latency** at each ``--clients`` level: ``POST /v1/predict`` (one photo) and ``POST /v1/similar`` (one photo,
  ``k=10``), ``--requests`` per client (at least ``--min-requests``) after a warm-up round of two per client
  (batch sizes not seen before are traced then); p50/p95/p99 of the client's wall time per request, photos/s
  over the phase, the server's CPU per photo, and the medians of the server's own ``total_ms``, ``decode_ms``
  and ``network_ms`` (its timings). Goal at one client: p50 <= 1.3 x (decode + network).
- **serve vs extract, interleaved**: ``--pairs`` pairs of (``/v1/predict`` at the largest client count over a slice
  of ``--slice-images`` photos; ``extract()`` of the same photos into a new store in a worker process whose network
  is already built, with the catalogue's settings, ``like=STORE``). Only one of the two runs at a time. photos/s
  of each and their ratio (median over pairs; goal >= 0.9), CPU ms per photo of each.
- **more like this**: ``POST /v1/similar {"sha256": ...}`` of ``--similar-queries`` catalogue rows, one at a time
  (p50 goal <= 5 ms), with httpx, then again with ``http.client`` (a lighter client).
- **soak** (``--soak-minutes``): ``/v1/predict`` at the largest client count for that long; failed requests
  (not 200, 503s counted apart) and the server's ``VmRSS`` every 5 s; growth from minute 2 to the end.

CPU figures are the ones that compare on a shared machine; wall figures (latency, photos/s) hold only against
each other within one sitting, as the pairs are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import cpu_seconds, measure, write_results

TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Server:
    """``furnitype serve`` in a child process, started and waited for until its ``ready on`` line."""

    def __init__(self, args):
        cmd = [sys.executable, "-m", "furnitype.cli", "serve", args.run, "--catalogue", args.catalogue,
               "--weights", args.weights, "--port", "0", "--quiet", *args.server_args.split()]
        self.command = " ".join(cmd[1:])
        self.lines: list[str] = []
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"ready on (http://\S+)", line)
            if found:
                self.url = found[1]
                break
        else:
            raise SystemExit(f"the server ended before it was ready:\n{''.join(self.lines)}")
        self.ready_wall = time.perf_counter() - started
        self.ready_cpu = proc_cpu(self.proc.pid)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def rss(self) -> float:
        return proc_rss_mib(self.proc.pid)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=120)


class Worker:
    """A process that runs ``extract()`` on the folders it is sent, its network built once (``--offline-worker``)."""

    def __init__(self, args, warm_folder: Path):
        cmd = [sys.executable, __file__, "--offline-worker", args.catalogue, args.weights, str(warm_folder)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.started = self._answer()

    def extract(self, folder: Path, out: Path) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{folder}\t{out}\n")
        self.proc.stdin.flush()
        return self._answer()

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the extract worker ended (exit {self.proc.wait()})")
        return json.loads(line)

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def offline_worker(store: str, weights: str, warm: str) -> None:
    """The worker's side: times ``import tensorflow`` and the first extract, then extracts each folder sent."""
    with measure() as imported:
        import tensorflow  # noqa: F401

    from furnitype.extraction import extract

    with measure() as built:
        extract([warm], like=store, weights=weights, out=Path(warm).with_suffix(".h5"), progress=False)
    print(json.dumps({"tf_import_wall": imported.wall, "tf_import_cpu": imported.cpu,
                      "build_wall": built.wall, "build_cpu": built.cpu}), flush=True)
    for line in sys.stdin:
        folder, out = line.rstrip("\n").split("\t")
        with measure() as took:
            result = extract([folder], like=store, weights=weights, out=out, progress=False)
        print(json.dumps({"photos": result.extracted, "wall": took.wall, "cpu": took.cpu}), flush=True)


class Photos:
    """The photos' bytes, handed out in turn, each time with a new tail (so a new sha256)."""

    def __init__(self, files: list[str]):
        self.files = files
        self.data = [Path(f).read_bytes() for f in files]
        self.sent = 0

    def next(self, index: int | None = None) -> tuple[str, bytes]:
        self.sent += 1
        i = self.sent % len(self.files) if index is None else index
        return Path(self.files[i]).name, self.data[i] + f"furnitype-bench-{self.sent}".encode()


async def load(server: Server, photos: Photos, *, endpoint: str, clients: int, requests: int,
               indices: list[int] | None = None, until: float | None = None, json_bodies: list[dict] | None = None,
               on_tick=None) -> dict:
    """``requests`` requests (or until ``until``, a ``time.monotonic()``) from ``clients`` concurrent clients."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    decode_ms: list[float] = []
    network_ms: list[float] = []
    server_ms: list[float] = []
    counter = iter(range(10**9 if until is not None else requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:

        async def one_client() -> None:
            for i in counter:
                if until is not None and time.monotonic() > until:
                    return
                if json_bodies is not None:
                    request = {"json": json_bodies[i % len(json_bodies)]}
                else:
                    name, data = photos.next(None if indices is None else indices[i % len(indices)])
                    request = {"files": {"photo": (name, data, "image/jpeg")}}
                started = time.perf_counter()
                response = await client.post(endpoint, **request)
                latency = time.perf_counter() - started
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code != 200:
                    continue
                latencies.append(latency)
                body = response.json()
                timings = body["predictions"][0]["timings"] if "predictions" in body else body["timings"]
                decode_ms.append(timings["decode_ms"])
                network_ms.append(timings["network_ms"])
                server_ms.append(timings["total_ms"])

        async def ticking() -> None:
            while on_tick is not None and until is not None and time.monotonic() < until:
                on_tick()
                await asyncio.sleep(5)

        cpu, client_cpu, wall = server.cpu(), cpu_seconds(), time.perf_counter()
        ticker = asyncio.ensure_future(ticking())
        await asyncio.gather(*(one_client() for _ in range(clients)))
        ticker.cancel()
        wall, cpu, client_cpu = time.perf_counter() - wall, server.cpu() - cpu, cpu_seconds() - client_cpu
    done = len(latencies)
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "endpoint": endpoint, "clients": clients, "requests": sum(statuses.values()), "ok": done,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)), "photos_per_s": done / wall if json_bodies is None else None,
        "queries_per_s": done / wall, "wall_s": wall,
        "server_cpu_ms_per_request": 1000 * cpu / max(done, 1),
        "client_cpu_ms_per_request": 1000 * client_cpu / max(done, 1),
        "server_decode_ms_p50": float(np.median(decode_ms)) if decode_ms else None,
        "server_network_ms_p50": float(np.median(network_ms)) if network_ms else None,
        "server_total_ms_p50": float(np.median(server_ms)) if server_ms else None,
    }


def plain_queries(server: Server, queries: list[dict]) -> dict:
    """The same JSON queries one at a time over one kept-alive ``http.client`` connection (a lighter client than
    httpx's: what is left is the server's and the network stack's time)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(server.url)
    connection = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=60)
    latencies = []
    for query in queries:
        body = json.dumps(query).encode()
        started = time.perf_counter()
        connection.request("POST", "/v1/similar", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        latencies.append(1000 * (time.perf_counter() - started))
        assert response.status == 200, response.status
    connection.close()
    return {"requests": len(latencies), "p50_ms": float(np.percentile(latencies, 50)),
            "p95_ms": float(np.percentile(latencies, 95)), "p99_ms": float(np.percentile(latencies, 99))}


def link_folder(files: list[str], folder: Path) -> Path:
    """A folder of symbolic links to ``files`` (unlabelled: ``extract`` lists them as they are)."""
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        (folder / f"{i:05d}{Path(f).suffix}").symlink_to(f)
    return folder


def benchmark(args) -> dict:
    from furnitype.extract.images import list_images
    from furnitype.features.store import load as load_store

    files = [f.path for f in list_images([args.photos]).files]
    photos = Photos(files)
    catalogue = load_store(args.catalogue)
    precision = catalogue.meta.get("precision")
    report: dict = {"precision": precision, "catalogue_rows": len(catalogue.sha256), "photos": len(files),
                    "cpu": _cpu_flags()}
    tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")

    print(f"[{precision}] starting the server", file=sys.stderr, flush=True)
    server = Server(args)
    report["command"] = server.command
    report["ready"] = {"wall_s": server.ready_wall, "cpu_s": server.ready_cpu, "rss_mib": server.rss()}
    worker = Worker(args, link_folder(files[:1], Path(tmp.name, "warm")))
    report["tf_import_and_build"] = worker.started
    try:
        levels = []
        for clients in args.clients:
            for endpoint in ("/v1/predict", "/v1/similar"):
                asyncio.run(load(server, photos, endpoint=endpoint, clients=clients, requests=2 * clients))
                measured = asyncio.run(load(server, photos, endpoint=endpoint, clients=clients,
                                            requests=max(args.min_requests, args.requests * clients)))
                levels.append(measured)
                print(f"[{precision}] {endpoint} x{clients}: p50 {measured['p50_ms']:.1f} ms, "
                      f"{measured['queries_per_s']:.2f}/s", file=sys.stderr, flush=True)
        report["levels"] = levels

        most = max(args.clients)
        pairs = []
        for i in range(args.pairs):
            chosen = list(range(i, len(files), args.pairs))[: args.slice_images]
            served = asyncio.run(load(server, photos, endpoint="/v1/predict", clients=most, requests=len(chosen),
                                      indices=chosen))
            extracted = worker.extract(link_folder([files[j] for j in chosen], Path(tmp.name, f"slice{i}")),
                                       Path(tmp.name, f"slice{i}.h5"))
            assert extracted["photos"] == len(chosen), extracted
            pairs.append({"photos": len(chosen), "serve_photos_per_s": served["photos_per_s"],
                          "extract_photos_per_s": len(chosen) / extracted["wall"],
                          "serve_server_cpu_ms": served["server_cpu_ms_per_request"],
                          "serve_client_cpu_ms": served["client_cpu_ms_per_request"],
                          "extract_cpu_ms": 1000 * extracted["cpu"] / len(chosen),
                          "failed": served["requests"] - served["ok"]})
            pairs[-1]["ratio"] = pairs[-1]["serve_photos_per_s"] / pairs[-1]["extract_photos_per_s"]
            print(f"[{precision}] pair {i}: serve/extract {pairs[-1]['ratio']:.3f}", file=sys.stderr, flush=True)
        report["interleaved"] = {"clients": most, "pairs": pairs,
                                 "median_ratio": float(np.median([p["ratio"] for p in pairs]))}

        rng = np.random.default_rng(0)
        queries = [{"sha256": str(s), "k": 10}
                   for s in rng.choice(catalogue.sha256, size=min(args.similar_queries, len(catalogue.sha256)),
                                       replace=False)]
        asyncio.run(load(server, photos, endpoint="/v1/similar", clients=1, requests=10, json_bodies=queries))
        report["more_like_this"] = asyncio.run(load(server, photos, endpoint="/v1/similar", clients=1,
                                                    requests=len(queries), json_bodies=queries))
        report["more_like_this_plain"] = plain_queries(server, queries)

        if args.soak_minutes:
            report["soak"] = soak(server, photos, most, args.soak_minutes)
    finally:
        worker.stop()
        report["server_exit"] = server.stop()
        tmp.cleanup()
    return report


def soak(server: Server, photos: Photos, clients: int, minutes: float) -> dict:
    started = time.monotonic()
    samples: list[tuple[float, float]] = []

    def tick() -> None:
        samples.append((time.monotonic() - started, server.rss()))

    print(f"soak: {minutes:g} minutes at {clients} clients", file=sys.stderr, flush=True)
    result = asyncio.run(load(server, photos, endpoint="/v1/predict", clients=clients, requests=0,
                              until=started + 60 * minutes, on_tick=tick))
    tick()
    from_minute_2 = [rss for t, rss in samples if t >= 120] or [samples[-1][1]]
    result["rss_mib"] = samples
    result["rss_growth_from_minute_2"] = (samples[-1][1] - from_minute_2[0]) / from_minute_2[0]
    result["failed"] = sum(v for k, v in result["statuses"].items() if k not in ("200", "503"))
    return result


def _cpu_flags() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    wanted = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
    return f"{os.cpu_count()} CPUs; " + " ".join(f for f in wanted if f in flags)


def table(report: dict) -> str:
    """The results as Markdown."""
    p = report["precision"]
    lines = [
        f"**{p}** ({report['cpu']}; catalogue {report['catalogue_rows']:,} rows). Start to ready "
        f"{report['ready']['wall_s']:.1f} s wall, {report['ready']['cpu_s']:.1f} s CPU "
        f"(RSS {report['ready']['rss_mib']:.0f} MiB); TensorFlow import "
        f"{report['tf_import_and_build']['tf_import_wall']:.1f} s wall / "
        f"{report['tf_import_and_build']['tf_import_cpu']:.1f} s CPU + network build and one photo "
        f"{report['tf_import_and_build']['build_wall']:.1f} s / {report['tf_import_and_build']['build_cpu']:.1f} s.",
        "",
        "| clients | endpoint | requests (failed) | p50 ms | p95 ms | p99 ms | photos/s | server CPU ms/photo "
        "| in the server: total (decode + network) ms, p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["levels"]:
        lines.append(
            f"| {r['clients']} | {r['endpoint']} (upload) | {r['requests']} ({r['requests'] - r['ok']}) | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['photos_per_s']:.2f} | "
            f"{r['server_cpu_ms_per_request']:.0f} | {r['server_total_ms_p50']:.0f} ({r['server_decode_ms_p50']:.0f} + "
            f"{r['server_network_ms_p50']:.0f}) |"
        )
    m = report["more_like_this"]
    lines.append(f"| 1 | /v1/similar by sha256 | {m['requests']} ({m['requests'] - m['ok']}) | {m['p50_ms']:.1f} | "
                 f"{m['p95_ms']:.1f} | {m['p99_ms']:.1f} | {m['queries_per_s']:.0f} q/s | "
                 f"{m['server_cpu_ms_per_request']:.1f} | {m['server_total_ms_p50']:.2f} |")
    if "more_like_this_plain" in report:
        m = report["more_like_this_plain"]
        lines.append(f"| 1 | /v1/similar by sha256, http.client | {m['requests']} (0) | {m['p50_ms']:.1f} | "
                     f"{m['p95_ms']:.1f} | {m['p99_ms']:.1f} | | | |")
    inter = report["interleaved"]
    lines += ["", f"Interleaved at {inter['clients']} clients: " + "; ".join(
        f"serve {q['serve_photos_per_s']:.2f} vs extract {q['extract_photos_per_s']:.2f} photos/s "
        f"({q['ratio']:.2f}x; CPU ms/photo {q['serve_server_cpu_ms']:.0f} server + "
        f"{q['serve_client_cpu_ms']:.0f} client vs {q['extract_cpu_ms']:.0f})" for q in inter["pairs"])
        + f"; median ratio **{inter['median_ratio']:.2f}**."]
    if "soak" in report:
        s = report["soak"]
        lines += ["", f"Soak {s['wall_s'] / 60:.1f} min at {s['clients']} clients: {s['requests']} requests, "
                      f"{s['failed']} failed, {s['statuses'].get('503', 0)} answered 503; p50 {s['p50_ms']:.0f} ms, "
                      f"p99 {s['p99_ms']:.0f} ms, {s['photos_per_s']:.2f} photos/s; RSS "
                      f"{s['rss_mib'][0][1]:.0f} -> {s['rss_mib'][-1][1]:.0f} MiB, growth from minute 2 "
                      f"{100 * s['rss_growth_from_minute_2']:+.1f} %."]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--offline-worker":
        offline_worker(*sys.argv[2:5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        print("\n\n".join(table(json.loads(Path(p).read_text())) for p in sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", help="folder of photos sent as uploads (and extracted offline)")
    parser.add_argument("--run", required=True)
    parser.add_argument("--catalogue", required=True, help="the feature store served (its precision is measured)")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--clients", default="1,8,32", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--requests", type=int, default=12, help="measured requests per client at each level")
    parser.add_argument("--min-requests", type=int, default=40, help="and at least this many per level")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved serve/extract pairs")
    parser.add_argument("--slice-images", type=int, default=96, help="photos per interleaved slice")
    parser.add_argument("--similar-queries", type=int, default=200, help='"more like this" queries')
    parser.add_argument("--soak-minutes", type=float, default=0)
    parser.add_argument("--server-args", default="", help='more options for the server ("--max-wait-ms 0")')
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    report = benchmark(args)
    if args.out:
        write_results(args.out, report)
    print(table(report))


if __name__ == "__main__":
    main()
