// The dashboard: plain ES modules, no build step, no library. It talks to the app's own HTTP API
// (same origin; the page's Content-Security-Policy allows nothing else) and refreshes itself by polling.
import { triggerInWords } from "./words.mjs";

const KEY_STORAGE = "routines.functionKey";
// Seconds between refreshes: 5, or ?poll=N on the page's address (at least 1).
const POLL_MS = Math.max(1, Number(new URLSearchParams(location.search).get("poll")) || 5) * 1000;
const RUN_PAGE = 50;
const CHART_RUNS = 30;
const LIST_CAP = 1000; // routines loaded for the list (200 per request)
const LAST_RUN_CAP = 100; // rows whose last run is looked up
const STATES = ["enabled", "disabled", "completed"];

// The page is served as .../ui (or .../ui/); its <base> is .../ui/. Put the address on the base, so
// that "#/..." links stay on this document instead of loading the page again.
const basePath = new URL(document.baseURI).pathname;
if (location.pathname !== basePath && location.pathname + "/" === basePath) {
  history.replaceState(null, "", basePath + location.search + location.hash);
}
const API = new URL("../", document.baseURI); // the app's /api/

// -- DOM helpers ------------------------------------------------------------------------------------

/** An element with attributes (false/null/undefined left out; on* as listeners) and children. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElementNS(
    tag === "svg" || attrs.svg ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml",
    tag,
  );
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "svg" || value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

const svg = (tag, attrs = {}, ...children) => el(tag, { ...attrs, svg: true }, ...children);
const $ = (selector) => document.querySelector(selector);

/** Replace ``region``'s children, keeping the focused control and typed values (matched by data-key). */
function replaceKeeping(region, ...children) {
  const active = document.activeElement;
  const focusKey = region.contains(active) ? active.dataset.key : undefined;
  const typed = new Map(
    [...region.querySelectorAll("input[data-key]")].filter((i) => i.value).map((i) => [i.dataset.key, i.value]),
  );
  region.replaceChildren(...children.flat(Infinity).filter(Boolean));
  for (const [key, value] of typed) {
    const input = region.querySelector(`input[data-key="${CSS.escape(key)}"]`);
    if (input) input.value = value;
  }
  if (focusKey !== undefined) region.querySelector(`[data-key="${CSS.escape(focusKey)}"]`)?.focus();
}

// -- formatting -------------------------------------------------------------------------------------

const dateTime = new Intl.DateTimeFormat(undefined, {
  year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
});
const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

function ago(ms) {
  const seconds = Math.round(ms / 1000);
  const units = [["day", 86400], ["hour", 3600], ["minute", 60], ["second", 1]];
  for (const [unit, size] of units) {
    if (Math.abs(seconds) >= size || unit === "second") return relative.format(Math.round(seconds / size), unit);
  }
  return "";
}

/** A <time> showing an RFC 3339 instant in the viewer's time zone; with ``now``, also "in 5 minutes";
 * with ``sameDayAs`` (another instant), only the time of day when both fall on the same day. */
function when(iso, now, sameDayAs) {
  if (!iso) return el("span", { class: "muted" }, "—");
  const date = new Date(iso);
  const day = (d) => new Date(d).toDateString();
  const text = sameDayAs && day(sameDayAs) === day(date) ? clock.format(date) : dateTime.format(date);
  return el(
    "time",
    { datetime: iso, title: iso },
    text,
    now === undefined ? null : el("span", { class: "muted" }, ` (${ago(date - now)})`),
  );
}

