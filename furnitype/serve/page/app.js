// The page of `furnitype serve`: a photo in, its category and the catalogue's look-alikes out, and the labelling
// loop. Plain JavaScript talking to the server's /v1 API with relative URLs (so the app can be mounted under a
// prefix); nothing is loaded from another origin.
"use strict";

const TOKEN_KEY = "furnitype-token";
const THUMB_SIZE = 256;
const SUGGEST_N = 12;

const $ = (id) => document.getElementById(id);
const state = {
  token: "",
  classes: [],
  upload: null, // {file, url, prediction, neighbours}: the last photo searched for, for "Back to your photo"
  ticket: 0, // the number of the latest search; an older search's answer is dropped
  labelsOn: false,
  info: Promise.resolve(), // the server's description being read: a search waits for its classes
};

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// -- talking to the server ------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch {
    throw new ApiError("The server cannot be reached; is furnitype serve still running?", 0);
  }
  if (!response.ok) {
    let message = `The server answered ${response.status} ${response.statusText}`.trim();
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") message = body.error;
    } catch {
      // not JSON: keep the status line
    }
    throw new ApiError(message, response.status);
  }
  const type = response.headers.get("Content-Type") || "";
  return type.startsWith("application/json") ? response.json() : response.blob();
}

function postJson(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

function photoForm(file) {
  const form = new FormData();
  form.append("photo", file, file.name || "pasted-photo");
  return form;
}

// Thumbnails come through fetch so that they carry the token like every other request.
async function loadThumbnail(img, sha256) {
  try {
    const blob = await api(`v1/photos/${encodeURIComponent(sha256)}?size=${THUMB_SIZE}`);
    if (!img.isConnected) return;
    img.src = URL.createObjectURL(blob);
  } catch (error) {
    img.closest("li, .query")?.classList.add("missing");
    img.alt = `${img.alt} (${error.message})`;
  }
}

function releaseImages(container) {
  for (const img of container.querySelectorAll("img")) {
    if (img.src.startsWith("blob:") && img.src !== state.upload?.url) URL.revokeObjectURL(img.src);
  }
}

// -- messages -------------------------------------------------------------------------------------------------

function showError(error) {
  const box = $("error");
  box.textContent = error.message || String(error);
  box.hidden = false;
  if (error.status === 401) {
    $("token-box").open = true;
    $("token").focus();
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setBusy(text) {
  $("busy").textContent = text;
}

const percent = (p) => `${(100 * p).toFixed(1)}%`;
const plural = (n, word) => `${n} ${word}${String(n) === "1" ? "" : "s"}`;

function element(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node && key !== "role") node[key] = value; // role: not every browser reflects it
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

// -- search: a photo in, its category and look-alikes out ----------------------------------------------------

function kValue() {
  const k = Math.round(Number($("k").value));
  return Number.isFinite(k) && k >= 1 ? Math.min(k, 100) : 8;
}

async function searchPhoto(file) {
  const ticket = ++state.ticket;
  clearError();
  selectTab($("tab-search"));
  setBusy(`Looking at ${file.name || "the photo"}…`);
  await state.info;
  const topK = state.classes.length ? `?top_k=${state.classes.length}` : "";
  try {
    // both at once (the server batches them); when both fail, predict's error is the one shown
    const [predicted, similar] = (await Promise.allSettled([
      api(`v1/predict${topK}`, { method: "POST", body: photoForm(file) }),
      api(`v1/similar?k=${kValue()}`, { method: "POST", body: photoForm(file) }),
    ])).map((settled) => {
      if (settled.status === "rejected") throw settled.reason;
      return settled.value;
    });
    if (ticket !== state.ticket) return;
    if (state.upload) URL.revokeObjectURL(state.upload.url);
    state.upload = {
      file,
      url: URL.createObjectURL(file),
      prediction: predicted.predictions[0],
      neighbours: similar.neighbours,
    };
    showUpload();
  } catch (error) {
    if (ticket === state.ticket) showError(error);
  } finally {
    if (ticket === state.ticket) setBusy("");
  }
}

function showUpload() {
  const { url, prediction, neighbours } = state.upload;
  const result = $("result");
  releaseImages(result.querySelector(".query"));
  $("query-photo").src = url;
  $("query-photo").alt = "Your photo";
  result.querySelector(".query").classList.remove("missing");
  result.dataset.sha256 = prediction.sha256;
  $("label-kind").textContent = "Category";
  $("label").textContent = prediction.label;
  showBars(prediction.top_k);
  $("back").hidden = true;
  $("neighbours-title").textContent = "Look-alikes in the catalogue";
  showNeighbours(neighbours);
  result.hidden = false;
}

function showBars(top) {
  const bars = $("bars");
  bars.replaceChildren(
    ...top.map(({ label, probability }) => {
      const fill = element("span", { className: "fill" });
      fill.style.width = percent(probability);
      return element(
        "li",
        {},
        element("span", { className: "bar-label" }, label),
        element("span", { className: "bar", "aria-hidden": "true" }, fill),
        element("span", { className: "bar-value" }, percent(probability)),
      );
    }),
  );
  bars.hidden = top.length === 0;
}

function showNeighbours(neighbours) {
  const grid = $("neighbours");
  releaseImages(grid);
  if (!neighbours.length) {
    grid.replaceChildren(element("li", { className: "empty muted" }, "No look-alikes in the catalogue."));
    return;
  }
  grid.replaceChildren(
    ...neighbours.map((n, i) => {
      const label = n.label ?? "unlabelled";
      const img = element("img", { alt: `${label}, look-alike ${i + 1}`, width: THUMB_SIZE, height: THUMB_SIZE });
      loadThumbnail(img, n.sha256);
      const button = element("button", { type: "button", className: "more-like-this button" }, "More like this");
      button.setAttribute("aria-label", `More like look-alike ${i + 1} (${label})`);
      button.addEventListener("click", () => moreLikeThis(n.sha256, n.label));
      img.addEventListener("click", () => button.click()); // the picture too, for the mouse
      return element(
        "li",
        { className: "neighbour", dataset: { sha256: n.sha256 } },
        img,
        element(
          "p",
          { className: "caption" },
          element("span", { className: "n-label" }, label),
          element("span", { className: "n-distance", title: `similarity ${n.score.toFixed(3)}` },
            `distance ${n.distance.toFixed(3)}`),
        ),
        button,
      );
    }),
  );
}

async function moreLikeThis(sha256, label) {
  const ticket = ++state.ticket;
  clearError();
  setBusy("Searching for more like this…");
  try {
    const similar = await postJson("v1/similar", { sha256, k: kValue() });
    if (ticket !== state.ticket) return;
    const result = $("result");
    const query = result.querySelector(".query");
    releaseImages(query);
    query.classList.remove("missing");
    const photo = $("query-photo");
    photo.removeAttribute("src");
    photo.alt = `The catalogue photo (${label ?? "unlabelled"})`;
    loadThumbnail(photo, sha256);
    result.dataset.sha256 = sha256;
    $("label-kind").textContent = "Catalogue label";
    $("label").textContent = similar.query.label ?? label ?? "unlabelled";
    showBars([]);
    $("back").hidden = state.upload === null;
    $("neighbours-title").textContent = "More like this";
    showNeighbours(similar.neighbours);
    showTop();
  } catch (error) {
    if (ticket === state.ticket) showError(error);
  } finally {
    if (ticket === state.ticket) setBusy("");
  }
}

// The button pressed is gone with the old grid: show the new query and keep the keyboard's place before the grid.
function showTop() {
  $("result").scrollIntoView({ block: "start" });
  $("neighbours-title").focus({ preventScroll: true });
}

function firstImage(files) {
  return Array.from(files || []).find((f) => f.type.startsWith("image/")) || (files && files[0]);
}

function setUpSearch() {
  const input = $("photo-input");
  input.addEventListener("change", () => {
    const file = input.files[0];
    input.value = ""; // choosing the same photo again searches again
    if (file) searchPhoto(file);
  });

  const zone = $("drop-zone");
  let depth = 0; // dragenter/dragleave fire for every child crossed
  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!hasFiles(event)) return;
    depth = Math.max(0, depth - 1);
    if (!depth) zone.classList.remove("dragging");
  });
  // A drop anywhere on the page is taken, not opened by the browser (which would leave the page); only text
  // dropped into a field is left to the field.
  const intoField = (event) => !hasFiles(event) && event.target instanceof HTMLInputElement;
  document.addEventListener("dragover", (event) => {
    if (!intoField(event)) event.preventDefault();
  });
  document.addEventListener("drop", (event) => {
    depth = 0;
    zone.classList.remove("dragging");
    if (!event.dataTransfer || intoField(event)) return;
    event.preventDefault();
    const file = firstImage(event.dataTransfer.files);
    if (file) searchPhoto(file);
    else showError(new Error("Drop a photo file (a picture dragged from another web page is only a link)."));
  });
  document.addEventListener("paste", (event) => {
    const file = firstImage(event.clipboardData?.files);
    if (!file) return; // text pasted into a field stays text
    event.preventDefault();
    searchPhoto(file);
  });

  $("back").addEventListener("click", () => {
    ++state.ticket;
    clearError();
    showUpload();
    showTop();
  });
}

