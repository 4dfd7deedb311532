// The consult page of `skingpt4 serve --ui`: photos and questions go to this same server's
// OpenAI-compatible API (POST v1/chat/completions, streamed as Server-Sent Events), with the
// whole conversation each turn and one x-session-id per consult, so the server's prefix cache
// and consult routing see one conversation. Nothing is kept but the API key, in this tab's
// sessionStorage. Model output is untrusted text: it is only ever set with textContent.

const DEFAULT_QUESTION = "What's wrong with my skin?"; // plugins/skingpt4/template.py
const MAX_SIDE_PX = 448; // photos are shrunk here; the model sees 224 x 224
const JPEG_QUALITY = 0.9;
const MAX_TOKENS = 256;
const KEY_ITEM = "skingpt4.apiKey";

const $ = (id) => document.getElementById(id);
const ui = {
  key: $("api-key"), keyForm: $("key-form"), takePhoto: $("take-photo"),
  choosePhotos: $("choose-photos"), dropZone: $("drop-zone"), photos: $("photos"),
  turns: $("turns"), status: $("status"), error: $("error"), form: $("ask-form"),
  question: $("question"), send: $("send"), stop: $("stop"), newConsult: $("new-consult"),
};

// A refusal answered with an HTTP status, and an error event at the end of a stream.
class Refusal extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}
class StreamError extends Error {}

function sessionId() {
  if (crypto.randomUUID) return crypto.randomUUID(); // only in secure contexts (https, localhost)
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; // UUID version 4
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return hex.replace(/^(.{8})(.{4})(.{4})(.{4})/, "$1-$2-$3-$4-");
}

// One consult: the messages sent so far, the photos for the next question, the stream running.
const freshConsult = () => ({ id: sessionId(), messages: [], pending: [], controller: null });
let consult = freshConsult();
let modelId = null; // from v1/models, asked with the key

// ---- photos ----

async function shrink(file) {
  const bitmap = await createImageBitmap(file); // applies the photo's EXIF orientation
  const scale = Math.min(1, MAX_SIDE_PX / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return canvas.toDataURL("image/jpeg", JPEG_QUALITY);
}

async function addPhotos(files) {
  clearError();
  const unread = [];
  for (const file of files) {
    try {
      consult.pending.push(await shrink(file));
    } catch {
      unread.push(file.name);
    }
  }
  renderPhotos();
  if (unread.length) showError(`This file could not be read as a photo: ${unread.join(", ")}.`);
}

function renderPhotos() {
  ui.photos.replaceChildren(...consult.pending.map((url, i) => {
    const item = document.createElement("li");
    const img = document.createElement("img");
    img.src = url;
    img.alt = `Photo ${i + 1}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove photo ${i + 1}`);
    remove.addEventListener("click", () => {
      consult.pending.splice(i, 1);
      renderPhotos();
      const next = ui.photos.querySelectorAll("button")[Math.min(i, consult.pending.length - 1)];
      (next ?? ui.choosePhotos).focus(); // the focus stays among the photos, or goes back
    });
    item.append(img, remove);
    return item;
  }));
}

// ---- the conversation ----

function addTurn(role, text, photos = []) {
  const item = document.createElement("li");
  item.className = `turn ${role}`;
  const who = document.createElement("p");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "SkinGPT-4";
  item.append(who);
  if (photos.length) {
    const strip = document.createElement("div");
    strip.className = "turn-photos";
    photos.forEach((url, i) => {
      const img = document.createElement("img");
      img.src = url;
      img.alt = `Photo ${i + 1} sent with this question`;
      strip.append(img);
    });
    item.append(strip);
  }
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text;
  item.append(body);
  ui.turns.append(item);
  return { item, body };
}

function userMessage(question, photos) {
  if (!photos.length) return { role: "user", content: question };
  const parts = photos.map((url) => ({ type: "image_url", image_url: { url } }));
  return { role: "user", content: [...parts, { type: "text", text: question }] };
}

