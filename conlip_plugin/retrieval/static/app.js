"use strict";
// The search page of conlip-retrieval serve: plain DOM calls against the JSON API. A new search aborts
// the one in flight, so the grid always answers the latest query; while one is in flight the grid still
// shows the previous answer, dimmed and marked aria-busy. Errors show the API's own
// {"detail": "..."} message, which says what to change.

const $ = (id) => document.getElementById(id);

async function api(url, options) {
  const response = await fetch(url, options);
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch (parseError) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : text.slice(0, 300);
    throw new Error(`${detail || response.statusText} (HTTP ${response.status})`);
  }
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

let current = null; // the AbortController of the search in flight

function card(result) {
  const item = document.createElement("article");
  item.className = "result";
  item.dataset.row = result.row;
  item.title = result.path || result.key;

  const img = document.createElement("img");
  img.src = `/api/items/${result.row}/image`;
  img.alt = result.caption || result.key;
  img.loading = "lazy";

  const meta = document.createElement("div");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${result.rank}`;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = result.score.toFixed(3);
  meta.append(rank, score);

  const caption = document.createElement("p");
  caption.className = result.caption ? "caption" : "caption none";
  caption.textContent = result.caption || result.key;

  item.append(img, meta, caption);
  return item;
}

function render(data, label, started) {
  const grid = $("results");
  grid.replaceChildren(...data.results.map(card));
  const ms = Math.round(performance.now() - started);
  const n = data.results.length;
  $("status").textContent = `${n} result${n === 1 ? "" : "s"} for ${label}, against the ${data.against} (${ms} ms)`;
}

async function run(label, request) {
  if (current) {
    current.abort();
  }
  const controller = new AbortController();
  current = controller;
  showError("");
  $("status").textContent = `searching for ${label}…`;
  $("results").setAttribute("aria-busy", "true");
  const started = performance.now();
  try {
    const data = await request(controller.signal);
    if (controller === current) {
      render(data, label, started);
    }
  } catch (error) {
    if (controller === current) {
      showError(error.message);
      $("results").replaceChildren();
      $("status").textContent = "";
    }
  } finally {
    if (controller === current) {
      current = null;
      $("results").removeAttribute("aria-busy");
    }
  }
}

function showQueryImage(file) {
  const preview = $("query-image");
  if (preview.src) {
    URL.revokeObjectURL(preview.src);
    preview.removeAttribute("src");
  }
  if (file) {
    preview.src = URL.createObjectURL(file);
  }
  preview.hidden = !file;
}

function searchText() {
  const text = $("query").value;
  showQueryImage(null);
  const params = new URLSearchParams({ text, k: $("k").value, against: $("against").value });
  return run(`“${text}”`, (signal) => api(`/api/search?${params}`, { signal }));
}

function searchImage(file) {
  showQueryImage(file);
  const form = new FormData();
  form.append("file", file);
  form.append("k", $("k").value);
  form.append("against", $("against").value);
  return run(`the image ${file.name}`, (signal) => api("/api/search/image", { method: "POST", body: form, signal }));
}

async function showInfo() {
  try {
    const info = await api("/api/info");
    const c = info.counts;
    const kinds = [...new Set(Object.values(info.search).map((s) => s.kind))].join(" / ");
    const skipped = c.skipped ? ` · ${c.skipped} skipped` : "";
    $("info").textContent = `${info.model} · ${c.items} images · ${c.captions} captions${skipped}`
      + ` · ${kinds} search · ${info.embed_dim} dimensions`;
    $("k").max = info.max_k;
  } catch (error) {
    $("info").textContent = "";
    showError(`cannot read the index description: ${error.message}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    searchText();
  });
  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0];
    if (file) {
      searchImage(file).finally(() => { $("upload").value = ""; });
    }
  });
  showInfo();
});