// -- labelling: the queue's photos most worth a label ---------------------------------------------------------

function showLabelCount(count) {
  $("label-count").textContent = `${plural(count, "label")} saved`;
}

async function loadSuggestions() {
  const list = $("suggestions");
  const note = $("suggest-note");
  note.textContent = "Loading the photos worth labelling…";
  try {
    const answer = await api(`v1/suggest?n=${SUGGEST_N}`);
    releaseImages(list);
    list.replaceChildren(...answer.photos.map((p) => suggestionItem(p, answer.classes)));
    note.textContent = answer.photos.length ? "" : "Every photo of the queue has a label.";
  } catch (error) {
    if (error.status === 404) note.textContent = error.message;
    else {
      note.textContent = "";
      showError(error);
    }
  }
}

function suggestionItem(photo, classes) {
  const img = element("img", { alt: `Photo to label, guessed ${photo.predicted}`, width: THUMB_SIZE, height: THUMB_SIZE });
  loadThumbnail(img, photo.sha256);
  const buttons = classes.map((label) => {
    const button = element("button", {
      type: "button",
      className: `label-button button${label === photo.predicted ? " guess" : ""}`,
      dataset: { label },
    }, label);
    button.addEventListener("click", () => saveLabel(item, photo.sha256, label));
    return button;
  });
  const item = element(
    "li",
    { className: "suggestion", dataset: { sha256: photo.sha256 } },
    img,
    element("p", { className: "caption muted" }, `Guess: ${photo.predicted} (${percent(photo.probability)})`),
    element("div", { className: "label-buttons", role: "group", "aria-label": "Its category" }, ...buttons),
  );
  return item;
}