function duration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "—";
  const negative = ms < 0 ? "−" : "";
  ms = Math.abs(ms);
  if (ms < 1000) return `${negative}${Math.round(ms)} ms`;
  if (ms < 60_000) return `${negative}${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
  const s = Math.round(ms / 1000);
  const [big, small, bigUnit, smallUnit] =
    s < 3600 ? [Math.floor(s / 60), s % 60, "min", "s"] : [Math.floor(s / 3600), Math.floor((s % 3600) / 60), "h", "min"];
  return `${negative}${big} ${bigUnit}${small ? ` ${small} ${smallUnit}` : ""}`;
}

const between = (from, to) => (from && to ? new Date(to) - new Date(from) : null);
const lagOf = (run) => between(run.scheduled_for, run.started_at);
const durationOf = (run) => between(run.started_at, run.ended_at);

function badge(kind, value) {
  return el("span", { class: `badge ${kind}-${value}` }, value);
}

// -- messages ---------------------------------------------------------------------------------------

/** Show ``text``; a message with the same ``key`` replaces the earlier one. Errors stay until dismissed
 * (or until the same key succeeds), other messages until replaced. */
function say(text, { kind = "info", key = text } = {}) {
  const box = $("#messages");
  box.querySelector(`[data-key="${CSS.escape(key)}"]`)?.remove();
  const message = el(
    "div",
    { class: `message ${kind}`, role: kind === "error" ? "alert" : "status", dataset: { key } },
    el("span", {}, text),
    el("button", { type: "button", class: "link", onclick: () => message.remove() }, "Dismiss"),
  );
  box.append(message);
  while (box.children.length > 4) box.firstElementChild.remove();
}

function unsay(key) {
  $("#messages").querySelector(`[data-key="${CSS.escape(key)}"]`)?.remove();
}

// -- the API ----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The problem+json of a failed call as one sentence: "404 Not Found: no routine rt_x". */
function problemText(status, statusText, data, text) {
  if (data && typeof data === "object") {
    const head = `${status} ${data.title || statusText}`;
    const detail = data.detail ? `: ${data.detail}` : "";
    const fields = Array.isArray(data.errors)
      ? data.errors.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ")
      : "";
    return head + detail + (fields ? ` (${fields})` : "");
  }
  return `${status} ${statusText}${text ? `: ${text.slice(0, 200)}` : ""}`;
}

let keyRequest = null;
let keyDeclined = false; // the prompt was dismissed: do not reopen it on every refresh

/** Ask for a function key (one dialog however many calls were refused); resolves once one is given. */
function askForKey(problem) {
  keyRequest ??= new Promise((resolve, reject) => {
    const dialog = $("#key-dialog");
    const form = $("#key-form");
    const input = $("#key-input");
    const note = $("#key-problem");
    note.hidden = !problem;
    note.textContent = problem || "";
    input.value = "";
    const done = () => {
      form.removeEventListener("submit", onSubmit);
      dialog.removeEventListener("close", onClose);
      keyRequest = null;
    };
    const onSubmit = () => {
      sessionStorage.setItem(KEY_STORAGE, input.value.trim());
      keyDeclined = false;
      done();
      updateKeyButton();
      resolve();
    };
    const onClose = () => {
      if (keyRequest === null) return;
      done();
      keyDeclined = true;
      updateKeyButton();
      reject(new ApiError(401, "The API needs a function key; none was given (Enter key, above)."));
    };
    form.addEventListener("submit", onSubmit);
    dialog.addEventListener("close", onClose);
    dialog.showModal();
    input.focus();
  });
  return keyRequest;
}

function updateKeyButton() {
  const stored = Boolean(sessionStorage.getItem(KEY_STORAGE));
  $("#forget-key").hidden = !stored;
  $("#enter-key").hidden = stored || !keyDeclined;
}

/** One API call; JSON in and out. Throws ApiError with the problem in words. */
async function api(method, path, body) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  const headers = { Accept: "application/json" };
  if (key) headers["x-functions-key"] = key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(new URL(path, API), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (error) {
    throw new ApiError(0, `Cannot reach the API: ${error.message}`);
  }
  if (response.status === 401) {
    // In Azure every API route needs a function key; the page's own routes do not.
    if (keyDeclined) throw new ApiError(401, "The API needs a function key (Enter key, above).");
    await askForKey(key ? `The key was refused (${response.status} ${response.statusText}).` : null);
    return api(method, path, body);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, problemText(response.status, response.statusText, data, text));
  }
  return data;
}

const routinePath = (id) => `routines/${encodeURIComponent(id)}`;

// -- live refresh -----------------------------------------------------------------------------------

let view = null; // {refresh(), root}
let pollTimer = null;
let refreshing = null;
let again = false; // something changed while a refresh was in flight: run one more after it

function live() {
  return $("#live-toggle")?.checked !== false;
}

function refresh() {
  if (!view) return Promise.resolve();
  if (refreshing) {
    again = true;
    return refreshing;
  }
  const current = view;
  refreshing = (async () => {
    try {
      await current.refresh();
      current.loaded = true;
      if (current === view) {
        unsay("refresh");
        $("#updated").textContent = `Updated ${clock.format(new Date())}`;
      }
    } catch (error) {
      const what = current.loaded ? "Could not refresh" : "Could not load this page";
      if (current === view) say(`${what}: ${error.message}`, { kind: "error", key: "refresh" });
    } finally {
      refreshing = null;
      if (again) {
        again = false;
        refresh();
      }
    }
  })();
  return refreshing;
}

function schedulePoll() {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(async () => {
    if (live() && !document.hidden) await refresh();
    schedulePoll();
  }, POLL_MS);
}

/** Run an action from a button: busy while it runs, its outcome as a message, then a refresh. */
async function act(button, what, call, success) {
  const before = location.hash;
  // Busy, not disabled: a disabled button would drop the keyboard focus.
  if (button.getAttribute("aria-disabled") === "true") return;
  button.setAttribute("aria-disabled", "true");
  button.setAttribute("aria-busy", "true");
  try {
    const result = await call();
    unsay(what);
    if (success) success(result);
  } catch (error) {
    say(`${what} failed: ${error.message}`, { kind: "error", key: what });
  } finally {
    button.removeAttribute("aria-disabled");
    button.removeAttribute("aria-busy");
  }
  if (location.hash === before) await refresh(); // else the success moved to another view
}

// -- the list ---------------------------------------------------------------------------------------

const filters = { state: "", search: "" };

function listView() {
  const rows = el("tbody", { id: "routine-rows" });
  const count = el("p", { id: "count", class: "muted", "aria-live": "polite" });
  const search = el("input", {
    id: "search", type: "search", value: filters.search, placeholder: "name, description or id",
    oninput: () => {
      filters.search = search.value;
      render();
    },
  });
  const state = el(
    "select",
    {
      id: "state-filter",
      onchange: () => {
        filters.state = state.value;
        refresh();
      },
    },
    el("option", { value: "" }, "All states"),
    STATES.map((s) => el("option", { value: s, selected: filters.state === s }, s)),
  );
  const root = [
    el("h1", { tabindex: -1 }, "Routines"),
    el(
      "form",
      { class: "filters", role: "search", onsubmit: (e) => e.preventDefault() },
      el("div", {}, el("label", { for: "search" }, "Search"), search),
      el("div", {}, el("label", { for: "state-filter" }, "State"), state),
    ),
    count,
    el(
      "table",
      { class: "routines" },
      el("caption", { class: "sr-only" }, "Routines"),
      el(
        "thead",
        {},
        el("tr", {}, ["Name", "Trigger", "State", "Next fire", "Last run"].map((h) => el("th", { scope: "col" }, h))),
      ),
      rows,
    ),
  ];
  let routines = [];
  let lastRuns = new Map();

  function render() {
    const needle = filters.search.trim().toLowerCase();
    const shown = routines.filter(
      (r) => !needle || [r.name, r.description || "", r.id].some((t) => t.toLowerCase().includes(needle)),
    );
    const now = Date.now();
    count.textContent =
      routines.length === 0
        ? filters.state
          ? `No ${filters.state} routines.`
          : "No routines yet. Create one with POST /api/routines or the routines CLI."
        : `${shown.length} of ${routines.length} routine${routines.length === 1 ? "" : "s"}`;
    replaceKeeping(
      rows,
      shown.map((r) => {
        const last = lastRuns.get(r.id);
        return el(
          "tr",
          { dataset: { routineId: r.id } },
          el(
            "th",
            { scope: "row", "data-label": "Name" },
            el("a", { href: `#/routines/${encodeURIComponent(r.id)}`, dataset: { key: `open-${r.id}` } }, r.name),
            r.description ? el("div", { class: "muted small" }, r.description) : null,
          ),
          el("td", { "data-label": "Trigger", class: "trigger" }, triggerInWords(r.trigger)),
          el("td", { "data-label": "State" }, badge("state", r.state)),
          el("td", { "data-label": "Next fire" }, when(r.next_fire_at, now)),
          el(
            "td",
            { "data-label": "Last run", class: "last-run" },
            last === undefined
              ? el("span", { class: "muted" }, "…")
              : last === null
                ? el("span", { class: "muted" }, "no runs yet")
                : [badge("status", last.status), " ", when(last.started_at || last.scheduled_for, now)],
          ),
        );
      }),
    );
    return shown;
  }

  async function refreshList() {
    const items = [];
    let continuation = null;
    do {
      const query = new URLSearchParams({ limit: "200" });
      if (filters.state) query.set("state", filters.state);
      if (continuation) query.set("continuation", continuation);
      const page = await api("GET", `routines?${query}`);
      items.push(...page.items);
      continuation = page.continuation;
    } while (continuation && items.length < LIST_CAP);
    routines = items.sort((a, b) => a.name.localeCompare(b.name));
    const shown = render().slice(0, LAST_RUN_CAP);
    const found = new Map();
    await inBatches(shown, 6, async (r) => {
      try {
        const page = await api("GET", `${routinePath(r.id)}/runs?limit=1`);
        found.set(r.id, page.items[0] || null);
      } catch (error) {
        if (error.status !== 404) throw error; // deleted meanwhile
      }
    });
    lastRuns = found;
    render();
  }

  return { root, refresh: refreshList };
}

