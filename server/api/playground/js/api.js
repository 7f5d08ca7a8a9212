// Requests to this server's own APIs: /v1 with the API key, /admin with the admin key.
// Keys live in sessionStorage: they last as long as the browser tab, never on disk after it.

const KEY_NAMES = { api: "persona-server.api-key", admin: "persona-server.admin-key" };

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function getKey(scope) {
  return sessionStorage.getItem(KEY_NAMES[scope]);
}

export function setKey(scope, value) {
  if (value) sessionStorage.setItem(KEY_NAMES[scope], value);
  else sessionStorage.removeItem(KEY_NAMES[scope]);
}

export function forgetKeys() {
  for (const name of Object.values(KEY_NAMES)) sessionStorage.removeItem(name);
}

function scopeOf(path) {
  return path.startsWith("/admin") ? "admin" : "api";
}

function authHeaders(path, extra = {}) {
  const key = getKey(scopeOf(path));
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The server answers errors as OpenAI error objects: show their message, as a client would.
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message);
}

export async function request(path, { method = "GET", json, form, headers = {}, signal } = {}) {
  const init = { method, headers: authHeaders(path, headers), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJson(path, options) {
  return (await request(path, options)).json();
}

export async function sendJson(method, path, json, options = {}) {
  const response = await request(path, { ...options, method, json });
  return response.status === 204 ? null : response.json();
}

export async function getBlob(path) {
  return (await request(path)).blob();
}

// Server-sent events of a streamed completion, parsed: yields each chunk's JSON.
export async function* streamChunks(path, body, signal) {
  const response = await request(path, { method: "POST", json: { ...body, stream: true }, signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message);
        yield chunk;
      }
    }
  }
}

// Poll a background job until it ends; onProgress gets a fraction in [0, 1].
export async function waitForJob(statusUrl, onProgress, intervalMs = 400) {
  for (;;) {
    const job = await getJson(statusUrl);
    // A job past the server's job limits waits in a queue: say where.
    const status = job.queue_position ? `queued (position ${job.queue_position})` : job.status;
    onProgress(job.progress, status);
    if (job.status === "succeeded") return job.result;
    if (job.status === "failed") throw new ApiError(500, job.error || "the job failed");
    // Cancelled (here or by anyone else): the job will never end otherwise.
    if (job.status === "cancelled") throw new ApiError(409, `the ${job.kind} job was cancelled`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}
