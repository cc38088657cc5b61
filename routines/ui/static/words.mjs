// A routine's trigger in words ("every day at 06:00, Europe/Paris"), from its cron expression.
// Pure: no DOM, no clock; tests import it directly (tests/test_ui.py runs it under Node).
// What it cannot say plainly it leaves as the cron expression itself, never a wrong sentence.

const DAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTHS = [
  "January", "February", "March", "April", "May", "June",
  "July", "August", "September", "October", "November", "December",
];
const DAY_NAMES = { SUN: 0, MON: 1, TUE: 2, WED: 3, THU: 4, FRI: 5, SAT: 6 };
const MONTH_NAMES = {
  JAN: 1, FEB: 2, MAR: 3, APR: 4, MAY: 5, JUN: 6, JUL: 7, AUG: 8, SEP: 9, OCT: 10, NOV: 11, DEC: 12,
};

class Unsayable extends Error {}

// One cron field as {any: true} | {step, from, to} | {values: [sorted numbers]}.
function parseField(text, min, max, names = {}) {
  const number = (token) => {
    const upper = token.toUpperCase();
    const value = upper in names ? names[upper] : /^\d+$/.test(token) ? Number(token) : NaN;
    if (!Number.isInteger(value) || value < min || value > max) throw new Unsayable(token);
    return value;
  };
  if (text === "*" || text === "?") return { any: true };
  const step = /^(\*|[^/]+-[^/]+|[^/-]+)\/(\d+)$/.exec(text);
  if (step) {
    const n = Number(step[2]);
    if (n < 1) throw new Unsayable(text);
    let from = min;
    let to = max;
    if (step[1] !== "*") {
      const [a, b] = step[1].split("-");
      from = number(a);
      to = b === undefined ? max : number(b);
    }
    if (n === 1) return from === min && to === max ? { any: true } : { values: range(from, to) };
    return { step: n, from, to };
  }
  const values = new Set();
  for (const part of text.split(",")) {
    const [a, b, ...rest] = part.split("-");
    if (rest.length || a === "") throw new Unsayable(part);
    const from = number(a);
    const to = b === undefined ? from : number(b);
    if (to < from) throw new Unsayable(part);
    for (const v of range(from, to)) values.add(v);
  }
  return { values: [...values].sort((x, y) => x - y) };
}

function range(from, to) {
  return Array.from({ length: to - from + 1 }, (_, i) => from + i);
}

function list(words) {
  return words.length < 2 ? words.join("") : `${words.slice(0, -1).join(", ")} and ${words.at(-1)}`;
}

const pad = (n) => String(n).padStart(2, "0");

function single(field) {
  return field.values && field.values.length === 1 ? field.values[0] : null;
}

// Contiguous runs of values, as [from, to] pairs.
function runs(values) {
  const out = [];
  for (const v of values) {
    const last = out.at(-1);
    if (last && v === last[1] + 1) last[1] = v;
    else out.push([v, v]);
  }
  return out;
}

function ordinal(n) {
  const tens = n % 100;
  const suffix = tens >= 11 && tens <= 13 ? "th" : ["th", "st", "nd", "rd"][n % 10] || "th";
  return `${n}${suffix}`;
}

// "every Monday", "every weekday", "every Monday, Wednesday and Friday"; "" when every day.
function weekdays(dow) {
  if (dow.any) return "";
  if (!dow.values) throw new Unsayable("weekday step");
  const days = [...new Set(dow.values.map((d) => d % 7))].sort((a, b) => a - b);
  if (days.length === 7) return "";
  if (days.join() === "1,2,3,4,5") return "every weekday";
  if (days.join() === "0,6") return "every Saturday and Sunday";
  const parts = runs(days).map(([a, b]) =>
    b - a >= 2 ? `${DAYS[a]} to ${DAYS[b]}` : list(range(a, b).map((d) => DAYS[d])),
  );
  return `every ${list(parts)}`;
}

function months(mon) {
  if (mon.any) return "";
  if (!mon.values) throw new Unsayable("month step");
  const parts = runs(mon.values).map(([a, b]) =>
    b - a >= 2 ? `${MONTHS[a - 1]} to ${MONTHS[b - 1]}` : list(range(a, b).map((m) => MONTHS[m - 1])),
  );
  return list(parts);
}

// The days the expression fires on: "every day", "every Monday", "on the 1st of every month", ...
function dayPhrase(dom, mon, dow) {
  if (!dom.any && !dow.any) throw new Unsayable("day of month and day of week together");
  const monthWords = months(mon);
  if (!dom.any) {
    if (!dom.values) throw new Unsayable("day step");
    const days = list(dom.values.map(ordinal));
    return `on the ${days} of ${monthWords || "every month"}`;
  }
  const week = weekdays(dow);
  if (monthWords) return `${week || "every day"} in ${monthWords}`;
  return week || "every day";
}