async function inBatches(items, width, work) {
  const queue = [...items];
  await Promise.all(
    Array.from({ length: Math.min(width, queue.length) }, async () => {
      while (queue.length) await work(queue.shift());
    }),
  );
}

// -- a routine --------------------------------------------------------------------------------------

function routineView(id) {
  const heading = el("h1", { tabindex: -1 }, id);
  const summary = el("div", { class: "summary" });
  const actions = el("div", { class: "actions", role: "group", "aria-label": "Routine actions" });
  const fires = el("ol", { class: "fires", id: "next-fires" });
  const chart = el("figure", { class: "chart", id: "run-chart" });
  const runRows = el("tbody", { id: "run-rows" });
  const runNote = el("p", { class: "muted", id: "run-note" });
  const root = [
    el("nav", { "aria-label": "Breadcrumb" }, el("a", { href: "#/" }, "← All routines")),
    heading,
    actions,
    summary,
    el(
      "div",
      { class: "columns" },
      el("section", { "aria-labelledby": "fires-title" }, el("h2", { id: "fires-title" }, "Next fires"), fires),
      el("section", { "aria-labelledby": "chart-title" }, el("h2", { id: "chart-title" }, "Recent runs"), chart),
    ),
    el(
      "section",
      { "aria-labelledby": "runs-title" },
      el("h2", { id: "runs-title" }, "Run history"),
      runNote,
      el(
        "div",
        { class: "scroll" },
        el(
          "table",
          { class: "runs" },
          el("caption", { class: "sr-only" }, "Runs, newest first"),
          el(
            "thead",
            {},
            el(
              "tr",
              {},
              ["Status", "Trigger", "Scheduled", "Started", "Ended", "Attempts", "Lag", "Duration", "Error", "Trace id"].map(
                (h) => el("th", { scope: "col" }, h),
              ),
            ),
          ),
          runRows,
        ),
      ),
    ),
  ];
  let routine = null;
  let preview = { key: null, fires: [] };

  // Enable and Disable share a key: after one, the keyboard focus lands on the other.
  function button(label, onclick, extra = {}) {
    const key = label === "Enable" || label === "Disable" ? "action-toggle" : `action-${label}`;
    return el("button", { type: "button", dataset: { key }, onclick, ...extra }, label);
  }

  function renderActions() {
    const path = routinePath(id);
    replaceKeeping(
      actions,
      routine.state === "enabled"
        ? button("Disable", (e) =>
            act(e.currentTarget, "Disable", () => api("POST", `${path}/disable`), () => say(`Disabled ${routine.name}.`)),
          )
        : null,
      routine.state === "disabled"
        ? button("Enable", (e) =>
            act(e.currentTarget, "Enable", () => api("POST", `${path}/enable`), () => say(`Enabled ${routine.name}.`)),
          )
        : null,
      button("Run now", (e) =>
        act(e.currentTarget, "Run now", () => api("POST", `${path}/dispatch`), (run) =>
          say(`Started a run of ${routine.name}: ${run.id}.`),
        ),
      ),
      button("Delete", async (e) => {
        const target = e.currentTarget;
        if (!(await confirmDelete(routine))) return;
        await act(target, "Delete", () => api("DELETE", path), () => {
          say(`Deleted ${routine.name}.`);
          location.hash = "#/";
        });
      }, { class: "danger" }),
    );
  }

  function renderSummary(now) {
    const agents = (routine.actions || []).map((a) => a.agent_id || a.agent_name || a.type).filter(Boolean);
    const retry = routine.retry_policy || {};
    const facts = [
      ["State", [badge("state", routine.state), routine.disabled_reason ? ` (${routine.disabled_reason})` : ""]],
      ["Trigger", [triggerInWords(routine.trigger), " ", triggerCode(routine.trigger)]],
      ["Next fire", when(routine.next_fire_at, now)],
      ["Agent", [...new Set(agents)].join(", ") || "—"],
      ["Retries", `up to ${retry.max_attempts ?? "?"} attempts`],
      ["Overlap", routine.overlap_policy],
      ["Timeout", duration((routine.timeout_seconds ?? 0) * 1000)],
      ["Version", String(routine.version)],
      ["Id", el("code", {}, routine.id)],
    ];
    replaceKeeping(
      summary,
      routine.description ? el("p", {}, routine.description) : null,
      el("dl", { class: "facts" }, facts.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v)))),
    );
  }

  async function refreshPreview(now) {
    const trigger = routine.trigger;
    if (trigger.type === "timer") {
      preview = { key: null, fires: [trigger.at] };
      return;
    }
    if (trigger.type !== "schedule") {
      preview = { key: null, fires: [] };
      return;
    }
    const stale = preview.fires.length && new Date(preview.fires[0]) <= now;
    if (preview.key === routine.version && !stale) return;
    const body = { trigger, count: 5 };
    if (routine.jitter_seconds) Object.assign(body, { jitter_seconds: routine.jitter_seconds, routine_id: routine.id });
    const answer = await api("POST", "preview", body);
    preview = { key: routine.version, fires: answer.fires };
  }

  function renderFires(now) {
    const paused = routine.state !== "enabled";
    replaceKeeping(
      fires,
      preview.fires.length === 0
        ? el("li", { class: "muted" }, routine.trigger.type === "webhook" ? "Runs when a webhook arrives." : "None.")
        : preview.fires.map((f) => el("li", {}, when(f, now), paused ? el("span", { class: "muted" }, " — if enabled") : null)),
    );
  }

  function renderRuns(runs, continuation, now) {
    runNote.textContent = runs.length
      ? `Newest first; the last ${runs.length}${continuation ? " (older runs not shown)" : ""}.`
      : "No runs yet.";
    replaceKeeping(runRows, runs.map((run) => runRow(run, now)));
    replaceKeeping(chart, runChart(runs));
  }

  function runRow(run, now) {
    const steps = stepsOf(run);
    const waiting = steps.some((s) => s.status === "waiting");
    const attempts = `${run.attempt} / ${run.max_attempts}`;
    const row = el(
      "tr",
      { dataset: { runId: run.id, status: run.status } },
      el("td", { "data-label": "Status" }, badge("status", run.status)),
      el("td", { "data-label": "Trigger" }, run.trigger),
      el("td", { "data-label": "Scheduled" }, when(run.scheduled_for)),
      el("td", { "data-label": "Started" }, when(run.started_at, undefined, run.scheduled_for)),
      el("td", { "data-label": "Ended" }, when(run.ended_at, undefined, run.started_at)),
      el(
        "td",
        { "data-label": "Attempts" },
        attempts,
        run.next_attempt_at ? el("div", { class: "muted small" }, "next ", when(run.next_attempt_at, now)) : null,
      ),
      el("td", { "data-label": "Lag", class: "num" }, duration(lagOf(run))),
      el("td", { "data-label": "Duration", class: "num" }, duration(durationOf(run))),
      el("td", { "data-label": "Error", class: "error-text" }, run.error_message || null),
      el("td", { "data-label": "Trace id" }, run.trace_id ? el("code", { class: "trace" }, run.trace_id) : null),
    );
    if (!waiting) return row;
    return [row, stepRows(run, steps)];
  }

  function stepRows(run, steps) {
    const base = `${routinePath(id)}/runs/${encodeURIComponent(run.id)}/steps`;
    return el(
      "tr",
      { class: "steps", dataset: { stepsOf: run.id } },
      el(
        "td",
        { colspan: 10 },
        el(
          "ul",
          { class: "step-list", "aria-label": `Steps of run ${run.id}` },
          steps.map((step) => {
            const stepId = step.id;
            const key = `${run.id}-${stepId}`;
            const comment = el("input", {
              id: `comment-${key}`, type: "text", dataset: { key: `comment-${key}` }, placeholder: "optional",
            });
            const decide = (verb, label) =>
              el(
                "button",
                {
                  type: "button",
                  class: verb === "reject" ? "danger" : "primary",
                  dataset: { key: `${verb}-${key}` },
                  onclick: (e) =>
                    act(
                      e.currentTarget,
                      `${label} ${stepId}`,
                      () =>
                        api("POST", `${base}/${encodeURIComponent(stepId)}/${verb}`, comment.value.trim() ? { comment: comment.value.trim() } : {}),
                      () => say(`${label === "Approve" ? "Approved" : "Rejected"} step ${stepId} of ${run.id}.`),
                    ),
                },
                label,
              );
            return el(
              "li",
              { dataset: { stepId, status: step.status } },
              el("span", { class: "step-name" }, stepId), " ", badge("status", step.status),
              step.comment ? el("span", { class: "muted" }, ` “${step.comment}”`) : null,
              step.status === "waiting"
                ? el(
                    "span",
                    { class: "decide" },
                    el("label", { for: `comment-${key}` }, "Comment"), comment,
                    decide("approve", "Approve"), decide("reject", "Reject"),
                  )
                : null,
            );
          }),
        ),
      ),
    );
  }

  async function refreshRoutine() {
    const now = new Date();
    const [fresh, page] = await Promise.all([
      api("GET", routinePath(id)),
      api("GET", `${routinePath(id)}/runs?limit=${RUN_PAGE}`),
    ]);
    routine = fresh;
    heading.textContent = routine.name;
    document.title = `${routine.name} · Routines`;
    renderActions();
    renderSummary(now);
    renderRuns(page.items, page.continuation, now);
    try {
      await refreshPreview(now);
      unsay("preview");
    } catch (error) {
      say(`Could not compute the next fires: ${error.message}`, { kind: "error", key: "preview" });
    }
    renderFires(now);
  }

  return { root, refresh: refreshRoutine };
}

