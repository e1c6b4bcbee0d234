// The llama-mesh console: pages over the /v1 API only. Data is put in the page with
// textContent (never as HTML).
import { ApiError, apiKey, call, lines, setApiKey, stream } from "./api.js";

const main = document.getElementById("main");
const errorBox = document.getElementById("error");
const TERMINAL = new Set(["TASK_STATUS_SUCCEEDED", "TASK_STATUS_FAILED", "TASK_STATUS_CANCELLED"]);
const REFRESH_MS = 2000;
let page = new AbortController();

/** An element with attributes (on* as listeners) and children (strings become text). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const enc = encodeURIComponent;
const short = (status, prefix) => (status || "").replace(prefix, "");
const taskStatus = (s) => short(s, "TASK_STATUS_");
const when = (t) => (t ? new Date(t).toLocaleString() : "–");
const pretty = (value) => JSON.stringify(value, null, 2);

function badge(text) {
  return h("span", { class: `status status-${text}` }, text);
}

function showError(err) {
  if (err?.name === "AbortError") return;
  errorBox.textContent = err?.message || String(err);
  errorBox.hidden = false;
}

function clearError() {
  errorBox.hidden = true;
  errorBox.textContent = "";
}

/** Runs an action of the page, showing its failure in the error box. */
async function attempt(action) {
  try {
    clearError();
    return await action();
  } catch (err) {
    showError(err);
    return undefined;
  }
}

/** Calls refresh now and then every REFRESH_MS while the page is open (for what the /v1 API
 * has no watch of); its failures show, but only a person's action clears them. */
function every(refresh, signal) {
  const tick = async () => {
    if (signal.aborted) return;
    try {
      await refresh();
    } catch (err) {
      showError(err);
    }
    if (!signal.aborted) setTimeout(tick, REFRESH_MS);
  };
  tick();
}

// ---- Deployments -------------------------------------------------------------------------

