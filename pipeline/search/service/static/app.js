"use strict";
// The page of `videosearch serve`: a text search, results as cards (thumbnail, time range, score), a card
// plays its video in place from the segment's start, and "More like this" shows the nearest rows.

const K = 24;
const KEY = "videosearch-api-key";
const $ = (id) => document.getElementById(id);
let apiKey = localStorage.getItem(KEY) || "";
let pending = null; // what to run again once an API key is given
let last = null; // what the results on the page answer: run again when "one result per video" changes

async function api(path, init = {}) {
  const headers = { ...(init.headers || {}), ...(apiKey ? { "X-API-Key": apiKey } : {}) };
  const response = await fetch(path, { ...init, headers });
  const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (response.status === 401) {
    $("key").hidden = false;
    $("api-key").focus();
  }
  if (!response.ok) throw new Error(body.error);
  return body;
}

function status(text, failed = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", failed);
}

async function showLibrary() {
  try {
    const health = await api("/healthz");
    $("library").textContent =
      `version ${health.version} · ${health.videos} videos · ${health.segments} segments`;
  } catch (err) {
    $("library").textContent = `library unavailable: ${err.message}`;
  }
}

const seconds = (s) => `${s.toFixed(1)} s`;
const fileName = (uri) => uri.split("/").pop();

function play(thumb, hit) {
  const video = document.createElement("video");
  video.controls = true;
  video.muted = true; // muted videos may start without a gesture on every browser
  video.playsInline = true;
  video.poster = thumb.querySelector("img").src;
  video.src = `${hit.play_url}#t=${hit.start_s},${hit.end_s}`;
  thumb.replaceWith(video);
  video.play().catch(() => {}); // refused autoplay: the controls remain
}

function card(hit) {
  const node = $("card").content.firstElementChild.cloneNode(true);
  // the row's id, exact: a JSON number past 2^53 (hit.id) loses digits in JavaScript, its URL does not
  node.dataset.id = new URL(hit.similar_url, location.href).pathname.split("/")[2];
  const thumb = node.querySelector(".thumb");
  const img = thumb.querySelector("img");
  img.src = hit.thumbnail_url;
  img.alt = `${fileName(hit.uri)} at ${seconds(hit.start_s)}`;
  node.querySelector(".time").textContent = `${seconds(hit.start_s)} – ${seconds(hit.end_s)}`;
  node.querySelector(".score").textContent = `score ${hit.score.toFixed(3)}`;
  const name = node.querySelector(".name");
  name.textContent = fileName(hit.uri);
  name.title = hit.uri;
  if (hit.play_url) {
    thumb.addEventListener("click", () => play(thumb, hit));
  } else {
    thumb.disabled = true;
    thumb.title = "this video's storage cannot be played from here";
  }
  node.querySelector(".similar").addEventListener("click", () => run(() => moreLike(hit)));
  node.querySelector(".within").addEventListener("click", () => narrow(hit.uri));
  return node;
}

function show(heading, answer) {
  $("heading").textContent = heading;
  $("heading").hidden = false;
  $("results").replaceChildren(...answer.hits.map(card));
  status(answer.hits.length ? "" : "Nothing found.");
}

// "one result per video": each video's best segment, for the best videos (and "More like this" leaves the
// card's own video out); "Moments in this video": searches within that video until "whole library"
let under = null;
const narrowed = () =>
  `&per_video=${$("per-video").checked}` + (under ? `&under=${encodeURIComponent(under)}` : "");

function narrow(uri) {
  under = uri;
  $("scope").hidden = !uri;
  $("scope-name").textContent = uri ? fileName(uri) : "";
  $("scope-name").title = uri || "";
  window.scrollTo(0, 0);
  if (last) run(last);
}

async function search(q) {
  status("Searching…");
  const answer = await api(`/search?q=${encodeURIComponent(q)}&k=${K}${narrowed()}`);
  const cut = answer.truncated ? " (cut to the model's context: the words past it were not searched)" : "";
  const within = under ? ` within ${fileName(under)}` : "";
  show(`Results for “${answer.query}”${within} in version ${answer.version}${cut}`, answer);
}

async function like(file) {
  status(`Looking for videos like ${file.name}…`);
  const answer = await api(`/search/like?k=${K}${narrowed()}`, {
    method: "POST",
    headers: { "Content-Type": file.type || "application/octet-stream" },
    body: file,
  });
  const within = under ? ` within ${fileName(under)}` : "";
  show(`Videos like ${file.name}${within} in version ${answer.version}`, answer);
}

async function moreLike(hit) {
  status("Looking for similar videos…");
  const answer = await api(`${hit.similar_url}&k=${K}${narrowed()}`);
  show(`More like ${fileName(hit.uri)} at ${seconds(hit.start_s)} – ${seconds(hit.end_s)}`, answer);
  window.scrollTo(0, 0);
}

async function run(action) {
  pending = action;
  last = action;
  try {
    await action();
    pending = null;
  } catch (err) {
    status(err.message, true);
  }
}

$("per-video").addEventListener("change", () => {
  if (last) run(last);
});

$("unscope").addEventListener("click", () => narrow(null));

$("example").addEventListener("change", () => {
  const file = $("example").files[0];
  if (file) run(() => like(file));
});

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("q").value;
  run(() => search(q));
});

$("key").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("api-key").value;
  localStorage.setItem(KEY, apiKey);
  $("key").hidden = true;
  showLibrary();
  if (pending) run(pending);
});

showLibrary();
setInterval(showLibrary, 10000);
