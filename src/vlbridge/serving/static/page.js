// The page's only logic: pick an image, send it with the question to /v1/chat/completions with
// stream: true, and append each server-sent chunk's delta to the answer; when the server has an image
// index (GET /v1/index answers), search it with /v1/retrieve. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;
let image = null; // the chosen image as a data: URL

function setStatus(text, state) {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  setStatus("", "error");
}

function headers(extra = {}) {
  // `vlbridge serve --api-key KEY` wants it on every /v1 request
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorMessage(response) {
  // OpenAI-style {"error": {"message": ...}}; anything else is shown as it came
  const text = await response.text();
  try {
    return `${response.status}: ${JSON.parse(text).error.message}`;
  } catch {
    return `${response.status}: ${text || response.statusText}`;
  }
}

async function loadModel() {
  try {
    $("error").hidden = true;
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) throw new Error(await errorMessage(r));
    model = (await r.json()).data[0].id;
    $("model").textContent = model;
  } catch (e) {
    $("model").textContent = "unavailable";
    showError(`Could not list the served model: ${e.message}`);
  }
}

function useFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(`${file.name} is not an image`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    image = reader.result;
    $("preview").src = image;
    $("preview").alt = `Chosen image: ${file.name}`;
    $("preview").hidden = false;
    $("error").hidden = true;
  };
  reader.readAsDataURL(file);
}

async function ask(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("answer").textContent = "";
  if (!image) return showError("Choose an image first.");
  if (!model) await loadModel(); // shows why when it fails (a missing API key, say)
  if (!model) return;
  const question = $("question").value.trim();
  const content = question ? [{ type: "text", text: question }] : [];
  content.push({ type: "image_url", image_url: { url: image } });
  const body = {
    model,
    messages: [{ role: "user", content }],
    stream: true,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
  };
  $("submit").disabled = true;
  setStatus("Generating…", "running");
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (!r.ok) return showError(await errorMessage(r));
    const finish = await readStream(r.body);
    setStatus(`Done (finish reason: ${finish}).`, "done");
  } catch (e) {
    showError(`Request failed: ${e.message}`);
  } finally {
    $("submit").disabled = false;
  }
}

async function readStream(stream) {
  // Server-sent events: "data: {json}\n\n" per chunk, ending with "data: [DONE]"
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finish ?? "stop";
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices ?? []) {
          if (choice.delta?.content) $("answer").textContent += choice.delta.content;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  throw new Error("the stream ended before [DONE]");
}

async function loadIndex() {
  // the search box shows only when the server was started with --index (a 404 otherwise)
  try {
    const r = await fetch("/v1/index", { headers: headers() });
    if (!r.ok) return;
    const info = await r.json();
    $("index-size").textContent = `(${info.images} images)`;
    $("search").hidden = false;
  } catch {
    // no index to show: the section stays hidden
  }
}

function showSearchError(message) {
  $("search-error").textContent = message;
  $("search-error").hidden = false;
  $("search-status").textContent = "";
  $("search-status").dataset.state = "error";
}

async function imageURL(url) {
  // fetched rather than put in <img src>: an API key travels in a header, which <img> cannot send
  const r = await fetch(url, { headers: headers() });
  if (!r.ok) throw new Error(await errorMessage(r));
  return URL.createObjectURL(await r.blob());
}

async function search(event) {
  event.preventDefault();
  $("search-error").hidden = true;
  for (const img of $("results").querySelectorAll("img")) URL.revokeObjectURL(img.src);
  $("results").replaceChildren();
  const query = $("query").value.trim();
  if (!query) return showSearchError("Type what to look for.");
  const body = { query, top_k: Number($("top-k").value) };
  if (model) body.model = model;
  $("search-submit").disabled = true;
  $("search-status").textContent = "Searching…";
  $("search-status").dataset.state = "running";
  try {
    const r = await fetch("/v1/retrieve", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (!r.ok) return showSearchError(await errorMessage(r));
    const hits = (await r.json()).data;
    for (const hit of hits) {
      const item = document.createElement("li");
      const img = document.createElement("img");
      img.alt = hit.name;
      const label = document.createElement("span");
      label.textContent = `${hit.name} (score ${hit.score.toFixed(2)})`;
      item.append(img, label);
      $("results").append(item);
      img.src = await imageURL(hit.url);
    }
    $("search-status").textContent = `${hits.length} best matches, best first.`;
    $("search-status").dataset.state = "done";
    $("search").scrollIntoView({ block: "start" });
  } catch (e) {
    showSearchError(`Search failed: ${e.message}`);
  } finally {
    $("search-submit").disabled = false;
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  useFile(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => useFile(e.target.files[0]));
$("ask").addEventListener("submit", ask);
$("search-form").addEventListener("submit", search);
$("api-key").addEventListener("change", () => {
  loadModel();
  loadIndex();
});
loadModel();
loadIndex();
