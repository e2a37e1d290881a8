// The chat page: keeps the conversation, streams answers from /v1/chat/completions (server-sent events).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, conversation: [], busy: false, controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return { message: (body.error && body.error.message) || response.statusText, code: body.error && body.error.code };
  } catch (e) {
    return { message: response.status + " " + response.statusText, code: null };
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    const error = await errorMessage(response);
    showError(error.message + (response.status === 401 ? " (enter the API key under Settings)" : ""));
    return;
  }
  const body = await response.json();
  state.model = body.data[0].id;
  $("model-name").textContent = state.model;
  const documents = body.data[0].documents;  // the server was started with --index
  $("documents-switch").hidden = !documents;
  if (documents) {
    $("documents-info").textContent = "(" + documents.chunks + " passages of " + documents.files + " files)";
  }
  showError("");
  await loadLimits();
}

// The served model's context window (from /health) bounds "Max tokens"; left empty, the server answers with up to
// the rest of the context, so a first message never fails on the page's own settings.
async function loadLimits() {
  const response = await fetch("/health");
  if (!response.ok) return;
  const health = await response.json();
  if (health.context) {
    $("max-tokens").max = health.context;
    $("max-tokens").placeholder = "auto (context " + health.context + ")";
  }
}

function maxTokens() {
  const value = $("max-tokens").value.trim();
  return value ? { max_tokens: Number(value) } : {};
}

function requestMessages() {
  const system = $("system").value.trim();
  return (system ? [{ role: "system", content: system }] : []).concat(state.conversation);
}

// One streamed answer; returns the text, or throws {message, code}.
async function streamAnswer(bubble) {
  state.controller = new AbortController();
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(),
    signal: state.controller.signal,
    body: JSON.stringify({
      model: state.model,
      messages: requestMessages(),
      stream: true,
      temperature: Number($("temperature").value),
      ...maxTokens(),
      ...($("use-documents").checked ? { retrieval: { k: 4 } } : {}),
    }),
  });
  if (!response.ok) throw await errorMessage(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "", text = "", sources = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    const events = buffered.split("\n\n");
    buffered = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "").trim();
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw { message: chunk.error.message, code: chunk.error.code };
      if (chunk.sources) sources = chunk.sources;  // in the chunk that ends the answer
      const delta = chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) {
        text += delta.content;
        bubble.textContent = text;
        bubble.scrollIntoView({ block: "end" });
      }
    }
  }
  return { text: text, sources: sources };
}

// The sources an answer was given, under it: [n] file:lines (relevance) and the start of the passage.
function addSources(sources) {
  const box = document.createElement("div");
  box.className = "sources";
  box.textContent = sources.length ? "Sources:" : "Sources: nothing in your documents is relevant enough.";
  const list = document.createElement("ol");
  for (const source of sources) {
    const item = document.createElement("li");
    const where = document.createElement("span");
    where.className = "where";
    where.textContent = source.file + ":" + source.lines[0] + "-" + source.lines[1];
    const snippet = document.createElement("span");
    snippet.className = "snippet";
    const text = source.text.length > 160 ? source.text.slice(0, 160) + "…" : source.text;
    snippet.textContent = " (relevance " + source.relevance.toFixed(2) + ") " + text;
    item.append(where, snippet);
    list.appendChild(item);
  }
  if (sources.length) box.appendChild(list);
  $("messages").appendChild(box);
  box.scrollIntoView({ block: "end" });
}

async function send(content) {
  if (state.busy || !content.trim()) return;
  if (!state.model) await loadModel();
  if (!state.model) return;
  state.busy = true;
  $("send").disabled = true;
  showError("");
  addBubble("user", content);
  state.conversation.push({ role: "user", content: content });
  const bubble = addBubble("assistant streaming", "");
  try {
    for (;;) {
      try {
        const { text, sources } = await streamAnswer(bubble);
        state.conversation.push({ role: "assistant", content: text });
        if (!text) bubble.textContent = "(no answer)";
        if (sources) addSources(sources);
        break;
      } catch (error) {
        // Too long for the context window: forget the oldest exchange and ask again.
        if (error.code === "context_length_exceeded" && state.conversation.length > 2) {
          state.conversation.splice(0, 2);
          continue;
        }
        throw error;
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") {
      showError(error.message || String(error));
      state.conversation.pop();  // the question that got no answer
      bubble.remove();
    }
  } finally {
    bubble.classList.remove("streaming");
    state.busy = false;
    state.controller = null;
    $("send").disabled = false;
    $("input").focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const content = $("input").value;
  $("input").value = "";
  send(content);
});

$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.conversation = [];
  $("messages").replaceChildren();
  showError("");
});

$("api-key").addEventListener("change", () => {
  localStorage.setItem("ownllm-api-key", $("api-key").value);
  loadModel();
});

$("api-key").value = localStorage.getItem("ownllm-api-key") || "";
loadModel();