function times(hour, minute, second) {
  const hs = hour.values;
  const ms = minute.values;
  const ss = second ? second.values : [0];
  if (!hs || !ms || !ss || hs.length * ms.length * ss.length > 6) return null;
  const out = [];
  for (const h of hs)
    for (const m of ms)
      for (const s of ss) out.push(s ? `${pad(h)}:${pad(m)}:${pad(s)}` : `${pad(h)}:${pad(m)}`);
  return list(out);
}

function every(n, unit) {
  return n === 1 ? `every ${unit}` : `every ${n} ${unit}s`;
}

// "every 5 minutes", "every hour at minute 15", ... for schedules that fire several times a day.
function interval(hour, minute, second) {
  const secondAt = second ? single(second) : 0;
  if (second && secondAt === null) {
    if (!minute.any || !hour.any) throw new Unsayable("seconds within a window");
    if (second.any) return "every second";
    if (second.step && second.from === 0 && second.to === 59) return every(second.step, "second");
    throw new Unsayable("seconds");
  }
  const atSecond = secondAt ? ` and ${secondAt} s` : "";
  let phrase;
  if (minute.any) phrase = "every minute";
  else if (minute.step && minute.from === 0 && minute.to === 59) phrase = every(minute.step, "minute");
  else if (single(minute) !== null && (hour.any || hour.step)) {
    const m = single(minute);
    const n = hour.any ? 1 : hour.step;
    phrase = every(n, "hour") + (m || secondAt ? ` at minute ${m}${atSecond}` : "");
    if (hour.step && (hour.from !== 0 || hour.to !== 23)) {
      const last = hour.from + Math.floor((hour.to - hour.from) / hour.step) * hour.step;
      phrase += `, from ${pad(hour.from)}:${pad(m)} to ${pad(last)}:${pad(m)}`;
    }
    return phrase;
  } else if (minute.values && hour.any) {
    return `every hour at minutes ${list(minute.values.map(String))}${atSecond}`;
  } else throw new Unsayable("minutes");
  if (secondAt) phrase += ` at second ${secondAt}`;
  if (hour.any) return phrase;
  if (hour.values) {
    const windows = runs(hour.values).map(([a, b]) => `from ${pad(a)}:00 to ${pad(b)}:59`);
    return `${phrase}, ${list(windows)}`;
  }
  throw new Unsayable("hours");
}

const MACROS = {
  "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
  "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
};

/** The cron expression in words, without the time zone; the expression itself when it is unusual. */
export function cronInWords(expression) {
  const text = String(expression).trim();
  const fields = (MACROS[text.toLowerCase()] || text).split(/\s+/);
  try {
    if (fields.length !== 5 && fields.length !== 6) throw new Unsayable("field count");
    const rest = fields.slice(fields.length - 5);
    const second = fields.length === 6 ? parseField(fields[0], 0, 59) : null;
    const minute = parseField(rest[0], 0, 59);
    const hour = parseField(rest[1], 0, 23);
    const dom = parseField(rest[2], 1, 31);
    const mon = parseField(rest[3], 1, 12, MONTH_NAMES);
    const dow = parseField(rest[4], 0, 7, DAY_NAMES);
    const days = dayPhrase(dom, mon, dow);
    const at = times(hour, minute, second);
    if (at !== null) return `${days} at ${at}`;
    const often = interval(hour, minute, second);
    return days === "every day" ? often : `${often}, ${days}`;
  } catch (error) {
    if (error instanceof Unsayable) return `cron ${text}`;
    throw error;
  }
}

function utcMinute(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  const text = date.toISOString();
  return `${text.slice(0, 10)} ${text.slice(11, date.getUTCSeconds() ? 19 : 16)} UTC`;
}

/** A routine's trigger in words: "every day at 06:00, Europe/Paris", "once at 2026-09-30 23:59 UTC". */
export function triggerInWords(trigger) {
  if (!trigger || typeof trigger !== "object") return "no trigger";
  switch (trigger.type) {
    case "schedule":
      return `${cronInWords(trigger.cron_expression)}, ${trigger.time_zone || "UTC"}`;
    case "timer":
      return `once at ${utcMinute(trigger.at)}`;
    case "webhook":
      return `on each webhook delivery (${trigger.signature || "signed"})`;
    default:
      return `${trigger.type} trigger`;
  }
}