async function deploymentsPage(signal) {
  const rows = h("tbody");
  const fileInput = h("input", { type: "file", id: "deployment-file", accept: ".yml,.yaml" });
  const create = h("form", {
    class: "panel row",
    onsubmit: (ev) => {
      ev.preventDefault();
      const file = fileInput.files[0];
      if (!file) return showError(new Error("Choose a deployment YAML file first."));
      attempt(async () => {
        const config_yaml = await file.text();
        await call("POST", "/deployments", { config_yaml }, signal);
        await refresh();
      });
    },
  }, h("label", { for: "deployment-file" }, "New deployment (YAML)"), fileInput,
     h("button", { type: "submit" }, "Create"));
  main.replaceChildren(
    h("h1", {}, "Deployments"),
    h("table", { id: "deployments" }, h("thead", {}, h("tr", {},
      ["Name", "Status", "Reason", "Services", "Generation", ""].map((t) => h("th", {}, t)))), rows),
    create,
  );
  const refresh = async () => {
    const { deployments } = await call("GET", "/deployments?page_size=1000", undefined, signal);
    rows.replaceChildren(...deployments.map((d) => deploymentRow(d, refresh, signal)));
    if (!deployments.length) rows.append(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No deployments.")));
  };
  every(refresh, signal);
}

function deploymentRow(d, refresh, signal) {
  const status = short(d.status, "DEPLOYMENT_STATUS_");
  const services = d.services.map((s) =>
    h("div", {}, `${s.id}: `, badge(s.healthy ? "healthy" : "unhealthy"),
      ` ${s.instances.length}/${s.replicas} replicas`));
  const reload = () => attempt(async () => {
    await call("POST", `/deployments/${enc(d.name)}:reload`, {}, signal);
    await refresh();
  });
  const remove = () => {
    if (!confirm(`Delete deployment ${d.name}?`)) return;
    attempt(async () => {
      await call("DELETE", `/deployments/${enc(d.name)}`, undefined, signal);
      await refresh();
    });
  };
  return h("tr", { dataset: { deployment: d.name } },
    h("td", {}, h("a", { href: `#/d/${enc(d.name)}` }, d.name)),
    h("td", {}, badge(status)),
    h("td", {}, d.status_message),
    h("td", {}, services),
    h("td", {}, d.generation),
    h("td", {}, h("button", { onclick: reload }, "Reload"), " ",
      h("button", { onclick: remove }, "Delete")));
}

// ---- One deployment: services, run form, tasks, sessions ----------------------------------

async function deploymentPage(name, signal) {
  const services = h("tbody");
  const tasks = h("tbody");
  const sessions = h("tbody");
  const serviceSelect = h("select", { id: "run-service" });
  const sessionSelect = h("select", { id: "run-session" }, h("option", { value: "" }, "new session"));
  const input = h("textarea", { id: "run-input", rows: 4 }, "{}");
  const filter = h("select", { id: "task-filter" },
    ["", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"].map((s) =>
      h("option", { value: s }, s || "all statuses")));
  const base = `/deployments/${enc(name)}`;
  const progress = h("pre", { id: "progress" });

  const run = (ev) => {
    ev.preventDefault();
    let parsed;
    try {
      parsed = JSON.parse(input.value || "{}");
    } catch (err) {
      return showError(new Error(`The input is not JSON: ${err.message}`));
    }
    if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
      return showError(new Error("The input must be a JSON object, such as {\"message\": \"hi\"}."));
    }
    attempt(async () => {
      const body = { service_id: serviceSelect.value, input: parsed };
      if (sessionSelect.value) body.session_id = sessionSelect.value;
      const { task } = await call("POST", `${base}/tasks`, body, signal);
      location.hash = `#/d/${enc(name)}/t/${enc(task.task_id)}`;
    });
  };

  main.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "Deployments"), " / ", name),
    h("h1", {}, `Deployment ${name}`),
    h("h2", {}, "Services"),
    h("table", { id: "services" }, h("thead", {}, h("tr", {},
      ["Service", "Health", "Replicas", "Queue depth", "Instances (in flight, last heartbeat)"].map((t) => h("th", {}, t)))),
      services),
    h("h2", {}, "Run a task"),
    h("form", { class: "panel", id: "run-form", onsubmit: run },
      h("div", { class: "row" }, h("label", { for: "run-service" }, "Service"), serviceSelect,
        h("label", { for: "run-session" }, "Session"), sessionSelect),
      h("label", { for: "run-input" }, "Input (JSON object)"), input,
      h("div", { class: "row" }, h("button", { type: "submit" }, "Run"))),
    h("h2", {}, "Tasks"),
    h("div", { class: "row" }, h("label", { for: "task-filter" }, "Status"), filter),
    h("table", { id: "tasks" }, h("thead", {}, h("tr", {},
      ["Task", "Service", "Status", "Created", "Session"].map((t) => h("th", {}, t)))), tasks),
    h("h2", {}, "Sessions"),
    h("table", { id: "sessions" }, h("thead", {}, h("tr", {},
      ["Session", "Created", "Tasks"].map((t) => h("th", {}, t)))), sessions),
    h("h2", {}, "Deploy progress"),
    progress,
  );
  followProgress(base, progress, signal);

  await attempt(async () => {
    const { services: list } = await call("GET", `${base}/services`, undefined, signal);
    serviceSelect.replaceChildren(...list.map((s) => h("option", { value: s.id }, s.id)));
  });
  const refreshServices = async () => {
    const { services: list } = await call("GET", `${base}/services`, undefined, signal);
    services.replaceChildren(...list.map((s) => h("tr", {},
      h("td", {}, s.id, s.name && s.name !== s.id ? h("span", { class: "muted" }, ` (${s.name})`) : ""),
      h("td", {}, badge(s.healthy ? "healthy" : "unhealthy")),
      h("td", {}, `${s.instances.length}/${s.replicas}`),
      h("td", { class: "queue-depth" }, s.queue_depth),
      h("td", {}, s.instances.map((i) => h("div", {},
        `${i.instance_id} pid ${i.pid}: ${i.in_flight} in flight, ${when(i.last_heartbeat)}`))))));
  };
  const known = new Map(); // task id -> task, as the watch reports them
  let snapshotDone = false;
  const showTasks = () => {
    const wanted = filter.value ? `TASK_STATUS_${filter.value}` : "";
    const list = [...known.values()].filter((t) => !wanted || t.status === wanted);
    list.sort((a, b) => (b.created_at || "").localeCompare(a.created_at || ""));
    tasks.replaceChildren(...list.map((t) => h("tr", { dataset: { task: t.task_id } },
      h("td", {}, h("a", { href: `#/d/${enc(name)}/t/${enc(t.task_id)}` }, t.task_id)),
      h("td", {}, t.service_id),
      h("td", {}, badge(taskStatus(t.status))),
      h("td", {}, when(t.created_at)),
      h("td", {}, t.session_id))));
  };
  // The tasks now, then each change as the server reports it (no polling).
  const watchTasks = async () => {
    try {
      await stream(`${base}/tasks:watch`, ({ task, deleted, snapshot_end }) => {
        if (snapshot_end) snapshotDone = true;
        else if (deleted) known.delete(task.task_id);
        else known.set(task.task_id, task);
        if (snapshotDone) showTasks();
      }, signal);
      if (!signal.aborted) showError(new Error("The server ended the task list's updates: reload the page."));
    } catch (err) {
      showError(err);
    }
  };
  const refreshSessions = async () => {
    const { sessions: list } = await call("GET", `${base}/sessions?page_size=200`, undefined, signal);
    const chosen = sessionSelect.value;
    sessionSelect.replaceChildren(h("option", { value: "" }, "new session"),
      ...list.map((s) => h("option", { value: s.session_id, selected: s.session_id === chosen }, s.session_id)));
    sessions.replaceChildren(...list.map((s) => h("tr", {},
      h("td", {}, s.session_id),
      h("td", {}, when(s.created_at)),
      h("td", {}, s.task_ids.map((id) =>
        h("div", {}, h("a", { href: `#/d/${enc(name)}/t/${enc(id)}` }, id)))))));
  };
  filter.addEventListener("change", () => snapshotDone && showTasks());
  watchTasks();
  every(async () => {
    await Promise.all([refreshServices(), refreshSessions()]);
  }, signal);
}

