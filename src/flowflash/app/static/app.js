// flowflash's page: one form, a job card per submission that follows the job's server-sent events
// (read with fetch so that an API key can travel in a header), and the finished images in the same card.
// No dependencies, no build step; every text from the user or the server is set with textContent.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "flowflash.apiKey";
  const DISPLAY = 256; // px: images smaller than this are shown scaled up, pixelated
  const state = { models: [], limits: null, loading: null, submitting: false, active: [] };
  window.flowflashPreviews = 0; // previews shown since the page loaded (tests read it)

  // ------------------------------------------------------------------ talking to the server
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function storedKey() {
    try {
      return localStorage.getItem(KEY_STORE) || "";
    } catch {
      return "";
    }
  }

  function saveKey(key) {
    try {
      if (key) localStorage.setItem(KEY_STORE, key);
      else localStorage.removeItem(KEY_STORE);
    } catch {
      /* storage may be off: the key then lives as long as the page */
    }
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = $("apikey").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorDetail(res) {
    let text = "";
    try {
      text = await res.text();
    } catch {
      /* the body is gone: the status says enough */
    }
    try {
      const j = JSON.parse(text);
      const d = j.detail ?? (j.error && j.error.message) ?? j.error;
      if (typeof d === "string" && d) return d;
      if (d) return JSON.stringify(d);
    } catch {
      /* not JSON */
    }
    return `HTTP ${res.status} ${res.statusText}`.trim() + (text ? `: ${text.slice(0, 200)}` : "");
  }

  async function api(method, path, body, signal) {
    let res;
    try {
      res = await fetch(path, {
        method,
        headers: headers(body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: "no-store",
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "cannot reach the server (is `flowflash serve` still running?)");
    }
    if (res.status === 401) askForKey();
    if (!res.ok) throw new ApiError(res.status, await errorDetail(res));
    return res;
  }

  function askForKey() {
    const row = $("apikey-row");
    if (row.hidden) {
      row.hidden = false;
      $("apikey").focus();
    }
  }

  // ------------------------------------------------------------------ the form
  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function currentModel() {
    return state.models.find((m) => m.name === $("model").value) || state.models[0];
  }

  function applyModel(force) {
    const m = currentModel();
    if (!m) return;
    const fill = (id, v) => {
      if (force || $(id).value === "") $(id).value = v ?? "";
    };
    fill("steps", m.steps);
    // A distilled student samples well only at the counts it was trained for: offer those, say which they are.
    const trained = m.trained_steps || [];
    $("steps-trained").replaceChildren(...trained.map((k) => new Option(String(k), String(k))));
    $("steps-hint").textContent = trained.length ? `(trained: ${trained.join(", ")})` : "";
    fill("guidance", m.guidance);
    fill("width", m.width);
    fill("height", m.height);
    showStyleBox(m);
  }

  // A model with a default style appends it to a prompt that names none: say so, and let it be turned off.
  function showStyleBox(m) {
    $("as-typed-row").hidden = !(m && m.default_style);
    $("as-typed-hint").textContent =
      m && m.default_style ? `(else ", ${m.default_style}" is added when no style is named and it fits)` : "";
  }

  async function loadModels() {
    if (state.loading) return state.loading;
    state.loading = (async () => {
      try {
        const data = await (await api("GET", "/api/models")).json();
        state.models = data.models || [];
        state.limits = data.limits || null;
        const select = $("model");
        select.replaceChildren(...state.models.map((m) => new Option(m.name, m.name, m.default, m.default)));
        if (state.limits) {
          $("n").max = state.limits.max_images;
          $("steps").max = state.limits.max_steps;
          $("prompt").maxLength = state.limits.max_prompt_chars;
        }
        applyModel(false);
        hideError();
      } catch (e) {
        showError(e.status === 401 ? `${e.message} (enter the key below)` : `cannot load the models: ${e.message}`);
      } finally {
        state.loading = null;
      }
    })();
    return state.loading;
  }

  function number(id, label, { integer = true, required = false } = {}) {
    const el = $(id);
    if (el.validity && el.validity.badInput) throw new Error(`${label} is not a number`);
    const text = el.value.trim();
    if (text === "") {
      if (required) throw new Error(`${label} is empty`);
      return null;
    }
    const v = Number(text);
    if (!Number.isFinite(v)) throw new Error(`${label} is not a number`);
    if (integer && !Number.isInteger(v)) throw new Error(`${label} must be a whole number, got ${text}`);
    return v;
  }

  function readForm() {
    const prompt = $("prompt").value;
    if (!prompt.trim()) throw new Error("write a prompt first");
    let steps = number("steps", "steps");
    const m = currentModel();
    // The model's own step count goes as null: a distilled model then keeps its tuned fixed schedule,
    // which an explicit count would replace by a uniform one.
    if (m && steps === m.steps) steps = null;
    return {
      prompt,
      model: $("model").value || null,
      n: number("n", "number of images", { required: true }),
      steps,
      guidance: number("guidance", "guidance", { integer: false }),
      seed: number("seed", "seed"),
      width: number("width", "width"),
      height: number("height", "height"),
      negative_prompt: $("negative").value.trim() || null,
      as_typed: !$("as-typed-row").hidden && $("as-typed").checked,
      previews: true,
    };
  }

  async function submit() {
    if (state.submitting) return;
    state.submitting = true;
    $("generate").disabled = true;
    hideError();
    try {
      if (!state.models.length) {
        await loadModels();
        if (!state.models.length) return;
      }
      let body;
      try {
        body = readForm();
      } catch (e) {
        showError(e.message);
        return;
      }
      try {
        const info = await (await api("POST", "/api/jobs", body)).json();
        follow(newJob(info, body));
      } catch (e) {
        showError(e.message);
      }
    } finally {
      state.submitting = false;
      $("generate").disabled = false;
    }
  }

  // ------------------------------------------------------------------ job cards
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function displaySize(w, h) {
    const side = Math.max(w, h);
    if (!(side > 0)) return { w: DISPLAY, h: DISPLAY, small: true };
    if (side >= DISPLAY) return { w, h, small: false };
    return { w: Math.round((w * DISPLAY) / side), h: Math.round((h * DISPLAY) / side), small: true };
  }

  function newJob(info, body) {
    const model = state.models.find((m) => m.name === body.model) || currentModel() || {};
    const job = {
      id: info.id,
      seeds: info.seeds || [],
      body,
      width: body.width || model.width,
      height: body.height || model.height,
      abort: new AbortController(),
      finished: false,
      cancelling: false,
      previews: 0,
    };
    const card = el("article", "job");
    card.dataset.id = job.id;
    card.dataset.state = "queued";
    card.dataset.previews = "0";

    const head = el("div", "job-head");
    const title = el("p", "job-prompt", body.prompt);
    title.title = body.prompt;
    const cancel = el("button", "cancel-job", "Cancel");
    cancel.type = "button";
    cancel.addEventListener("click", () => cancelJob(job));
    head.append(title, cancel);

    const last = job.seeds[job.seeds.length - 1];
    const seeds = job.seeds.length > 1 ? `seeds ${job.seeds[0]}–${last}` : `seed ${job.seeds[0]}`;
    const meta = el("p", "job-meta muted", `${body.model || model.name || ""} · ${seeds}`);

    const bar = el("div", "progress");
    const fill = el("div", "fill");
    bar.append(fill);
    const status = el("p", "status", "submitted");

    const preview = el("img", "preview");
    preview.alt = "live preview";
    preview.hidden = true;
    const ps = displaySize(job.width, job.height);
    preview.style.height = `${Math.min(ps.h, DISPLAY)}px`;

    const results = el("div", "results");
    card.append(head, meta, bar, status, preview, results);
    job.card = card;
    job.els = { status, fill, preview, results, cancel, meta };
    state.active.push(job);
    updateCancel();
    setQueued(job, info.position);
    $("gallery").prepend(card);
    return job;
  }

  function setStatus(job, text, kind) {
    job.els.status.textContent = text;
    if (kind) job.card.dataset.state = kind;
  }

  function setQueued(job, position) {
    if (!position) return; // 0: it left the queue already; `started` follows
    setStatus(job, position > 1 ? `queued: ${position - 1} ahead` : "queued: next", "queued");
  }

  function updateCancel() {
    $("cancel").disabled = !state.active.some((j) => !j.finished && !j.cancelling);
  }

  function finish(job, kind, text) {
    if (job.finished) return;
    job.finished = true;
    setStatus(job, text, kind);
    job.els.cancel.disabled = true;
    job.els.cancel.hidden = true;
    state.active = state.active.filter((j) => j !== job);
    updateCancel();
  }

  function onEvent(job, type, data) {
    if (job.finished) return;
    switch (type) {
      case "queued":
        setQueued(job, data.position);
        break;
      case "started":
        setStatus(job, "started", "running");
        break;
      case "step": {
        setStatus(job, `step ${data.step}/${data.steps}`, "running");
        job.els.fill.style.width = `${(100 * data.step) / Math.max(1, data.steps)}%`;
        if (data.preview) {
          job.els.preview.src = "data:image/png;base64," + data.preview;
          job.els.preview.hidden = false;
          job.previews += 1;
          job.card.dataset.previews = String(job.previews);
          window.flowflashPreviews += 1;
        }
        break;
      }
      case "done":
        showResult(job, data);
        break;
      case "failed":
        finish(job, "failed", `failed: ${data.error || "unknown error"}`);
        break;
      case "cancelled":
        finish(job, "cancelled", "cancelled");
        break;
      default: // an event this page does not know: ignore it
    }
  }

  function param(dl, name, value) {
    if (value === undefined || value === null || value === "") return;
    dl.append(el("dt", null, name), el("dd", null, String(value)));
  }

  function showResult(job, d) {
    const p = d.parameters || {};
    const seeds = d.seeds || job.seeds;
    const size = displaySize(p.width || job.width, p.height || job.height);
    (d.images || []).forEach((b64, k) => {
      const src = "data:image/png;base64," + b64;
      const seed = seeds[k];
      const fig = el("figure", "result-item");
      const img = el("img", "result" + (size.small ? " pixelated" : ""));
      img.src = src;
      img.alt = `${p.prompt || job.body.prompt} (seed ${seed})`;
      img.style.width = `${size.w}px`;
      img.style.aspectRatio = `${size.w} / ${size.h}`;
      const link = el("a", "download", "download");
      link.href = src;
      link.download = `flowflash-${seed}.png`;
      const cap = el("figcaption", null, `seed ${seed} `);
      cap.append(link);
      fig.append(img, cap);
      job.els.results.append(fig);
    });
    const dl = el("dl", "params");
    param(dl, "prompt", p.prompt);
    // (the prompt is drawn trimmed: only a change beyond whitespace is news)
    if (p.drawn_as && p.drawn_as !== (p.prompt ?? "").trim()) param(dl, "drawn as", p.drawn_as);
    param(dl, "negative", p.negative_prompt);
    param(dl, "model", p.model);
    param(dl, seeds.length > 1 ? "seeds" : "seed", seeds.join(", "));
    param(dl, "steps", p.steps);
    param(dl, "guidance", p.guidance);
    if (p.width && p.height) param(dl, "size", `${p.width}×${p.height}`);
    if (typeof p.seconds === "number") param(dl, "seconds", p.seconds.toFixed(2));
    const reuse = el("button", "reuse", "Use these settings");
    reuse.type = "button";
    reuse.addEventListener("click", () => reuseSettings(p, seeds));
    job.els.results.after(dl, reuse);
    job.els.preview.hidden = true;
    job.els.fill.style.width = "100%";
    const secs = typeof p.seconds === "number" ? ` in ${p.seconds.toFixed(2)} s` : "";
    finish(job, "done", `done${secs}`);
  }

  function reuseSettings(p, seeds) {
    if (p.model && state.models.some((m) => m.name === p.model)) $("model").value = p.model;
    $("prompt").value = p.prompt ?? "";
    $("negative").value = p.negative_prompt ?? "";
    $("as-typed").checked = !!p.as_typed;
    showStyleBox(currentModel());  // the model may have changed above
    $("steps").value = p.steps ?? "";
    $("guidance").value = p.guidance ?? "";
    $("seed").value = seeds.length ? seeds[0] : "";
    $("width").value = p.width ?? "";
    $("height").value = p.height ?? "";
    $("n").value = Math.max(1, seeds.length);
    $("prompt").focus();
    window.scrollTo({ top: 0, behavior: "smooth" });
  }

  // ------------------------------------------------------------------ server-sent events over fetch
  /** A parser for the text/event-stream format: feed it text as it arrives; it calls emit(type, data). */
  function sseParser(emit) {
    let buf = "";
    let type = "";
    let data = [];
    const line = (s) => {
      if (s === "") {
        if (data.length) emit(type || "message", data.join("\n"));
        type = "";
        data = [];
        return;
      }
      if (s[0] === ":") return; // a comment (keep-alive)
      const colon = s.indexOf(":");
      const field = colon < 0 ? s : s.slice(0, colon);
      let value = colon < 0 ? "" : s.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
    };
    return (text, end = false) => {
      buf += text;
      let hold = "";
      if (!end && buf.endsWith("\r")) {
        hold = "\r"; // maybe the first half of \r\n: wait for the next chunk
        buf = buf.slice(0, -1);
      }
      const lines = buf.split(/\r\n|\r|\n/);
      buf = (end ? "" : lines.pop()) + hold;
      lines.forEach(line);
      if (end) line("");
    };
  }

  async function follow(job) {
    for (let attempt = 0; attempt < 3 && !job.finished; attempt++) {
      if (!(await stream(job))) return;
      // The stream ended without a final event: ask for the job's state; if it still runs, listen again
      // (the server replays a job's events from the start).
      if (await settle(job)) return;
    }
    if (!job.finished) finish(job, "failed", "failed: the server closed the event stream early");
  }

  async function settle(job) {
    try {
      const path = `/api/jobs/${encodeURIComponent(job.id)}`;
      const view = await (await api("GET", path, undefined, job.abort.signal)).json();
      if (view.status === "done") showResult(job, view);
      else if (view.status === "failed") finish(job, "failed", `failed: ${view.error || "unknown error"}`);
      else if (view.status === "cancelled") finish(job, "cancelled", "cancelled");
      return job.finished;
    } catch (e) {
      if (!job.finished) finish(job, e.name === "AbortError" ? "cancelled" : "failed",
                               e.name === "AbortError" ? "cancelled" : `failed: ${e.message}`);
      return true;
    }
  }

  /** Follows the job's events until the stream ends; true when it ended before the job did. */
  async function stream(job) {
    try {
      const res = await api("GET", `/api/jobs/${encodeURIComponent(job.id)}/events`, undefined, job.abort.signal);
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      const feed = sseParser((type, text) => {
        let data = {};
        try {
          data = JSON.parse(text);
        } catch {
          return; // not ours
        }
        onEvent(job, type, data);
      });
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        feed(decoder.decode(value, { stream: true }));
      }
      feed(decoder.decode(), true);
      if (!job.finished) job.card.dataset.streamEnds = String(Number(job.card.dataset.streamEnds || 0) + 1);
      return !job.finished;
    } catch (e) {
      if (job.finished) return false;
      if (e.name === "AbortError") finish(job, "cancelled", "cancelled");
      else finish(job, "failed", `failed: ${e.message}`);
      return false;
    }
  }

  async function cancelJob(job) {
    if (job.finished || job.cancelling) return;
    job.cancelling = true;
    job.els.cancel.disabled = true;
    updateCancel();
    setStatus(job, "cancelling…");
    let view = null;
    try {
      view = await (await api("DELETE", `/api/jobs/${encodeURIComponent(job.id)}`)).json();
    } catch {
      /* closing the stream below cancels it as well */
    }
    if (view && (view.status === "done" || view.status === "failed")) {
      job.cancelling = false; // it finished first: its result is already on the stream
      return;
    }
    finish(job, "cancelled", "cancelled");
    job.abort.abort();
  }

  // ------------------------------------------------------------------ wiring
  function init() {
    const key = storedKey();
    $("apikey").value = key;
    $("apikey").addEventListener("change", () => {
      saveKey($("apikey").value.trim());
      if (!state.models.length) loadModels();
    });
    $("form").addEventListener("submit", (e) => {
      e.preventDefault();
      submit();
    });
    const submitKeys = (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        submit();
      }
    };
    $("prompt").addEventListener("keydown", submitKeys);
    $("negative").addEventListener("keydown", submitKeys);
    $("model").addEventListener("change", () => applyModel(true));
    $("cancel").addEventListener("click", () => {
      const newest = [...state.active].reverse().find((j) => !j.finished && !j.cancelling);
      if (newest) cancelJob(newest);
    });
    loadModels();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
