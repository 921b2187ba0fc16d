"""``furnitype serve``: a real server process on an ephemeral loopback port, a real HTTP client (httpx).

One module-wide world (a tiny VGG16 at 32 px with random weights saved to a file, 12 photos extracted into the
catalogue, a logistic-regression run, a queue of 6 new photos) and as few server processes as possible: the main
one answers every endpoint and bad input, follows its catalogue while an ``extract`` adds to it, and ends with
SIGTERM; a second one, with a token and a queue of 4 photos, is held at its network pass to batch the photos of
two requests and fill the queue, and stopped with Ctrl-C while requests are in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from furnitype.errors import InputError
from furnitype.extraction import extract
from furnitype.features import load
from furnitype.keras_loader import import_keras
from furnitype.predict import predict
from furnitype.serve.app import _uploads
from furnitype.serve.batcher import Batcher
from furnitype.similar import similar
from furnitype.training import classify
from tests.images import COLOURS, make_photo_folder, photo
from tests.servers import STARTING, Server, start_server
from tests.test_docs import blocks

SETTINGS = {"backbone": "vgg16", "image_size": 32, "batch_size": 8, "progress": False}
CLASSES = ("bed", "chair", "sofa")
#: A guard only: every wait below waits for an event (a response, a file, a line, an exit).
GUARD_S = 120


def _new_photos(root: Path, first_seed: int, per_class: int = 2) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(first_seed + 10 * c + i, COLOURS[name], (56, 44)).save(root / name / f"new_{i}.jpg", quality=85)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A weights file, the catalogue (12 photos), a logreg run on it, a queue of 6 new photos, upload files."""
    base = tmp_path_factory.mktemp("serve")
    keras = import_keras()
    keras.utils.set_random_seed(7)
    weights = base / "vgg16.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    photos = make_photo_folder(base / "photos", per_class=4, classes=CLASSES)
    catalogue = base / "catalogue.h5"
    extract([photos], weights=str(weights), out=catalogue, **SETTINGS)
    shutil.copy(catalogue, base / "catalogue-kept.h5")  # the main server's catalogue changes under it
    run = base / "run"
    classify([catalogue], models=["logreg"], cv=3, out=run)
    queue_photos = _new_photos(base / "queue", 2000)
    queue = base / "queue.h5"
    extract([queue_photos], weights=str(weights), out=queue, **SETTINGS)
    uploads = _new_photos(base / "uploads", 1000)
    return {"base": base, "weights": weights, "photos": photos, "catalogue": catalogue, "run": run, "queue": queue,
            "queue_photos": queue_photos, "uploads": uploads, "labels": base / "labels.csv"}