function authHeaders() {
  const key = ui.key.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function refusal(response) {
  let message = "";
  try {
    message = (await response.json()).error?.message ?? "";
  } catch { /* not JSON: the status alone says enough */ }
  return new Refusal(response.status, String(message), response.headers.get("retry-after"));
}

async function model(signal) {
  if (!modelId) {
    const response = await fetch("v1/models", { headers: authHeaders(), signal });
    if (!response.ok) throw await refusal(response);
    modelId = (await response.json()).data[0].id;
  }
  return modelId;
}

// The text deltas of a chat completions stream: `data: {json}` lines, up to `data: [DONE]`.
async function* deltas(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      const lines = (buffer + value).split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        let event;
        try {
          event = JSON.parse(data);
        } catch {
          throw new StreamError("the answer could not be read");
        }
        if (event.error) throw new StreamError(event.error.message ?? "unknown error");
        const text = event.choices?.[0]?.delta?.content;
        if (text) yield text;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function ask(event) {
  event.preventDefault();
  if (consult.controller) return;
  clearError();
  const c = consult;
  const typed = ui.question.value;
  const question = typed.trim() || DEFAULT_QUESTION;
  const photos = c.pending;
  if (!c.messages.length && !photos.length) {
    showError("Add a photo of the skin first: the model answers about photos.");
    ui.choosePhotos.focus();
    return;
  }
  c.messages.push(userMessage(question, photos));
  const asked = addTurn("user", question, photos);
  const answered = addTurn("assistant", "");
  c.pending = [];
  renderPhotos();
  ui.question.value = "";
  c.controller = new AbortController();
  setBusy(true);
  let answer = "";
  try {
    const signal = c.controller.signal;
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json", "x-session-id": c.id },
      body: JSON.stringify({ model: await model(signal), messages: c.messages, stream: true,
                             max_tokens: MAX_TOKENS }),
      signal,
    });
    if (!response.ok) throw await refusal(response);
    for await (const text of deltas(response.body)) {
      answer += text;
      answered.body.textContent = answer.trimStart();
    }
    if (!answer) answered.body.textContent = "(The model gave no answer.)";
    c.messages.push({ role: "assistant", content: answer });
  } catch (error) {
    if (c !== consult) return; // "New consult" was pressed: that consult is gone
    if (error.name === "AbortError") ui.status.textContent = "Stopped.";
    else showError(sentence(error));
    if (error.status === 401) ui.key.focus();
    if (answer) { // what came is kept, as the person saw it
      c.messages.push({ role: "assistant", content: answer });
    } else { // nothing came: the question and its photos go back, to ask again
      c.messages.pop();
      asked.item.remove();
      answered.item.remove();
      c.pending = [...photos, ...c.pending];
      renderPhotos();
      if (!ui.question.value) ui.question.value = typed;
    }
  } finally {
    if (c === consult) {
      c.controller = null;
      setBusy(false);
    }
  }
}

// One plain sentence per kind of failure; the server's own message where it names the problem.
function sentence(error) {
  const detail = (m) => (m ? `: ${m.replace(/[.\s]+$/, "")}.` : ".");
  if (error instanceof StreamError) return `The answer stopped on a server error${detail(error.message)}`;
  if (!(error instanceof Refusal)) return "The server could not be reached. Check your connection and ask again.";
  const { status, message } = error;
  if (status === 401) {
    return ui.key.value.trim()
      ? "The server did not accept this API key. Check the key and ask again."
      : "This server needs an API key. Enter it in the API key field and ask again.";
  }
  if (status === 413) return `A photo is too large for this server${detail(message)} Try a smaller photo.`;
  if (status === 429 || status === 503) {
    const s = Number.parseInt(error.retryAfter, 10);
    const wait = s > 0 ? `${s} second${s === 1 ? "" : "s"}` : "a few seconds";
    return `The server is busy. Ask again in ${wait}.`;
  }
  if (status >= 400 && status < 500) return `The server refused the question${detail(message)}`;
  return `The server could not answer (error ${status})${detail(message)}`;
}

// ---- page state ----

const ANSWERING = "SkinGPT-4 is answering…";

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.turns.setAttribute("aria-busy", String(busy)); // read out once the answer is whole
  if (busy) {
    ui.status.textContent = ANSWERING;
    return;
  }
  if (ui.status.textContent === ANSWERING) ui.status.textContent = "";
  // A disabled button loses the focus; the question field takes it back.
  if (!document.activeElement || document.activeElement === document.body) ui.question.focus();
}

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.textContent = "";
  ui.error.hidden = true;
}

function newConsult() {
  consult.controller?.abort();
  consult = freshConsult();
  ui.turns.replaceChildren();
  renderPhotos();
  ui.question.value = "";
  clearError();
  setBusy(false);
  ui.status.textContent = "New consult: the previous one is cleared.";
  ui.question.focus();
}

// ---- wiring (no inline handlers: the page's Content-Security-Policy forbids them) ----

ui.question.placeholder = DEFAULT_QUESTION;
ui.key.value = sessionStorage.getItem(KEY_ITEM) ?? "";
ui.key.addEventListener("input", () => {
  const key = ui.key.value.trim();
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
  modelId = null;
});
ui.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  ui.question.focus();
});
for (const input of [ui.takePhoto, ui.choosePhotos]) {
  input.addEventListener("change", async () => {
    await addPhotos([...input.files]);
    input.value = ""; // the same photo can be chosen again after it is removed
  });
}
// Photos dropped anywhere on the page are added; elsewhere the browser would open them.
document.addEventListener("dragover", (e) => {
  e.preventDefault();
  ui.dropZone.classList.add("dragging");
});
document.addEventListener("dragleave", (e) => {
  if (!e.relatedTarget) ui.dropZone.classList.remove("dragging");
});
document.addEventListener("drop", (e) => {
  e.preventDefault();
  ui.dropZone.classList.remove("dragging");
  addPhotos([...(e.dataTransfer?.files ?? [])]);
});
ui.question.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.form.addEventListener("submit", ask);
ui.stop.addEventListener("click", () => consult.controller?.abort());
ui.newConsult.addEventListener("click", newConsult);