async function saveLabel(item, sha256, label) {
  const buttons = item.querySelectorAll("button");
  buttons.forEach((b) => (b.disabled = true));
  clearError();
  try {
    const saved = await postJson("v1/labels", { sha256, label });
    showLabelCount(saved.count);
    const next = item.nextElementSibling || item.previousElementSibling;
    releaseImages(item);
    item.remove();
    if (next) next.querySelector(".label-button")?.focus();
    else {
      $("tab-label").focus();
      loadSuggestions();
    }
  } catch (error) {
    buttons.forEach((b) => (b.disabled = false));
    showError(error);
  }
}

// -- tabs -----------------------------------------------------------------------------------------------------

function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (tab.id === "tab-label" && !state.labelsOn) {
    state.labelsOn = true;
    loadSuggestions();
  }
}

function setUpTabs() {
  const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const i = tabs.indexOf(tab);
      const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
      if (to === undefined) return;
      event.preventDefault();
      const next = tabs[(to + tabs.length) % tabs.length];
      next.focus();
      selectTab(next);
    });
  }
}

// -- the token and the server's description -------------------------------------------------------------------

function readToken() {
  const params = new URLSearchParams(location.search);
  let token = "";
  try {
    token = sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    // storage turned off: the token lives in the page only
  }
  if (params.has("token")) {
    token = params.get("token");
    params.delete("token");
    // keep the token out of the address bar, the history and bookmarks
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? `?${query}` : "") + location.hash);
  }
  setToken(token);
}

function setToken(token) {
  state.token = token.trim();
  $("token").value = state.token;
  try {
    if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage turned off
  }
}

async function loadInfo() {
  try {
    const info = await api("v1/info");
    clearError();
    state.classes = info.classes;
    const parts = [
      `${plural(info.catalogue.rows.toLocaleString("en"), "photo")} in the catalogue`,
      `${info.classes.length} categories`,
      `model ${info.model}`,
    ];
    $("info").textContent = parts.join(" · ");
    $("info").title = info.classes.join(", ");
    if (info.labels) showLabelCount(info.labels.count);
    if (!info.queue || !info.labels) {
      $("suggest-note").textContent =
        "This server has no photos to label: start it with --queue NEW.h5 --labels labels.csv.";
      state.labelsOn = true; // nothing to ask /v1/suggest for
    }
  } catch (error) {
    $("info").textContent = "The server's description could not be read.";
    showError(error);
  }
}

function setUp() {
  readToken();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setToken($("token").value);
    $("token-box").open = false;
    state.labelsOn = false;
    state.info = loadInfo();
    if ($("tab-label").getAttribute("aria-selected") === "true") selectTab($("tab-label"));
  });
  setUpTabs();
  setUpSearch();
  state.info = loadInfo();
}

setUp();