/** The last deploy's progress lines (dependency installs too), then new ones as they come. */
async function followProgress(base, box, signal) {
  try {
    await lines(`${base}/progress`, ({ line, status }) => {
      box.append(`${line}  [${short(status, "DEPLOYMENT_STATUS_")}]\n`);
    }, signal);
  } catch (err) {
    showError(err);
  }
}

// ---- One task: details, live events, answer, cancel ----------------------------------------

async function taskPage(name, taskId, signal) {
  const base = `/deployments/${enc(name)}/tasks/${enc(taskId)}`;
  const details = h("dl", { id: "task-details" });
  const outcome = h("div", { id: "task-outcome" });
  const events = h("ol", { class: "events", id: "events" });
  const streamState = h("span", { class: "muted", id: "stream-state" }, "connecting…");
  const answerBox = h("div", { id: "answer" });
  const cancelButton = h("button", { id: "cancel", onclick: () => attempt(async () => {
    const { task } = await call("POST", `${base}:cancel`, { reason: "cancelled from the console" }, signal);
    show(task);
  }) }, "Cancel");
  main.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "Deployments"), " / ",
      h("a", { href: `#/d/${enc(name)}` }, name), " / ", taskId),
    h("h1", {}, `Task ${taskId}`),
    h("div", { class: "row" }, cancelButton),
    h("div", { class: "panel" }, details),
    outcome,
    answerBox,
    h("h2", {}, "Events ", streamState),
    events,
  );

  let finished = false;
  const show = (task) => {
    const status = taskStatus(task.status);
    finished = TERMINAL.has(task.status);
    cancelButton.disabled = finished;
    if (finished) answerBox.replaceChildren();
    const field = (term, ...value) => [h("dt", {}, term), h("dd", {}, ...value)];
    details.replaceChildren(
      ...field("Status", h("span", { id: "task-status", class: `status status-${status}` }, status)),
      ...field("Service", task.service_id),
      ...field("Session", task.session_id),
      ...field("Attempts", task.attempts),
      ...field("Created", when(task.created_at)),
      ...field("Started", when(task.started_at)),
      ...field("Finished", when(task.finished_at)),
      ...field("Input", h("pre", {}, pretty(task.input ?? {}))),
    );
    const parts = [];
    if (task.status === "TASK_STATUS_SUCCEEDED") {
      parts.push(h("h2", {}, "Result"), h("pre", { id: "task-result" }, pretty(task.result)));
    }
    if (task.error && (task.error.type || task.error.message)) {
      parts.push(h("h2", {}, "Error"),
        h("p", { id: "task-error" }, `${task.error.type}: ${task.error.message}`));
      if (task.error.traceback) parts.push(h("pre", { id: "task-traceback" }, task.error.traceback));
    }
    outcome.replaceChildren(...parts);
  };
  const reload = async () => show((await call("GET", base, undefined, signal)).task);

  const askForInput = (event) => {
    if (finished) return;
    const text = h("textarea", { id: "answer-text", rows: 2 });
    const prompt = event.data?.prefix ?? event.data?.message ?? "The workflow asks for input.";
    answerBox.replaceChildren(h("form", { class: "panel", onsubmit: (ev) => {
      ev.preventDefault();
      attempt(async () => {
        await call("POST", `${base}/events`,
          { type: "HumanResponseEvent", data: { response: text.value } }, signal);
        answerBox.replaceChildren(h("p", { class: "muted" }, "Answer sent."));
      });
    } }, h("label", { for: "answer-text" }, `Input required: ${prompt}`), text,
      h("div", { class: "row" }, h("button", { type: "submit" }, "Send answer"))));
  };

  let next = 0;
  let ended = false;
  const onEvent = ({ event }) => {
    const kind = short(event.kind, "EVENT_KIND_");
    next = Number(event.index) + 1;
    if (kind !== "WORKFLOW") ended = true;
    events.append(h("li", { dataset: { index: event.index, type: event.type } },
      h("strong", {}, `#${event.index} ${event.type}`), h("span", { class: "kind" }, kind),
      h("span", { class: "kind" }, when(event.timestamp)),
      h("pre", {}, pretty(event.data ?? {}))));
    if (kind === "WORKFLOW" && (event.type || "").endsWith("InputRequiredEvent")) askForInput(event);
    reload().catch(showError);
  };

  // Status and timings change without an event too (queued -> running, a retry).
  every(async () => {
    if (!finished) await reload();
  }, signal);
  // The stream ends with the task's final event; a dropped connection resumes after the
  // last event seen.
  while (!ended && !signal.aborted) {
    try {
      streamState.textContent = "live";
      await stream(`${base}/events?from_index=${next}`, onEvent, signal);
    } catch (err) {
      if (err?.name === "AbortError") return;
      if (err instanceof ApiError) {
        streamState.textContent = "interrupted";
        showError(err);
        return;
      }
    }
    if (ended || signal.aborted) break;
    streamState.textContent = "reconnecting…";
    await new Promise((resolve) => setTimeout(resolve, REFRESH_MS));
  }
  streamState.textContent = "ended";
  await reload().catch(showError);
}

// ---- Routing and the API key --------------------------------------------------------------

function route() {
  page.abort();
  page = new AbortController();
  clearError();
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "d" && parts[1] && parts[2] === "t" && parts[3]) {
    taskPage(parts[1], parts[3], page.signal);
  } else if (parts[0] === "d" && parts[1]) {
    deploymentPage(parts[1], page.signal);
  } else {
    deploymentsPage(page.signal);
  }
}

const keyInput = document.getElementById("api-key");
keyInput.value = apiKey();
document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setApiKey(keyInput.value.trim());
  route();
});
document.getElementById("forget-key").addEventListener("click", () => {
  keyInput.value = "";
  setApiKey("");
  route();
});
window.addEventListener("hashchange", route);
route();