@pytest.fixture(scope="module")
def server(world):
    """The main server: catalogue, queue, labels, small caps (1 MB bodies, 1 Mpx photos, 5 s for a body)."""
    started = start_server(world["run"], "--catalogue", world["catalogue"], "--queue", world["queue"], "--labels",
                           world["labels"], "--max-upload-mb", "1", "--max-pixels", "1000000", "--body-timeout-s", "5",
                           timeout=600)
    yield started
    if started.process.poll() is None:
        started.process.kill()
        started.process.wait()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=GUARD_S) as http:
        yield http


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(*paths: Path) -> list:
    return [("photo", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def _one_line_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and body["error"] and "\n" not in body["error"], body
    return body["error"]


# -- the endpoints ---------------------------------------------------------------------------------------------


def test_health_info_schema_and_page(server, client, world):
    assert client.get("/v1/health").json() == {"status": "ok"}
    info = client.get("/v1/info").json()
    assert info["classes"] == list(CLASSES) and info["model"] == "logreg" and info["features"] == "catalogue"
    assert info["catalogue"] == {"rows": 12, "path": "catalogue.h5"} and info["queue"] == {"rows": 6}
    assert info["labels"] == {"count": 0} and info["top_k"] == 3
    assert info["settings"]["backbone"] == "vgg16" and info["settings"]["image_size"] == 32
    assert str(world["base"]) not in json.dumps(info)  # names only, no paths of the machine
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.") and {"/v1/predict", "/v1/similar", "/v1/labels"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "no such endpoint" in _one_line_error(client.get("/v1/nothing"), 404)
    for name in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):  # DNS rebinding
        assert "this server answers to" in _one_line_error(client.get("/v1/info", headers={"Host": name}), 400)
    _one_line_error(client.get("/v1/predict"), 405)
    assert not [line for line in server.lines if "Traceback" in line]


def test_predict_equals_furnitype_predict(client, world):
    files = sorted(world["uploads"].rglob("*.jpg"))[:4]
    response = client.post("/v1/predict", files=_files(*files), params={"top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predict(world["run"], files, top_k=3)
    assert body["model"] == expected.model and body["features"] == expected.features
    assert len(body["predictions"]) == len(files)
    for got, want, file in zip(body["predictions"], expected.predictions, files, strict=True):
        assert got["filename"] == file.name and got["sha256"] == want.sha256 == _sha(file)
        assert got["label"] == want.label and len(got["top_k"]) == 2
        np.testing.assert_allclose([t["probability"] for t in got["top_k"]], [p for _, p in want.top[:2]], atol=1e-6)
        assert [t["label"] for t in got["top_k"]] == [label for label, _ in want.top[:2]]
        assert set(got["timings"]) == {"decode_ms", "network_ms", "total_ms", "batch"}
        assert got["timings"]["batch"] == len(files)  # the photos of a request share a network pass


def test_similar_equals_furnitype_similar(client, world):
    query = sorted(world["uploads"].rglob("*.jpg"))[0]
    response = client.post("/v1/similar", files=_files(query), params={"k": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    want = similar(world["catalogue"], [query], k=4)[0]
    assert body["query"] == {"sha256": _sha(query), "in_catalogue": False, "label": None}
    assert [n["sha256"] for n in body["neighbours"]] == [n.sha256 for n in want.neighbours]
    np.testing.assert_allclose([n["distance"] for n in body["neighbours"]], [n.distance for n in want.neighbours],
                               atol=1e-6)
    for n in body["neighbours"]:
        assert n["score"] == pytest.approx(1 - n["distance"], abs=1e-6) and n["label"] in CLASSES

    stored = sorted(world["photos"].rglob("*.jpg"))[5]
    by_sha = client.post("/v1/similar", json={"sha256": _sha(stored), "k": 3}).json()
    want = similar(world["catalogue"], [stored], k=3, exclude_self=True)[0]
    assert by_sha["query"] == {"sha256": _sha(stored), "in_catalogue": True, "label": stored.parent.name}
    assert [n["sha256"] for n in by_sha["neighbours"]] == [n.sha256 for n in want.neighbours]
    assert _sha(stored) not in [n["sha256"] for n in by_sha["neighbours"]]

    cut = want.neighbours[1].distance
    near = client.post("/v1/similar", json={"sha256": _sha(stored)}, params={"k": 3, "max_distance": cut}).json()
    assert [n["sha256"] for n in near["neighbours"]] == [n.sha256 for n in want.neighbours if n.distance <= cut]

    upload_of_stored = client.post("/v1/similar", files=_files(stored), params={"k": 2}).json()
    assert upload_of_stored["query"]["in_catalogue"] is True  # as furnitype similar: its row, itself first
    assert upload_of_stored["neighbours"][0] == {"sha256": _sha(stored), "label": stored.parent.name,
                                                 "distance": 0.0, "score": 1.0}


def test_thumbnails_only_of_rows_whose_file_still_has_their_content(client, world, tmp_path):
    stored = sorted(world["photos"].rglob("*.jpg"))[0]
    response = client.get(f"/v1/photos/{_sha(stored)}", params={"size": 32})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(response.content)).size) <= 32
    queued = sorted(world["queue_photos"].rglob("*.jpg"))[0]
    assert client.get(f"/v1/photos/{_sha(queued)}").status_code == 200

    _one_line_error(client.get(f"/v1/photos/{'0' * 64}"), 404)
    _one_line_error(client.get("/v1/photos/..%2F..%2Fetc%2Fpasswd"), 404)
    _one_line_error(client.get(f"/v1/photos/{_sha(stored)}", params={"size": 5000}), 400)
    sha, kept = _sha(queued), tmp_path / "kept.jpg"
    shutil.copy(queued, kept)
    try:
        photo(99, COLOURS["bed"]).save(queued)  # another content under the recorded path
        assert "gone or changed" in _one_line_error(client.get(f"/v1/photos/{sha}"), 404)
        queued.unlink()
        os.mkfifo(queued)  # a reader would wait forever: never opened as a photo
        _one_line_error(client.get(f"/v1/photos/{sha}"), 404)
        queued.unlink()
        os.mkfifo(tmp_path / "fifo")
        queued.symlink_to(tmp_path / "fifo")  # nor through a link
        _one_line_error(client.get(f"/v1/photos/{sha}"), 404)
        queued.unlink()
        queued.symlink_to("/etc/passwd")  # another file's content is never sent
        _one_line_error(client.get(f"/v1/photos/{sha}"), 404)
        queued.unlink()
        queued.symlink_to(kept)  # extract follows links to photos: a link to the same content still serves
        assert client.get(f"/v1/photos/{sha}").headers["content-type"] == "image/jpeg"
    finally:
        queued.unlink()
        shutil.copy(kept, queued)


def test_suggest_and_labels(client, world):
    suggested = client.get("/v1/suggest", params={"n": 3}).json()
    assert suggested["classes"] == list(CLASSES) and len(suggested["photos"]) == 3
    queue_shas = {_sha(p): p for p in world["queue_photos"].rglob("*.jpg")}
    first = suggested["photos"][0]
    assert first["sha256"] in queue_shas and first["predicted"] in CLASSES
    assert first["score"] == pytest.approx(1 - first["probability"], abs=1e-6)

    saved = client.post("/v1/labels", json={"sha256": first["sha256"], "label": "sofa"},
                        headers={"Origin": client.base_url.scheme + "://" + client.base_url.netloc.decode()})
    assert saved.status_code == 201 and saved.json() == {"sha256": first["sha256"], "label": "sofa", "count": 1}
    rows = world["labels"].read_text().splitlines()
    assert rows[0] == "path,label" and rows[1:] == [f"{queue_shas[first['sha256']]},sofa"]
    after = client.get("/v1/suggest", params={"n": 10}).json()
    assert first["sha256"] not in [p["sha256"] for p in after["photos"]] and len(after["photos"]) == 5
    assert client.get("/v1/info").json()["labels"] == {"count": 1}

    other = suggested["photos"][1]["sha256"]
    assert "one of bed, chair, sofa" in _one_line_error(client.post("/v1/labels", json={"sha256": other,
                                                                                        "label": "lamp"}), 400)
    stored = _sha(sorted(world["photos"].rglob("*.jpg"))[0])  # a catalogue photo is not one to label
    _one_line_error(client.post("/v1/labels", json={"sha256": stored, "label": "bed"}), 400)
    for origin in ("http://evil.example", "null", client.base_url.scheme + "://evil.example"):  # "null": a sandbox
        _one_line_error(client.post("/v1/labels", json={"sha256": other, "label": "bed"},
                                    headers={"Origin": origin}), 403)
    _one_line_error(client.post("/v1/labels", data={"sha256": other, "label": "bed"},  # a form another site posts
                                headers={"Origin": "http://evil.example"}), 403)
    _one_line_error(client.post("/v1/labels", data={"sha256": other, "label": "bed"}), 415)
    _one_line_error(client.post("/v1/labels", content=b"sha256=x", headers={"Content-Type": "text/plain"}), 415)
    _one_line_error(client.post("/v1/labels", content=b"{not json", headers={"Content-Type": "application/json"}),
                    400)
    _one_line_error(client.get("/v1/suggest", params={"n": "ten"}), 400)
    assert len(world["labels"].read_text().splitlines()) == 2  # refused labels wrote nothing


def _bomb() -> bytes:
    """A PNG of 200 million black pixels in a few kilobytes (Pillow refuses it as a decompression bomb)."""
    out = io.BytesIO()
    Image.new("1", (20_000, 10_000)).save(out, "PNG")
    return out.getvalue()


def _bad_requests(world) -> list[tuple[str, dict, int]]:
    good = sorted(world["uploads"].rglob("*.jpg"))[0].read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (1200, 1000)).save(big, "JPEG")
    multipart = {"Content-Type": "multipart/form-data; boundary=xyz"}
    return [
        ("not an image", {"files": {"photo": ("a.jpg", b"just some text", "image/jpeg")}}, 422),
        ("truncated", {"files": {"photo": ("a.jpg", good[: len(good) // 2], "image/jpeg")}}, 422),
        ("0 bytes", {"files": {"photo": ("a.jpg", b"", "image/jpeg")}}, 422),
        ("decompression bomb", {"files": {"photo": ("bomb.png", _bomb(), "image/png")}}, 422),
        ("over the pixel cap", {"files": {"photo": ("big.jpg", big.getvalue(), "image/jpeg")}}, 422),
        ("an HDF5 file", {"files": {"photo": ("a.jpg", world["catalogue"].read_bytes()[:4096], "image/jpeg")}}, 422),
        ("wrong content type", {"content": good, "headers": {"Content-Type": "image/jpeg"}}, 415),
        ("no content type", {"content": good}, 415),
        ("malformed multipart", {"content": b"--xyz\r\nContent-Disposition: form-da", "headers": multipart}, 400),
        ("no boundary", {"content": b"abc", "headers": {"Content-Type": "multipart/form-data"}}, 400),
        ("no photo field", {"files": {"image": ("a.jpg", good, "image/jpeg")}}, 400),
        ("a text field, no file", {"data": {"photo": "a.jpg"}, "files": {"other": ("a", b"x")}}, 400),
        ("bad top_k", {"files": {"photo": ("a.jpg", good)}, "params": {"top_k": "0"}}, 400),
        ("top_k not a number", {"files": {"photo": ("a.jpg", good)}, "params": {"top_k": "3; drop"}}, 400),
    ]


def test_bad_input_gets_one_line_and_the_server_goes_on(client, world):
    for name, request, status in _bad_requests(world):
        error = _one_line_error(client.post("/v1/predict", **request), status)
        assert error, name
        assert client.get("/v1/health").status_code == 200, name
    good = sorted(world["uploads"].rglob("*.jpg"))[0]
    sha_of_nothing = hashlib.sha256(b"").hexdigest()
    for body, params, status in [
        ({"sha256": sha_of_nothing}, {}, 404),  # unknown sha256
        ({"sha256": "../../etc/passwd"}, {}, 400),
        ({"sha256": _sha(good), "k": 0}, {}, 400),
        ({"sha256": _sha(good), "k": "many"}, {}, 400),
        ({"sha256": _sha(good)}, {"max_distance": "-1"}, 400),
        ({"sha256": _sha(good)}, {"max_distance": "nan"}, 400),
        ([1, 2], {}, 400),
    ]:
        _one_line_error(client.post("/v1/similar", json=body, params=params), status)
    _one_line_error(client.post("/v1/similar", files=_files(good, good)), 400)
    deep = b"[" * 50_000  # nested past Python's recursion limit: not JSON to us, not a crash
    assert "not JSON" in _one_line_error(client.post("/v1/similar", content=deep,
                                                     headers={"Content-Type": "application/json"}), 400)
    _one_line_error(client.post("/v1/similar", content=b"x", headers={"Content-Type": "text/plain"}), 415)
    assert client.post("/v1/predict", files=_files(good)).status_code == 200


def _raw(url: str, head: bytes, body: bytes, *, read: bool) -> bytes:
    """Send a request's head and part of its body on a socket; the response (``read``), or hang up at once."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=GUARD_S) as sock:
        sock.sendall(head + body)
        if not read:
            return b""
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_an_upload_over_the_cap_and_a_client_that_hangs_up(server, client):
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 209715200\r\n\r\n")
    response = _raw(server.url, head, b"--xyz\r\n" + b"\0" * 1000, read=True)  # says 200 MB, sends 1 kB
    status, _, rest = response.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413"), response[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2]) == {"error": "the request is larger than the limit of 1 MB"}

    cut = head.replace(b"209715200", b"500000")
    _raw(server.url, cut, b"--xyz\r\n" + b"\0" * 1000, read=False)  # under the cap, gone mid-upload
    assert client.get("/v1/health").status_code == 200
    _wait_for(lambda: client.get("/v1/info").json()["batching"]["admitted"] == 0, "its place in the queue freed")

    slow = _raw(server.url, cut, b"--xyz\r\n", read=True)  # the rest never comes: 408 once --body-timeout-s passed
    assert slow.startswith(b"HTTP/1.1 408") and b'"the request\'s body took longer than 5 s to arrive"' in slow
    good = client.post("/v1/predict", files={"photo": ("a.jpg", _any_photo())})
    assert good.status_code == 200


def test_a_request_head_that_does_not_arrive_whole_is_closed(server, client):
    """100 connections that send nothing, and one that sends part of its head (slowloris), are closed once
    uvicorn's keep-alive timeout (5 s) passes without a whole request head: none holds a socket for good, and
    the server answers others meanwhile."""
    address = urlsplit(server.url)
    silent = [socket.create_connection((address.hostname, address.port), timeout=GUARD_S) for _ in range(100)]
    slow = socket.create_connection((address.hostname, address.port), timeout=GUARD_S)
    try:
        slow.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert client.get("/v1/health").status_code == 200
        for sock in (slow, *silent):
            assert sock.recv(1024) == b"", "the server answered a request it never received whole"
    finally:
        for sock in (slow, *silent):
            sock.close()
    assert client.get("/v1/health").status_code == 200


def test_an_upload_is_not_copied_whole_in_memory():
    """An upload is parsed as it arrives (its file part spooled to a temporary file), so a request holds about one
    copy of its photo: 50 concurrent uploads of 19 MB peaked at 3.7 GB of RSS when the body was first gathered
    whole, 1.6 GB since. In-process (no model needed): the multipart reader of the routes, traced allocations."""
    size = 4 << 20
    peaks: list[int] = []

    async def route(request: Request) -> JSONResponse:
        tracemalloc.start()
        try:
            uploads = await _uploads(request, 2 * size, GUARD_S)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        return JSONResponse({"bytes": len(uploads[0].data)})

    async def body():
        yield b'--xyz\r\nContent-Disposition: form-data; name="photo"; filename="a.jpg"\r\n\r\n'
        for _ in range(size // (64 << 10)):
            yield bytes(64 << 10)
        yield b"\r\n--xyz--\r\n"

    async def post() -> httpx.Response:
        app = Starlette(routes=[Route("/", route, methods=["POST"])])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await http.post("/", content=body(), headers={"Content-Type": "multipart/form-data; boundary=xyz"})

    assert asyncio.run(post()).json() == {"bytes": size}
    assert peaks[0] < 2 * size, f"{peaks[0] / size:.2f} copies of the upload in memory at once"


def _any_photo(seed: int = 5) -> bytes:
    out = io.BytesIO()
    photo(seed, COLOURS["sofa"]).save(out, "JPEG")
    return out.getvalue()


def test_the_docs_curl_lines_run_against_a_real_server(server, world, tmp_path):
    """docs/serve.md's curl examples, as pasted (their fixed address replaced by this server's), in a folder with
    the photos they name: photo.jpg (a catalogue photo) and new.jpg (a photo of the queue)."""
    shutil.copy(sorted(world["photos"].rglob("*.jpg"))[2], tmp_path / "photo.jpg")
    shutil.copy(sorted(world["queue_photos"].rglob("*.jpg"))[3], tmp_path / "new.jpg")
    lines = [line for block in blocks("docs/serve.md") if block.language == "bash"
             for line in block.text.replace("\\\n", " ").splitlines() if line.startswith("curl ")]
    assert len(lines) >= 7
    for line in lines:
        command = line.replace("http://127.0.0.1:8000", server.url).replace("curl ", "curl --fail-with-body -sS ", 1)
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, timeout=GUARD_S)
        assert done.returncode == 0, f"{line}\n{done.stdout[:300]!r}\n{done.stderr[:300]!r}"
    assert (tmp_path / "thumbnail.jpg").read_bytes().startswith(b"\xff\xd8")


def test_the_catalogue_follows_its_store(client, world):
    """Rows a concurrent extract commits to the catalogue's store appear in /v1/similar without a restart."""
    added = _new_photos(world["base"] / "added", 3000, per_class=1)
    extract([added], weights=str(world["weights"]), out=world["catalogue"], **SETTINGS)
    new = sorted(added.rglob("*.jpg"))[0]
    deadline = time.monotonic() + GUARD_S
    while (response := client.post("/v1/similar", json={"sha256": _sha(new), "k": 3})).status_code == 404:
        assert time.monotonic() < deadline, "the new rows did not appear"
        time.sleep(0.05)
    assert response.status_code == 200 and response.json()["query"]["label"] == new.parent.name
    assert client.get("/v1/info").json()["catalogue"]["rows"] == len(load(world["catalogue"])) == 15


def test_a_catalogue_rebuilt_with_other_settings_is_not_taken(server, client, world):
    """Its rows are no longer the model's features: the server keeps the rows it has and says so."""
    rows = client.get("/v1/info").json()["catalogue"]["rows"]
    extract([world["uploads"] / "bed"], weights=str(world["weights"]), out=world["catalogue"], store_dtype="float16",
            overwrite=True, **SETTINGS)
    _wait_for(lambda: any("rebuilt with other settings" in line for line in server.lines), "the warning")
    assert client.get("/v1/info").json()["catalogue"]["rows"] == rows


def test_sigterm_finishes_and_exits_0(server):
    """Last of the main server's tests: SIGTERM stops it, exit 0."""
    assert server.stop(signal.SIGTERM, timeout=GUARD_S) == 0
    assert any("SIGTERM: stopping" in line for line in server.lines)
    assert not [line for line in server.lines if "Traceback" in line]


# -- the second server: a token, a queue of one photo, Ctrl-C --------------------------------------------------


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.01)


def test_starting_token_batching_full_queue_and_ctrl_c_finishing_the_requests_in_flight(world, tmp_path):
    """Held before its network is built, the server answers 503 (starting). Then the network held at its first
    pass (one photo): two more requests (3 photos) wait for it, the queue of 4 photos is then full (503), Ctrl-C
    comes; once let go, the waiting photos go through in one pass, every request is answered, and the server
    exits 130."""
    env = {**os.environ, "FURNITYPE_TEST_HOLD_AT": f"serve-warm,serve-batch:{tmp_path}"}
    held: Server = start_server(world["run"], "--catalogue", world["base"] / "catalogue-kept.h5", "--token", "s3cret",
                                "--max-queue", "4", env=env, timeout=600, until=STARTING)
    try:
        auth = {"Authorization": "Bearer s3cret"}
        with httpx.Client(base_url=held.url, timeout=GUARD_S, headers=auth) as http:
            _wait_for((tmp_path / "serve-warm.held").exists, "the model loaded")  # the network not built yet
            starting = http.get("/v1/health")
            assert starting.status_code == 503 and starting.json() == {"status": "starting"}
            assert starting.headers["Retry-After"] == "1"
            assert "starting" in _one_line_error(http.post("/v1/predict", files={"photo": ("a.jpg", _any_photo())}),
                                                 503)
            _one_line_error(http.get("/v1/info"), 503)
            (tmp_path / "serve-warm.go").touch()
            _wait_for(lambda: any(f"ready on {held.url}" in line for line in held.lines), "the ready line")
            assert http.get("/v1/health").json() == {"status": "ok"}
            for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Bearer s3cret2"}, {"Authorization": "Bearer  s3cret"}):
                for path in ("/v1/health", "/v1/info", "/openapi.json"):
                    _one_line_error(http.get(path, headers=headers), 401)
            assert http.get("/v1/health", headers={"Authorization": "bearer s3cret"}).status_code == 200  # RFC 9110
            for query in ({"token": "s3cret"}, {"access_token": "s3cret"}):  # never from a URL (logs, history)
                _one_line_error(http.get("/v1/info", params=query, headers={"Authorization": ""}), 401)

            answers: dict[str, httpx.Response] = {}

            def post(name: str, n: int) -> threading.Thread:
                files = [("photo", (f"{name}{i}.jpg", _any_photo(seed=i))) for i in range(n)]
                thread = threading.Thread(target=lambda: answers.update({name: http.post("/v1/predict", files=files)}))
                thread.start()
                return thread

            first = post("a", 1)
            _wait_for((tmp_path / "serve-batch.held").exists, "the first photo's network pass")
            waiting = [post("c", 2), post("d", 1)]
            _wait_for(lambda: http.get("/v1/info").json()["batching"]["waiting"] == 3, "3 photos waiting")
            busy = http.post("/v1/predict", files={"photo": ("e.jpg", _any_photo())})
            assert "busy" in _one_line_error(busy, 503) and busy.headers["Retry-After"] == "1"
            _one_line_error(http.post("/v1/similar", files={"photo": ("e.jpg", _any_photo())}), 503)

            held.process.send_signal(signal.SIGINT)
            _wait_for(lambda: any("Ctrl-C: stopping" in line for line in held.lines), "the stop")
            (tmp_path / "serve-batch.go").touch()
            for thread in (first, *waiting):
                thread.join(GUARD_S)
            assert {name: r.status_code for name, r in answers.items()} == {"a": 200, "c": 200, "d": 200}
            timings = [p["timings"] for name in "cd" for p in answers[name].json()["predictions"]]
            assert [t["batch"] for t in timings] == [3, 3, 3]  # one network pass for the photos of two requests
            assert len({t["network_ms"] for t in timings}) == 1
            assert answers["a"].json()["predictions"][0]["timings"]["batch"] == 1
        assert held.process.wait(GUARD_S) == 130
        assert held.lines[-1].startswith("interrupted")
    finally:
        if held.process.poll() is None:
            held.process.kill()
            held.process.wait()


def test_start_problems_are_one_line(world, tmp_path):
    """A non-loopback address is warned about; a run that is not there is one line and exit 2; so is a port in
    use, and a labels file that cannot be read or written (not UTF-8, a symbolic link). A queue made with other settings
    than the run is one line and exit 1 (as a catalogue of other settings), not an error at every suggestion."""
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "furnitype", "serve", *args], capture_output=True, text=True,
                              timeout=GUARD_S)

    done = serve(str(tmp_path / "no-run"), "--catalogue", str(world["catalogue"]), "--host", "0.0.0.0",
                 "--port", "0")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[0].startswith("warning: serving on 0.0.0.0, reachable from other machines; give --token")
    assert lines[-1].startswith("Error: ") and "Traceback" not in done.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = serve(str(world["run"]), "--catalogue", str(world["catalogue"]), "--port",
                     str(taken.getsockname()[1]))
    assert done.returncode == 2 and re.fullmatch(r"Error: cannot serve on 127\.0\.0\.1:\d+: .+\n", done.stderr)
    done = serve(str(world["run"]), "--catalogue", str(world["catalogue"]), "--labels", "l.csv", "--port", "0")
    assert done.returncode == 2 and done.stderr == "Error: --labels needs --queue: the photos to label are the " \
                                                   "queue's.\n", done.stderr
    (tmp_path / "latin-1.csv").write_bytes("path,label\n/photos/café.jpg,bed\n".encode("latin-1"))
    (tmp_path / "link.csv").symlink_to(tmp_path / "elsewhere.csv")
    for labels, problem in (("latin-1.csv", "codec can't decode"), ("link.csv", "is a symbolic link")):
        done = serve(str(world["run"]), "--catalogue", str(world["catalogue"]), "--queue", str(world["queue"]),
                     "--labels", str(tmp_path / labels), "--port", "0")
        assert done.returncode == 2 and re.fullmatch(rf"Error: .*{problem}.*\n", done.stderr), done.stderr
    assert not (tmp_path / "elsewhere.csv").exists()
    other = tmp_path / "queue-float16.h5"
    extract([world["queue_photos"]], weights=str(world["weights"]), out=other, store_dtype="float16", **SETTINGS)
    kept = world["base"] / "catalogue-kept.h5"  # the run's settings (the main server's catalogue was rebuilt)
    done = serve(str(world["run"]), "--catalogue", str(kept), "--queue", str(other), "--port", "0")
    assert done.returncode == 1, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("Error: ") and "queue-float16.h5 was made with store_dtype=float16" in last, last
    assert "Traceback" not in done.stderr


def test_ctrl_c_twice_stops_at_once(world, tmp_path):
    """Held while its model loads, the server is sent Ctrl-C (it would wait for the load), then Ctrl-C again: it
    ends at once, exit 130, saying so."""
    env = {**os.environ, "FURNITYPE_TEST_HOLD_AT": f"serve-warm:{tmp_path}"}
    held = start_server(world["run"], "--catalogue", world["base"] / "catalogue-kept.h5", env=env, timeout=600,
                        until=STARTING)
    try:
        _wait_for((tmp_path / "serve-warm.held").exists, "the model loaded")
        held.process.send_signal(signal.SIGINT)
        _wait_for(lambda: any("Ctrl-C: stopping" in line for line in held.lines), "the stop")
        held.process.send_signal(signal.SIGINT)
        assert held.process.wait(GUARD_S) == 130
        _wait_for(lambda: any("Ctrl-C again: stopped at once" in line for line in held.lines), "the last line")
        assert not [line for line in held.lines if "Traceback" in line]
    finally:
        if held.process.poll() is None:
            held.process.kill()
            held.process.wait()


@pytest.mark.parametrize("workers", [0, -1])
def test_decoding_workers_below_one_are_refused_as_extract_refuses_them(workers):
    """0 was taken as the default (up to 4), where extract, predict and similar refuse it."""
    with pytest.raises(InputError, match=rf"^decode_workers must be at least 1. Received: decode_workers={workers}$"):
        Batcher(lambda batch: batch, decode_workers=workers).close()
