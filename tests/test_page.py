"""The page of ``furnitype serve`` in a real browser: Debian's Chromium, headless, driven by Playwright.

One real server (a tiny VGG16 run at 32 px, a catalogue, a queue to label and a labels file) serves every test;
the page is checked against the server's own API answers, read with httpx. The tests wait for what the page shows
(Playwright's auto-waiting, ``expect``, ``wait_for_function``), with generous timeouts only as guards.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from furnitype.extraction import extract
from furnitype.features import load
from furnitype.keras_loader import import_keras
from furnitype.training import classify
from tests.images import COLOURS, make_photo_folder, photo
from tests.servers import start_server

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
expect = sync_api.expect

CLASSES = ("bed", "chair", "sofa")
SETTINGS = {"backbone": "vgg16", "image_size": 32, "batch_size": 8, "progress": False}
K = 8  # the page's default number of look-alikes
TOKEN = "s3cret-token"  # the server requires it: every test goes through the page's token handling
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GUARD_MS = 120_000  # a guard only: the machine running the tests may be busy
PAGE = Path(__file__).resolve().parents[1] / "furnitype" / "serve" / "page"


def jpeg(seed: int, colour: str, path: Path) -> Path:
    photo(seed, COLOURS[colour], (56, 44)).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[dict]:
    """A server (with a token) of a run trained on 12 photos, those photos as its catalogue, 6 new ones to label."""
    base = tmp_path_factory.mktemp("page")
    keras = import_keras()
    keras.utils.set_random_seed(7)
    weights = base / "vgg16.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    photos = make_photo_folder(base / "photos", per_class=4, classes=CLASSES)
    catalogue = extract([photos], weights=str(weights), out=base / "catalogue.h5", **SETTINGS).out
    run = classify([catalogue], models=["logreg"], cv=2, out=base / "run").path
    new = base / "new"
    new.mkdir()
    for i in range(6):
        jpeg(2000 + i, CLASSES[i % 3], new / f"new_{i}.jpg")
    queue = extract([new], weights=str(weights), out=base / "queue.h5", **SETTINGS).out
    labels = base / "labels.csv"
    queries = base / "queries"
    queries.mkdir()
    server = start_server(run, "--catalogue", catalogue, "--queue", queue, "--labels", labels, "--token", TOKEN)
    url = server.url.rstrip("/")
    api = httpx.Client(base_url=url, headers=AUTH, timeout=120)
    try:
        yield {
            "url": url,
            "api": api,
            "queue": queue,
            "labels": labels,
            "upload": jpeg(3000, "chair", queries / "query.jpg"),
            "other": jpeg(3001, "sofa", queries / "other.jpg"),
            "third": jpeg(3002, "bed", queries / "third.jpg"),
        }
    finally:
        api.close()
        server.stop(signal.SIGTERM)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed for the page's tests (apt-get install chromium)"
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield launched
        launched.close()


class Watched:
    """A page of a new browser context, with what it asked of other origins and the uncaught script errors."""

    def __init__(self, browser, origin: str, **context_options) -> None:
        self.context = browser.new_context(**context_options)
        self.origin = origin
        self.requests: list = []
        self.foreign: list[str] = []
        self.script_errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(GUARD_MS)
        self.page.on("pageerror", lambda error: self.script_errors.append(str(error)))

    def _route(self, route) -> None:
        request = route.request
        parts = urlsplit(request.url)
        if f"{parts.scheme}://{parts.netloc}" == self.origin:
            self.requests.append(request)
            route.continue_()
        else:
            self.foreign.append(request.url)
            route.abort()


@pytest.fixture
def watched(served, browser) -> Iterator[Watched]:
    """A fresh page; after the test, it must have asked nothing of another origin and raised no script error."""
    expect.set_options(timeout=GUARD_MS)
    watched = Watched(browser, served["url"], viewport={"width": 1280, "height": 900})
    yield watched
    watched.context.close()
    assert watched.foreign == [], "the page asked another origin"
    assert watched.script_errors == [], "the page's script failed"


# -- what the server answers, read with httpx ---------------------------------------------------------------------


def api_predict(served, path: Path) -> httpx.Response:
    with path.open("rb") as fh:
        return served["api"].post("/v1/predict", files={"photo": (path.name, fh, "image/jpeg")})


def api_neighbours(served, path: Path, k: int = K) -> list[dict]:
    with path.open("rb") as fh:
        answer = served["api"].post("/v1/similar", params={"k": k}, files={"photo": (path.name, fh, "image/jpeg")})
    assert answer.status_code == 200, answer.text
    return answer.json()["neighbours"]


def api_similar_upload(served, path: Path, k: int = K) -> list[str]:
    return [n["sha256"] for n in api_neighbours(served, path, k)]


def api_similar_row(served, sha256: str, k: int = K) -> dict:
    answer = served["api"].post("/v1/similar", json={"sha256": sha256, "k": k})
    assert answer.status_code == 200, answer.text
    return answer.json()


# -- what the page shows --------------------------------------------------------------------------------------------


def grid(page) -> list[str]:
    return page.locator("#neighbours .neighbour").evaluate_all("items => items.map(i => i.dataset.sha256)")


def expect_grid(page, expected: list[str]) -> None:
    """Wait until the look-alikes grid lists ``expected`` in order and all its thumbnails are loaded."""
    try:
        page.wait_for_function(
            """expected => {
                const items = [...document.querySelectorAll('#neighbours .neighbour')];
                return JSON.stringify(items.map(i => i.dataset.sha256)) === JSON.stringify(expected)
                    && items.every(i => i.querySelector('img').complete && i.querySelector('img').naturalWidth > 0);
            }""",
            arg=expected,
        )
    except sync_api.TimeoutError:
        loaded = page.locator("#neighbours img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
        raise AssertionError(f"grid {grid(page)} (thumbnail widths {loaded}), expected {expected}") from None


def open_page(page, served) -> None:
    """Open the page with the server's token in its address, and wait until it has read the server's description."""
    page.goto(f"{served['url']}/?token={TOKEN}")
    expect(page.locator("#info")).to_have_text(re.compile(r"^12 photos in the catalogue · 3 categories · model "))


def upload(page, path: Path) -> None:
    page.set_input_files("#photo-input", str(path))
    expect(page.locator("#result")).to_have_attribute("data-sha256", hashlib.sha256(path.read_bytes()).hexdigest())


def tab_to(page, selector: str, most: int = 20) -> None:
    """Press Tab until ``selector`` has the focus (it must be reachable from the keyboard)."""
    for _ in range(most):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement === document.querySelector(s)", selector):
            return
    raise AssertionError(f"{selector} is not reached with the Tab key")


# -- the tests ------------------------------------------------------------------------------------------------------


def test_a_photo_shows_its_category_its_probabilities_and_its_look_alikes(served, watched):
    page = watched.page
    open_page(page, served)
    predicted = api_predict(served, served["upload"]).json()["predictions"][0]
    neighbours = api_neighbours(served, served["upload"])
    expected = [n["sha256"] for n in neighbours]

    upload(page, served["upload"])

    expect(page.locator("#label")).to_have_text(predicted["label"])
    bars = page.locator("#bars li")
    expect(bars).to_have_count(len(CLASSES))
    top = {row["label"]: row["probability"] for row in predicted["top_k"]}
    assert bars.first.locator(".bar-label").inner_text() == predicted["label"]
    assert bars.first.locator(".bar-value").inner_text() == f"{100 * top[predicted['label']]:.1f}%"
    assert len(expected) == K
    expect_grid(page, expected)
    captions = page.locator("#neighbours .neighbour").evaluate_all(
        "items => items.map(i => [i.querySelector('.n-label').textContent, i.querySelector('.n-distance').textContent])"
    )
    assert captions == [[n["label"], f"distance {n['distance']:.3f}"] for n in neighbours]


def test_more_like_this_shows_the_neighbours_of_that_row_and_back_returns(served, watched):
    page = watched.page
    open_page(page, served)
    upload(page, served["upload"])
    of_upload = api_similar_upload(served, served["upload"])
    expect_grid(page, of_upload)
    chosen = of_upload[1]
    answer = api_similar_row(served, chosen)
    expected = [n["sha256"] for n in answer["neighbours"]]
    assert chosen not in expected and expected != of_upload

    page.locator(f'#neighbours .neighbour[data-sha256="{chosen}"] .more-like-this').click()

    expect_grid(page, expected)
    expect(page.locator("#result")).to_have_attribute("data-sha256", chosen)
    expect(page.locator("#label")).to_have_text(answer["query"]["label"])
    expect(page.locator("#bars li")).to_have_count(0)
    page.locator("#back").click()
    expect_grid(page, of_upload)


def test_a_dropped_and_a_pasted_photo_are_searched_and_a_dropped_link_is_refused(served, watched):
    page = watched.page
    open_page(page, served)
    make_transfer = """([data, name]) => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/jpeg'}));
        return transfer;
    }"""
    for path in (served["other"], served["third"]):
        data = base64.b64encode(path.read_bytes()).decode()
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        if path == served["other"]:
            transfer = page.evaluate_handle(make_transfer, [data, path.name])
            page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
        else:
            page.evaluate(
                f"""args => document.dispatchEvent(new ClipboardEvent('paste',
                    {{clipboardData: ({make_transfer})(args), bubbles: true}}))""",
                [data, path.name],
            )
        expect(page.locator("#result")).to_have_attribute("data-sha256", sha)
        expect(page.locator("#label")).to_have_text(api_predict(served, path).json()["predictions"][0]["label"])
        expect_grid(page, api_similar_upload(served, path))

    link = page.evaluate_handle(
        "() => { const t = new DataTransfer(); t.setData('text/uri-list', 'https://example.com/chair.jpg'); return t; }"
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": link})
    expect(page.locator("#error")).to_have_text(re.compile(r"^Drop a photo file"))
    expect(page.locator("#result")).to_have_attribute("data-sha256", sha)  # the last photo's results stay


def test_a_file_that_is_not_a_photo_shows_the_servers_error(served, watched, tmp_path):
    page = watched.page
    open_page(page, served)
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    refused = api_predict(served, notes)
    assert refused.status_code == 422

    page.set_input_files("#photo-input", str(notes))

    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_have_text(refused.json()["error"])
    upload(page, served["upload"])
    expect(page.locator("#error")).to_be_hidden()


def test_labelling_a_suggested_photo_with_the_keyboard_writes_its_row(served, watched):
    page = watched.page
    open_page(page, served)
    suggested = served["api"].get("/v1/suggest", params={"n": 12}).json()
    assert suggested["photos"], "the queue has photos to label"
    queue = load(served["queue"])
    path_of = {str(sha): str(path) for sha, path in zip(queue.sha256, queue.paths, strict=True)}
    before = labelled_rows(served["labels"])

    tab_to(page, "#tab-search")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-label")).to_be_focused()
    expect(page.locator("#panel-label")).to_be_visible()
    items = page.locator("#suggestions .suggestion")
    expect(items).to_have_count(len(suggested["photos"]))
    assert items.evaluate_all("items => items.map(i => i.dataset.sha256)") == [p["sha256"] for p in suggested["photos"]]
    first = suggested["photos"][0]
    label = [c for c in suggested["classes"] if c != first["predicted"]][-1]  # not the first button, nor the guess
    tab_to(page, f'.suggestion[data-sha256="{first["sha256"]}"] .label-button[data-label="{label}"]')
    page.keyboard.press("Enter")

    expect(page.locator(f'#suggestions .suggestion[data-sha256="{first["sha256"]}"]')).to_have_count(0)
    expect(page.locator("#label-count")).to_have_text(re.compile(rf"^{len(before) + 1} labels? saved$"))
    assert labelled_rows(served["labels"]) == [*before, [path_of[first["sha256"]], label]]
    expect(page.locator("#suggestions .suggestion .label-button").first).to_be_focused()


def labelled_rows(labels: Path) -> list[list[str]]:
    if not labels.exists():
        return []
    with labels.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "label"]
    return rows[1:]


def test_the_file_input_is_reachable_and_shows_its_focus(served, watched):
    page = watched.page
    open_page(page, served)
    tab_to(page, "#photo-input")
    outline = page.eval_on_selector('label[for="photo-input"]', "l => getComputedStyle(l).outlineStyle")
    assert outline == "solid"


def test_at_phone_width_nothing_overflows(served, browser):
    watched = Watched(browser, served["url"], viewport={"width": 360, "height": 740}, is_mobile=True)
    page = watched.page
    open_page(page, served)
    upload(page, served["upload"])
    expect_grid(page, api_similar_upload(served, served["upload"]))
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    rights = page.locator("#neighbours .neighbour").evaluate_all(
        "items => items.map(i => i.getBoundingClientRect().right)"
    )
    assert len(rights) == K and max(rights) <= 360
    page.locator("#tab-label").click()
    expect(page.locator("#suggestions .suggestion").first).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    watched.context.close()
    assert watched.foreign == [] and watched.script_errors == []


def test_the_token_from_the_address_goes_with_every_request_and_leaves_the_address(served, watched):
    page = watched.page
    open_page(page, served)
    upload(page, served["upload"])
    expect_grid(page, api_similar_upload(served, served["upload"]))

    assert urlsplit(page.url).query == ""
    api = [r for r in watched.requests if urlsplit(r.url).path.startswith("/v1/")]
    assert {urlsplit(r.url).path.split("/")[2] for r in api} == {"info", "predict", "similar", "photos"}
    assert {r.headers.get("authorization") for r in api} == {f"Bearer {TOKEN}"}
    page.reload()  # the token is kept for the tab's session
    expect(page.locator("#info")).to_have_text(re.compile(r"^12 photos in the catalogue"))


def test_without_the_token_the_page_shows_the_servers_refusal_and_asks_for_it(served, watched):
    page = watched.page
    refused = httpx.get(f"{served['url']}/v1/info", timeout=120)
    assert refused.status_code == 401

    page.goto(served["url"])

    expect(page.locator("#error")).to_have_text(refused.json()["error"])
    expect(page.locator("#token")).to_be_focused()
    page.keyboard.type(TOKEN)
    page.keyboard.press("Enter")
    expect(page.locator("#info")).to_have_text(re.compile(r"^12 photos in the catalogue"))
    expect(page.locator("#error")).to_be_hidden()
    upload(page, served["upload"])
    expect_grid(page, api_similar_upload(served, served["upload"]))


def test_the_page_names_no_other_origin():
    html = (PAGE / "index.html").read_text(encoding="utf-8")
    for reference in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert not re.match(r"(?i)([a-z]+:)?//", reference), reference
    for name in ("app.js", "style.css"):
        assert not re.search(r"(?i)\b(https?:)?//[a-z0-9.-]+\.[a-z]", (PAGE / name).read_text(encoding="utf-8")), name
