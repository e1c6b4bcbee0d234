// The /v1 JSON API: bearer key, errors as readable messages, server-sent events over fetch.
const KEY_ITEM = "llama-mesh.api-key";

export function apiKey() {
  return localStorage.getItem(KEY_ITEM) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_ITEM, key);
  else localStorage.removeItem(KEY_ITEM);
}

/** An error of the API, with the HTTP status and a message a person can act on. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(extra = {}) {
  const h = { accept: "application/json", ...extra };
  const key = apiKey();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

async function failure(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = body.message || body.detail || JSON.stringify(body);
  } catch {
    detail = response.statusText;
  }
  if (response.status === 401) {
    const what = apiKey()
      ? "The API key was refused: enter a valid key above."
      : "This server needs an API key: enter it above.";
    return new ApiError(401, `${what} (401: ${detail})`);
  }
  if (response.status === 403) {
    return new ApiError(403, `This API key may not do that; an admin key is needed. (403: ${detail})`);
  }
  return new ApiError(response.status, `${response.status}: ${detail}`);
}

/** Calls a /v1 route; resolves to the parsed JSON body, rejects with an ApiError. */
export async function call(method, path, body, signal) {
  const init = { method, headers: headers(), signal };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(`/v1${path}`, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

/** Reads a server-sent-events route; calls onData with each event's parsed JSON. */
export async function stream(path, onData, signal) {
  const response = await fetch(`/v1${path}`, {
    headers: headers({ accept: "text/event-stream" }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (data) onData(JSON.parse(data));
    }
  }
}

/** Reads a newline-delimited JSON stream route; calls onData with each parsed line. */
export async function lines(path, onData, signal) {
  const response = await fetch(`/v1${path}`, { headers: headers(), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (line) onData(JSON.parse(line));
    }
    if (done) break;
  }
  if (buffer.trim()) onData(JSON.parse(buffer));
}