/** The steps of a run (version 2): ``steps``, or ``actions`` items that carry an ``id``. */
function stepsOf(run) {
  const items = Array.isArray(run.steps) ? run.steps : (run.actions || []).filter((a) => a && a.id);
  return items.filter((s) => s && typeof s.id === "string");
}

function triggerCode(trigger) {
  if (trigger.type === "schedule") return el("code", { class: "muted" }, trigger.cron_expression);
  if (trigger.type === "timer") return el("code", { class: "muted" }, trigger.at);
  return null;
}

/** Duration and lag of the latest started runs as grouped bars (oldest left), inline SVG. */
function runChart(runs) {
  const shown = runs.filter((r) => r.started_at).slice(0, CHART_RUNS).reverse();
  if (shown.length === 0) return el("p", { class: "muted" }, "No started runs yet.");
  const width = 600;
  const height = 160;
  const top = 10;
  const bottom = 20;
  const left = 50;
  const values = shown.map((r) => ({ run: r, duration: Math.max(0, durationOf(r) ?? 0), lag: Math.max(0, lagOf(r) ?? 0) }));
  const max = Math.max(1, ...values.map((v) => Math.max(v.duration, v.lag)));
  const slot = (width - left) / shown.length;
  const bar = Math.max(1, Math.min(12, slot / 2 - 1));
  const scale = (ms) => ((height - top - bottom) * ms) / max;
  const base = height - bottom;
  const groups = values.map((v, i) => {
    const x = left + i * slot + slot / 2 - bar;
    const label = `${v.run.status}, scheduled ${v.run.scheduled_for}: duration ${duration(durationOf(v.run))}, lag ${duration(lagOf(v.run))}`;
    return svg(
      "g",
      { class: `bar status-${v.run.status}`, dataset: { runId: v.run.id } },
      svg("title", {}, label),
      svg("rect", { class: "duration", x, y: base - scale(v.duration), width: bar, height: scale(v.duration) }),
      svg("rect", { class: "lag", x: x + bar, y: base - scale(v.lag), width: bar, height: scale(v.lag) }),
    );
  });
  const durations = values.map((v) => v.duration).sort((a, b) => a - b);
  const median = durations[Math.floor(durations.length / 2)];
  const maxLag = Math.max(...values.map((v) => v.lag));
  const caption = `Last ${shown.length} started run${shown.length === 1 ? "" : "s"}: median duration ${duration(median)}, largest lag ${duration(maxLag)}.`;
  return [
    svg(
      "svg",
      { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": caption, class: "bars" },
      svg("line", { class: "axis", x1: left, x2: width, y1: base, y2: base }),
      svg("line", { class: "grid", x1: left, x2: width, y1: top, y2: top }),
      svg("text", { class: "tick", x: left - 4, y: top + 4, "text-anchor": "end" }, duration(max)),
      svg("text", { class: "tick", x: left - 4, y: base, "text-anchor": "end" }, "0"),
      svg("text", { class: "tick", x: left, y: height - 4 }, "older"),
      svg("text", { class: "tick", x: width, y: height - 4, "text-anchor": "end" }, "newer"),
      groups,
    ),
    el(
      "figcaption",
      {},
      el("span", { class: "key duration" }, "duration"), " ", el("span", { class: "key lag" }, "lag (start − scheduled)"),
      el("div", { class: "muted small" }, caption),
    ),
  ];
}

/** The delete confirmation; resolves true when confirmed. */
function confirmDelete(routine) {
  const dialog = $("#confirm-dialog");
  $("#confirm-title").textContent = `Delete ${routine.name}?`;
  $("#confirm-text").textContent =
    "The routine stops firing and is removed. Its run history is kept for the retention period.";
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
    dialog.showModal();
  });
}

// -- routing ----------------------------------------------------------------------------------------

function route(event) {
  const match = /^#\/routines\/([^/?]+)/.exec(location.hash);
  view = match ? routineView(decodeURIComponent(match[1])) : listView();
  if (!match) document.title = "Routines";
  $("#view").replaceChildren(...view.root.flat());
  // On a change of view, focus its heading (screen readers announce it); not on the first load, so
  // that Tab still starts at the top of the page (the skip link).
  if (event) view.root.find((n) => n.tagName === "H1")?.focus({ preventScroll: true });
  refresh();
}

function start() {
  $("#live-toggle").addEventListener("change", () => live() && refresh());
  $(".skip").addEventListener("click", (event) => {
    event.preventDefault(); // "#view" is not a route: move the focus, keep the page
    $("#view").focus();
  });
  $("#forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    updateKeyButton();
    say("Forgot the function key of this tab.");
  });
  $("#enter-key").addEventListener("click", () => {
    keyDeclined = false;
    updateKeyButton();
    refresh();
  });
  updateKeyButton();
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => !document.hidden && live() && refresh());
  route(null);
  schedulePoll();
}

start();
