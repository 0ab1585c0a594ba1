// Fanout web app: the caller's reports and a submit form (#/), one report filling in live
// (#/reports/<id>) and the operations page (#/ops). Plain DOM, no framework, no build step.
//
// Security: the page runs under a CSP without inline script, and nothing that comes from the
// API (report text, inputs, error messages) is ever parsed as HTML: every element is built
// with createElement and every string goes in as textContent. Report Markdown is rendered by
// the small renderer below, which only ever produces a fixed set of elements.
'use strict';

// ------------------------------------------------------------------------------ DOM helpers

/** An element: `props` are attributes (or DOM properties for non-strings), `class`, `text`,
 * `data` (dataset) and `on` (listeners); strings among `children` become text nodes. */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k === 'data') Object.assign(el.dataset, v);
    else if (k === 'on') for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (typeof v !== 'string' && k in el) el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  el.append(...children.flat(Infinity).filter((c) => c != null && c !== false));
  return el;
}

const $ = (sel, root = document) => root.querySelector(sel);

/** Set text only when it changed, so screen readers and selections are not disturbed. */
function setText(el, text) {
  const s = String(text ?? '');
  if (el.textContent !== s) el.textContent = s;
}

/** Keep `tbody`'s rows in step with `items`, keyed by `data-<attr>`. Rows keep their elements
 * across refreshes, so a focused button survives a poll. `cells(item)` gives one value per
 * column: text, `{text, class}`, or a function that builds the cell's content once. */
function syncRows(tbody, items, attr, keyOf, cells, emptyText) {
  const old = new Map();
  for (const tr of [...tbody.rows]) {
    if (tr.dataset[attr] === undefined) tr.remove(); // the "nothing here" row
    else old.set(tr.dataset[attr], tr);
  }
  items.forEach((item, i) => {
    const key = String(keyOf(item));
    const values = cells(item);
    let tr = old.get(key);
    old.delete(key);
    if (!tr) {
      tr = h('tr');
      tr.dataset[attr] = key;
      values.forEach(() => tr.append(h('td')));
    }
    values.forEach((v, j) => {
      const td = tr.cells[j];
      if (typeof v === 'function') {
        if (!td.firstChild) td.append(v());
        return;
      }
      if (v && typeof v === 'object') {
        if (td.className !== (v.class || '')) td.className = v.class || '';
        v = v.text;
      }
      setText(td, v);
    });
    if (tbody.rows[i] !== tr) tbody.insertBefore(tr, tbody.rows[i] || null);
  });
  for (const tr of old.values()) tr.remove();
  if (!items.length && emptyText) {
    const cols = tbody.closest('table').tHead?.rows[0]?.cells.length || 1;
    tbody.append(h('tr', { class: 'empty' }, h('td', { colSpan: cols, text: emptyText })));
  }
}

// ------------------------------------------------------------------------------- formatting

const fmt = {
  int: (n) => Math.round(Number(n) || 0).toLocaleString('en-US'),
  cost: (c) => `$${(Number(c) || 0).toFixed(4)}`,
  ms(ms) {
    if (ms == null) return '—';
    if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
    if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
    const m = Math.floor(ms / 60_000);
    return m < 60 ? `${m} min ${Math.round((ms % 60_000) / 1000)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
  },
  time: (ms) => (ms ? new Date(ms).toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' }) : '—'),
  ago: (ms) => (ms ? `${fmt.ms(Math.max(0, Date.now() - ms))} ago` : '—'),
};

/** `content_type` → `Content type`. */
const humanize = (name) => {
  const s = String(name).replace(/[_-]+/g, ' ').trim();
  return s.charAt(0).toUpperCase() + s.slice(1);
};
/** `personas` → `persona`: the noun of one item of a list input. */
const singular = (name) => humanize(name).toLowerCase().replace(/ies$/, 'y').replace(/s$/, '') || 'item';

// ------------------------------------------------------------------------------- the token

// The bearer token lives in sessionStorage only: gone when the tab closes, never in a URL.
const TOKEN_KEY = 'fanout.token';
const token = {
  get() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch { return ''; }
  },
  set(value) {
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch { /* storage disabled: the token lasts until reload */ }
  },
};

function showTokenForm(message) {
  const form = $('#token-form');
  // Take focus only when the API first asks: a poll that keeps getting 401 must not keep
  // stealing it.
  const ask = form.hidden || form.dataset.auto;
  delete form.dataset.auto;
  form.hidden = false;
  $('#token-toggle').setAttribute('aria-expanded', 'true');
  if (message) setText($('#token-message'), message);
  if (ask) $('#token').focus();
}

function hideTokenForm() {
  delete $('#token-form').dataset.auto;
  $('#token-form').hidden = true;
  $('#token-toggle').setAttribute('aria-expanded', 'false');
}

function setupTokenForm() {
  const form = $('#token-form');
  const input = $('#token');
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    // A header value: anything else would make every fetch throw.
    if (/[^\x21-\x7e]/.test(input.value.trim())) {
      setText($('#token-message'), 'A token is printable ASCII without spaces.');
      return;
    }
    token.set(input.value.trim());
    input.value = '';
    hideTokenForm();
    setText($('#token-message'), 'Kept in this tab only (session storage), sent as a bearer token.');
    templatesCache = null; // another token may be another tenant
    route();
  });
  $('#token-forget').addEventListener('click', () => {
    token.set('');
    input.value = '';
    templatesCache = null;
    setText($('#token-message'), 'Token forgotten.');
    route();
  });
  // Without a saved token the form is there from the start (no waiting for a 401 to ask);
  // the first answer that needed none (an open API) puts it away.
  if (!token.get()) {
    form.hidden = false;
    form.dataset.auto = 'true';
    $('#token-toggle').setAttribute('aria-expanded', 'true');
  }
  $('#token-toggle').addEventListener('click', () => {
    if (form.hidden) showTokenForm(token.get() ? 'A token is saved; enter another to replace it.' : '');
    else hideTokenForm();
  });
}

// ------------------------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `the API answered ${status}`);
    this.status = status;
    this.code = e.code || '';
    this.field = e.field || null;
  }
}

function authHeaders(headers = {}) {
  const t = token.get();
  return t ? { ...headers, Authorization: `Bearer ${t}` } : headers;
}

/** A request to the API; throws ApiError on an error status. A 401 asks for a token. */
async function request(method, path, { body, signal, accept = 'application/json', headers = {} } = {}) {
  const all = authHeaders({ Accept: accept, ...headers });
  if (body !== undefined) all['Content-Type'] = 'application/json';
  const res = await fetch(path, {
    method,
    headers: all,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: 'no-store',
  });
  if (!res.ok) {
    let payload = null;
    try { payload = await res.json(); } catch { /* not JSON */ }
    if (res.status === 401) {
      showTokenForm(token.get() ? 'The API did not accept this token. Enter another.' : 'The API needs a token.');
    }
    throw new ApiError(res.status, payload);
  }
  if (!token.get() && $('#token-form').dataset.auto) hideTokenForm();
  return res;
}

const api = async (method, path, opts) => {
  const res = await request(method, path, opts);
  return res.status === 204 ? null : res.json();
};

/** What to tell a person about a failed call. */
function errorText(e) {
  if (e instanceof ApiError) {
    if (e.status === 401) return 'The API needs a valid token: enter it above.';
    if (e.status === 403) return `Not allowed with this token: ${e.message}`;
    return e.field ? `${e.message} (${e.field})` : e.message;
  }
  return `Cannot reach the API (${e && e.message ? e.message : e}).`;
}

// Templates change only with a deploy: fetched once per token.
let templatesCache = null;
function templates() {
  templatesCache ||= api('GET', '/v1/templates').catch((e) => {
    templatesCache = null;
    throw e;
  });
  return templatesCache;
}

// ---------------------------------------------------------------------------------- routing

/** A page's lifetime: its fetches are aborted and its timers cleared when the page goes. */
function newContext() {
  const ac = new AbortController();
  const timeouts = new Set();
  const intervals = new Set();
  return {
    signal: ac.signal,
    get alive() { return !ac.signal.aborted; },
    stop() {
      ac.abort();
      timeouts.forEach(clearTimeout);
      intervals.forEach(clearInterval);
    },
    sleep(ms) {
      return new Promise((resolve) => {
        const t = setTimeout(() => { timeouts.delete(t); resolve(); }, ms);
        timeouts.add(t);
      });
    },
    every(ms, fn) { intervals.add(setInterval(fn, ms)); },
    /** Run `fn` now and again `ms` after each run settles: never two at once. */
    async poll(ms, fn) {
      while (!ac.signal.aborted) {
        await fn();
        await this.sleep(ms);
      }
    },
  };
}

let page = null;
// Warnings of the last submit, shown by the report page it leads to.
let flash = null;

function route(moveFocus = false) {
  if (page) page.stop();
  page = newContext();
  const hash = location.hash || '#/';
  const main = $('#main');
  main.replaceChildren();
  const m = /^#\/reports\/([0-9A-Za-z-]{1,64})$/.exec(hash);
  const ops = hash === '#/ops';
  $('#nav-ops').toggleAttribute('aria-current', ops);
  $('#nav-reports').toggleAttribute('aria-current', !ops);
  if (ops) $('#nav-ops').setAttribute('aria-current', 'page');
  else $('#nav-reports').setAttribute('aria-current', 'page');
  if (m) reportPage(main, page, m[1]);
  else if (ops) opsPage(main, page);
  else reportsPage(main, page);
  // After a navigation (not the first load) put focus on the new page's heading.
  if (moveFocus) ($('h1', main) || main).focus();
}

// ------------------------------------------------------------------------- Markdown → DOM

// Block constructs, one line each. Anything else is paragraph text.
const MD = {
  fence: /^ {0,3}(`{3,}|~{3,})(.*)$/,
  heading: /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/,
  hr: /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/,
  quote: /^ {0,3}> ?(.*)$/,
  ul: /^( {0,3})([-*+])[ \t]+(.*)$/,
  ol: /^( {0,3})(\d{1,9})([.)])[ \t]+(.*)$/,
  tableSep: /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/,
};
const MAX_DEPTH = 8;

/** Markdown text → a DocumentFragment of a fixed set of elements; never parsed as HTML. */
function renderMarkdown(src) {
  const frag = document.createDocumentFragment();
  const lines = String(src ?? '').replace(/\r\n?/g, '\n').replace(/\t/g, '    ').split('\n');
  mdBlocks(lines, frag, 0);
  return frag;
}

function mdBlocks(lines, parent, depth) {
  let para = [];
  const flush = () => {
    if (para.length) parent.append(h('p', {}, mdInline(para.join('\n'))));
    para = [];
  };
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      flush();
      i++;
    } else if ((m = MD.fence.exec(line)) && !(m[1][0] === '`' && m[2].includes('`'))) {
      flush();
      const close = new RegExp(`^ {0,3}${m[1][0]}{${m[1].length},}[ \\t]*$`);
      const code = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) code.push(lines[i]);
      i++; // the closing fence (or the end of the text)
      parent.append(h('pre', {}, h('code', { text: code.join('\n') })));
    } else if ((m = MD.heading.exec(line))) {
      flush();
      parent.append(h(`h${m[1].length}`, {}, mdInline(m[2] || '')));
      i++;
    } else if (MD.hr.test(line)) {
      flush();
      parent.append(h('hr'));
      i++;
    } else if (MD.quote.test(line)) {
      flush();
      const inner = [];
      for (; i < lines.length && (m = MD.quote.exec(lines[i])); i++) inner.push(m[1]);
      const q = h('blockquote');
      if (depth < MAX_DEPTH) mdBlocks(inner, q, depth + 1);
      else q.append(inner.join('\n'));
      parent.append(q);
    } else if (MD.ul.test(line) || MD.ol.test(line)) {
      flush();
      i = mdList(lines, i, parent, depth);
    } else if (line.includes('|') && i + 1 < lines.length && lines[i + 1].includes('|') && MD.tableSep.test(lines[i + 1])) {
      flush();
      i = mdTable(lines, i, parent);
    } else {
      para.push(line);
      i++;
    }
  }
  flush();
}

const isBlockStart = (l) => MD.ul.test(l) || MD.ol.test(l) || MD.heading.test(l) || MD.fence.test(l) || MD.quote.test(l) || MD.hr.test(l);
const indentOf = (l) => /^ */.exec(l)[0].length;

function mdList(lines, i, parent, depth) {
  const first = MD.ul.exec(lines[i]);
  const ordered = !first;
  const re = ordered ? MD.ol : MD.ul;
  const m0 = re.exec(lines[i]);
  const list = h(ordered ? 'ol' : 'ul');
  if (ordered && Number(m0[2]) !== 1) list.start = Number(m0[2]);
  const sameKind = (l) => {
    const m = re.exec(l);
    return m && (ordered ? m[3] === m0[3] : m[2] === m0[2]);
  };
  while (i < lines.length && sameKind(lines[i])) {
    const m = re.exec(lines[i]);
    // Continuation lines are indented; nested blocks keep what indentation is left after the
    // item's own content offset.
    const offset = ordered ? m[1].length + m[2].length + 2 : m[1].length + 2;
    const body = [ordered ? m[4] : m[3]];
    let loose = false;
    for (i++; i < lines.length; i++) {
      const l = lines[i];
      if (!l.trim()) {
        let j = i;
        while (j < lines.length && !lines[j].trim()) j++;
        if (j < lines.length && indentOf(lines[j]) >= 2) {
          for (; i < j; i++) body.push('');
          loose = true;
          i--;
          continue;
        }
        break;
      }
      if (indentOf(l) >= 2) body.push(l.slice(Math.min(indentOf(l), offset)));
      else if (isBlockStart(l)) break;
      else body.push(l); // lazy continuation of the item's paragraph
    }
    const li = h('li');
    if (depth < MAX_DEPTH) mdBlocks(body, li, depth + 1);
    else li.append(body.join('\n'));
    // A tight item shows its text without a paragraph around it.
    if (!loose && li.firstChild && li.firstChild.nodeName === 'P') li.firstChild.replaceWith(...li.firstChild.childNodes);
    list.append(li);
    // Items separated by blank lines still make one list.
    let j = i;
    while (j < lines.length && !lines[j].trim()) j++;
    if (j < lines.length && sameKind(lines[j])) i = j;
  }
  parent.append(list);
  return i;
}

function mdTable(lines, i, parent) {
  const cells = (l) => l.trim().replace(/^\|/, '').replace(/\|$/, '').split('|').map((c) => c.trim());
  const head = h('tr', {}, cells(lines[i]).map((c) => h('th', { scope: 'col' }, mdInline(c))));
  const body = h('tbody');
  for (i += 2; i < lines.length && lines[i].includes('|') && lines[i].trim(); i++) {
    body.append(h('tr', {}, cells(lines[i]).map((c) => h('td', {}, mdInline(c)))));
  }
  parent.append(h('div', { class: 'table-wrap' }, h('table', { class: 'md-table' }, h('thead', {}, head), body)));
  return i;
}

/** An http(s) URL, normalised, or null: no javascript:, data: or relative links. */
function safeUrl(raw) {
  try {
    const u = new URL(raw);
    return u.protocol === 'http:' || u.protocol === 'https:' ? u.href : null;
  } catch {
    return null;
  }
}

const LINK = /^\[([^[\]]*(?:\[[^[\]]*\][^[\]]*)*)\]\(\s*<?([^\s<>()]*(?:\([^\s<>()]*\)[^\s<>()]*)*)>?(?:\s+(?:"[^"]*"|'[^']*'))?\s*\)/;

/** Inline Markdown: code spans, **strong**, *em*, [links](https://…), escapes, hard breaks. */
function mdInline(s, depth = 0, inLink = false) {
  const frag = document.createDocumentFragment();
  let text = '';
  const push = (node) => {
    if (text) frag.append(text);
    text = '';
    frag.append(node);
  };
  let i = 0;
  while (i < s.length) {
    const c = s[i];
    if (c === '\\' && s[i + 1] === '\n') {
      push(h('br'));
      i += 2;
    } else if (c === '\\' && /[!-/:-@[-`{-~]/.test(s[i + 1] || '')) {
      text += s[i + 1];
      i += 2;
    } else if (c === '`') {
      const run = /^`+/.exec(s.slice(i))[0];
      const end = findRun(s, run, i + run.length);
      if (end < 0) {
        text += run;
        i += run.length;
        continue;
      }
      let code = s.slice(i + run.length, end).replace(/\n/g, ' ');
      if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1);
      push(h('code', { text: code }));
      i = end + run.length;
    } else if ((c === '*' || c === '_') && depth < MAX_DEPTH && canOpen(s, i)) {
      const strong = s[i + 1] === c && canOpen(s, i + 1);
      const mark = strong ? c + c : c;
      const end = findClose(s, mark, i + mark.length);
      if (end < 0) {
        text += mark;
        i += mark.length;
        continue;
      }
      push(h(strong ? 'strong' : 'em', {}, mdInline(s.slice(i + mark.length, end), depth + 1, inLink)));
      i = end + mark.length;
    } else if (c === '[' && !inLink && depth < MAX_DEPTH && LINK.test(s.slice(i))) {
      const m = LINK.exec(s.slice(i));
      const url = safeUrl(m[2]);
      // Only http(s) links become links; anything else stays as the text it was.
      if (url) push(h('a', { href: url, rel: 'noopener noreferrer', target: '_blank' }, mdInline(m[1], depth + 1, true)));
      else text += m[0];
      i += m[0].length;
    } else if (c === ' ' && /^ {2,}\n/.test(s.slice(i))) {
      const n = /^ +\n/.exec(s.slice(i))[0].length;
      push(h('br'));
      i += n;
    } else {
      text += c;
      i++;
    }
  }
  if (text) frag.append(text);
  return frag;
}

/** The next backtick run exactly as long as `run`. */
function findRun(s, run, from) {
  for (let j = s.indexOf(run, from); j >= 0; j = s.indexOf(run, j + 1)) {
    const len = /^`+/.exec(s.slice(j))[0].length;
    if (len === run.length) return j;
    j += len - 1;
  }
  return -1;
}

/** An emphasis mark opens when followed by text, and `_` only at a word start (snake_case). */
function canOpen(s, i) {
  const next = s[i + 1] || ' ';
  if (/\s/.test(next)) return false;
  return s[i] === '*' || !/[\p{L}\p{N}]/u.test(s[i - 1] || ' ');
}

/** Where `mark` closes: after text, not part of a longer run, `_` only at a word end. */
function findClose(s, mark, from) {
  const c = mark[0];
  for (let j = from + 1; j < s.length; j++) {
    if (s[j] === '`') { // no emphasis closes inside a code span
      const run = /^`+/.exec(s.slice(j))[0];
      const end = findRun(s, run, j + run.length);
      if (end > 0) j = end + run.length - 1;
      continue;
    }
    if (s[j] !== c) continue;
    let run = 1;
    while (s[j + run] === c) run++;
    const ok = !/\s/.test(s[j - 1]) && (c === '*' || !/[\p{L}\p{N}]/u.test(s[j + run] || ' '));
    if (ok && run === mark.length) return j;
    if (ok && mark.length === 1 && run === 3) return j + 2;
    if (ok && mark.length === 2 && run === 3) return j + 1;
    j += run - 1;
  }
  return -1;
}

// ------------------------------------------------------------------------------ page: reports

function reportsPage(main, ctx) {
  document.title = 'Reports · Fanout';
  const filter = h('select', { id: 'status-filter' },
    h('option', { value: '', text: 'All' }),
    ['running', 'completed', 'completed_with_failures', 'failed', 'cancelled'].map((s) => h('option', { value: s, text: s.replace(/_/g, ' ') })));
  const tbody = h('tbody');
  const message = h('p', { id: 'reports-message', class: 'message', 'aria-live': 'polite' });
  main.append(
    h('h1', { tabindex: '-1', text: 'Reports' }),
    h('div', { class: 'columns' },
      h('section', { class: 'panel', 'aria-labelledby': 'new-report-h' },
        h('h2', { id: 'new-report-h', text: 'New report' }),
        submitForm()),
      h('section', { class: 'panel', 'aria-labelledby': 'your-reports-h' },
        h('div', { class: 'panel-head' },
          h('h2', { id: 'your-reports-h', text: 'Your reports' }),
          h('span', { class: 'inline-field' }, h('label', { for: 'status-filter', text: 'Status' }), filter)),
        message,
        h('div', { class: 'table-wrap' },
          h('table', { id: 'reports' },
            h('thead', {}, h('tr', {}, ['Report', 'Template', 'Status', 'Created'].map((t) => h('th', { scope: 'col', text: t })))),
            tbody)))));

  const load = async () => {
    try {
      const q = new URLSearchParams({ limit: '50' });
      if (filter.value) q.set('status', filter.value);
      const data = await api('GET', `/v1/reports?${q}`, { signal: ctx.signal });
      setText(message, '');
      syncRows(tbody, data.reports, 'reportId', (r) => r.id, (r) => [
        () => h('a', { href: `#/reports/${r.id}`, class: 'mono', text: r.id }),
        r.title || r.template,
        { text: r.status, class: `status state-${r.status}` },
        fmt.time(r.created_at),
      ], filter.value ? 'No reports with this status.' : 'No reports yet: submit one.');
    } catch (e) {
      if (ctx.alive) setText(message, errorText(e));
    }
  };
  filter.addEventListener('change', load);
  ctx.poll(4000, load);
}

// --------------------------------------------------------------------------- the submit form

// Controls are found by id `f:<path>`; hints and errors by `h:<path>` / `e:<path>`.
const fid = (path) => `f:${path}`;
const errorEl = (path) => h('p', { class: 'field-error', id: `e:${path}`, data: { errorFor: path }, hidden: true });
const requiredMark = () => h('span', { class: 'required', title: 'required', text: ' *' });

function submitForm() {
  const select = h('select', { id: 'template', name: 'template', 'data-path': 'template' });
  const about = h('p', { class: 'hint', id: 'template-about' });
  const lane = h('select', { id: fid('lane'), name: 'lane', 'data-path': 'lane' },
    h('option', { value: '', text: 'Template default' }),
    h('option', { value: 'interactive', text: 'interactive' }),
    h('option', { value: 'batch', text: 'batch' }));
  const fields = h('div', { class: 'fields' });
  const formError = h('div', { id: 'form-error', class: 'form-error', 'aria-live': 'polite', tabindex: '-1', hidden: true });
  const submit = h('button', { id: 'submit', type: 'submit', text: 'Submit report' });
  const form = h('form', { id: 'submit-form', noValidate: true },
    formError,
    h('div', { class: 'field' }, h('label', { for: 'template', text: 'Template' }), select, about, errorEl('template')),
    fields,
    h('div', { class: 'field' }, h('label', { for: fid('lane'), text: 'Lane' }), lane, errorEl('lane')),
    h('div', { class: 'actions' }, submit));

  let list = [];
  const current = () => list.find((t) => t.name === select.value);
  const build = () => {
    const t = current();
    setText(about, t ? t.description : '');
    fields.replaceChildren(...(t ? t.inputs.map((spec) => buildField(spec, `inputs.${spec.name}`)) : []));
    clearErrors(form);
  };
  templates().then((ts) => {
    list = ts;
    select.replaceChildren(...ts.map((t) => h('option', { value: t.name, text: t.title ? `${t.title} (${t.name})` : t.name })));
    build();
  }).catch((e) => showFormError(form, errorText(e)));
  select.addEventListener('change', build);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const t = current();
    if (!t || submit.disabled) return;
    clearErrors(form);
    const inputs = {};
    for (const spec of t.inputs) {
      const v = collect(spec, `inputs.${spec.name}`);
      if (v !== undefined) inputs[spec.name] = v;
    }
    const body = { template: t.name, inputs };
    if (lane.value) body.lane = lane.value;
    submit.disabled = true;
    setText(submit, 'Submitting…');
    try {
      const acc = await api('POST', '/v1/reports', { body });
      flash = { id: acc.id, warnings: acc.warnings || [], duplicate: acc.duplicate };
      location.hash = `#/reports/${acc.id}`;
    } catch (e) {
      showApiError(form, e);
    } finally {
      submit.disabled = false;
      setText(submit, 'Submit report');
    }
  });
  return form;
}

/** The control (or group) for one input at `path` (`inputs.personas[0].name`). */
function buildField(spec, path) {
  if (spec.kind === 'list') return buildList(spec, path);
  if (spec.kind === 'object') {
    return h('fieldset', { class: 'object' },
      h('legend', {}, humanize(spec.name), spec.required && requiredMark()),
      spec.description && h('p', { class: 'hint', text: spec.description }),
      (spec.fields || []).map((f) => buildField(f, `${path}.${f.name}`)),
      errorEl(path));
  }
  const control = buildControl(spec, path);
  const label = h('label', { for: control.id }, humanize(spec.name), spec.required && requiredMark());
  const hint = spec.description && h('p', { class: 'hint', id: `h:${path}`, text: spec.description });
  const isCheck = control.type === 'checkbox';
  return h('div', { class: isCheck ? 'field check' : 'field' },
    isCheck ? [control, label] : [label, control], hint, errorEl(path));
}

function buildControl(spec, path) {
  const props = {
    id: fid(path),
    name: path,
    'data-path': path,
    'aria-required': spec.required ? 'true' : null,
    'aria-describedby': spec.description ? `h:${path} e:${path}` : `e:${path}`,
  };
  const choices = spec.enum || spec.choices || spec.options;
  if (Array.isArray(choices)) {
    return h('select', props, !spec.required && h('option', { value: '', text: '—' }),
      choices.map((c) => h('option', { value: String(c), text: String(c) })));
  }
  switch (spec.kind) {
    case 'text':
      return h('textarea', { ...props, rows: spec.max_chars > 5000 ? '8' : '3', maxlength: spec.max_chars ? String(spec.max_chars) : null });
    case 'number':
    case 'integer':
      return h('input', { ...props, type: 'number', step: spec.kind === 'integer' ? '1' : 'any', inputmode: 'decimal' });
    case 'bool':
    case 'boolean':
      return h('input', { ...props, type: 'checkbox' });
    default:
      return h('input', { ...props, type: 'text', maxlength: spec.max_chars ? String(spec.max_chars) : null });
  }
}

/** A list input: one fieldset per item, Add and Remove buttons, renumbered on removal. */
function buildList(spec, path) {
  const item = spec.items || { kind: 'string', fields: [] };
  const noun = singular(spec.name);
  const holder = h('div', { class: 'list-items' });
  const add = h('button', { type: 'button', class: 'add-item secondary', text: `Add ${noun}` });
  const box = h('fieldset', { class: 'list', 'data-list': path },
    h('legend', {}, humanize(spec.name), spec.required && requiredMark()),
    spec.description && h('p', { class: 'hint', text: spec.description }),
    holder, add, errorEl(path));
  // The path is read from the box, as renumbering an outer list changes it.
  const listPath = () => box.dataset.list;
  const update = () => {
    const n = holder.children.length;
    add.disabled = spec.max_items != null && n >= spec.max_items;
    for (const fs of holder.children) fs.removeButton.disabled = spec.required && n <= 1;
  };
  const addItem = () => {
    const i = holder.children.length;
    const fs = buildListItem(item, `${listPath()}[${i}]`, i, noun, () => {
      const at = [...holder.children].indexOf(fs);
      fs.remove();
      renumber(holder, listPath());
      update();
      const next = holder.children[Math.min(at, holder.children.length - 1)];
      ($('.remove-item:not(:disabled)', next || box) || add).focus();
    });
    holder.append(fs);
    update();
    return fs;
  };
  add.addEventListener('click', () => $('input, textarea, select', addItem())?.focus());
  addItem(); // start with one item: a panel needs at least one persona
  return box;
}

function buildListItem(item, path, i, noun, onRemove) {
  const title = h('legend', { id: `l:${path}`, text: `${humanize(noun)} ${i + 1}` });
  const remove = h('button', { type: 'button', class: 'remove-item secondary', text: 'Remove', 'aria-label': `Remove ${noun} ${i + 1}`, on: { click: onRemove } });
  const fs = h('fieldset', { class: 'list-item', data: { index: String(i) } }, title);
  fs.removeButton = remove;
  fs.renumber = (j) => {
    setText(title, `${humanize(noun)} ${j + 1}`);
    remove.setAttribute('aria-label', `Remove ${noun} ${j + 1}`);
  };
  if (item.kind === 'object') {
    fs.append(...(item.fields || []).map((f) => buildField(f, `${path}.${f.name}`)), errorEl(path), h('div', { class: 'item-actions' }, remove));
  } else {
    // One control per item: on one line with its Remove button, the legend for screen readers.
    const control = buildControl({ ...item, required: true }, path);
    control.setAttribute('aria-labelledby', `l:${path}`);
    title.className = 'sr-only';
    fs.classList.add('scalar');
    fs.append(h('div', { class: 'field inline' }, control, remove), errorEl(path));
  }
  return fs;
}

// Attributes that carry a path, and so change when an item's index does.
const PATH_ATTRS = ['name', 'data-path', 'id', 'for', 'data-error-for', 'data-list', 'aria-describedby', 'aria-labelledby'];

/** After a removal: items are 0..n-1 again, and every path inside them says so. */
function renumber(holder, listPath) {
  [...holder.children].forEach((fs, j) => {
    const old = Number(fs.dataset.index);
    if (old === j) return;
    const from = `${listPath}[${old}]`;
    const to = `${listPath}[${j}]`;
    for (const el of [fs, ...fs.querySelectorAll('*')]) {
      for (const a of PATH_ATTRS) {
        const v = el.getAttribute(a);
        if (v && v.includes(from)) el.setAttribute(a, v.split(' ').map((t) => t.replace(from, to)).join(' '));
      }
    }
    fs.dataset.index = String(j);
    fs.renumber(j);
  });
}

/** The value of the input at `path`, read from the form; undefined when left empty. */
function collect(spec, path) {
  if (spec.kind === 'object') {
    const out = {};
    for (const f of spec.fields || []) {
      const v = collect(f, `${path}.${f.name}`);
      if (v !== undefined) out[f.name] = v;
    }
    return Object.keys(out).length || spec.required ? out : undefined;
  }
  if (spec.kind === 'list') {
    const box = [...document.querySelectorAll('[data-list]')].find((b) => b.dataset.list === path);
    if (!box) return undefined;
    const item = spec.items || { kind: 'string' };
    const itemSpec = item.kind === 'object' ? { kind: 'object', fields: item.fields, required: true } : item;
    const values = [...$('.list-items', box).children].map((_, i) => collect(itemSpec, `${path}[${i}]`));
    // Drop empty items at the end only, so that the indexes in a 422 still match the form.
    const isEmpty = (v) => v === undefined || (typeof v === 'object' && !Object.keys(v).length);
    while (values.length && isEmpty(values[values.length - 1])) values.pop();
    const filled = values.map((v) => (v === undefined ? (item.kind === 'object' ? {} : '') : v));
    return filled.length || spec.required ? filled : undefined;
  }
  const el = document.getElementById(fid(path));
  if (!el) return undefined;
  if (el.type === 'checkbox') return el.checked;
  if (el.value === '') return undefined;
  if (el.type === 'number') return Number.isFinite(Number(el.value)) ? Number(el.value) : el.value;
  return el.value;
}

function clearErrors(form) {
  for (const e of form.querySelectorAll('.field-error')) {
    e.hidden = true;
    e.textContent = '';
  }
  for (const c of form.querySelectorAll('[aria-invalid]')) c.removeAttribute('aria-invalid');
  const top = $('#form-error', form);
  top.hidden = true;
  top.replaceChildren();
}

function showFormError(form, ...content) {
  const top = $('#form-error', form);
  top.replaceChildren(...content);
  top.hidden = false;
}

/** A failed submit: the message beside the field `field` names (or its nearest shown parent)
 * and a summary at the top. */
function showApiError(form, e) {
  if (!(e instanceof ApiError) || !e.field) {
    showFormError(form, h('p', { text: errorText(e) }));
    $('#form-error', form).focus();
    return;
  }
  // The nearest path with a place for the message: `inputs.personas[3]` → `inputs.personas`.
  const parent = (p) => {
    const q = p.replace(/(\.[^.[\]]+|\[\d+\])$/, '');
    return q === p ? '' : q;
  };
  let path = e.field;
  let target = null;
  while (path && !(target = [...form.querySelectorAll('.field-error')].find((el) => el.dataset.errorFor === path))) path = parent(path);
  const control = path
    ? document.getElementById(fid(path)) || target.parentElement.querySelector('input, textarea, select, button')
    : null;
  if (target) {
    target.textContent = e.message;
    target.hidden = false;
  }
  if (control) control.setAttribute('aria-invalid', 'true');
  const go = h('button', { type: 'button', class: 'link', text: e.field });
  go.addEventListener('click', () => (control || target)?.focus());
  showFormError(form, h('p', {}, 'The report was not accepted: ', go, `: ${e.message}`));
  (control || $('#form-error', form)).focus();
}

// ------------------------------------------------------------------------------- page: report

function reportPage(main, ctx, id) {
  document.title = 'Report · Fanout';
  const el = {};
  const item = (label, key) => h('div', {}, h('dt', { text: label }), (el[key] = h('dd', { id: `report-${key}`, text: '—' })));
  // The article (and its data-status) appears with the first view of the report.
  const loading = h('p', { class: 'hint', 'aria-live': 'polite', text: 'Loading the report…' });
  const root = h('article', { id: 'report', data: { reportId: id } },
    h('header', { class: 'report-head' },
      (el.title = h('h1', { tabindex: '-1', text: 'Report' })),
      (el.about = h('p', { class: 'hint mono', text: id })),
      h('p', { class: 'report-status', 'aria-live': 'polite' },
        (el.status = h('span', { id: 'report-status', class: 'badge' })),
        (el.live = h('span', { id: 'live', class: 'hint' }))),
      h('div', { class: 'progress-row' },
        h('label', { for: 'progress', class: 'sr-only', text: 'Progress' }),
        (el.progress = h('progress', { id: 'progress', max: 1, value: 0 })),
        (el.progressText = h('span', { class: 'hint' }))),
      h('dl', { class: 'totals' }, item('Tokens', 'tokens'), item('Cost', 'cost'), item('Wall time', 'wall'), item('Jobs', 'jobs')),
      h('div', { class: 'actions' },
        (el.cancel = h('button', { id: 'cancel', type: 'button', class: 'danger', hidden: true, text: 'Cancel report' })),
        (el.md = h('button', { id: 'download-md', type: 'button', class: 'secondary', text: 'Download Markdown' })),
        (el.json = h('button', { id: 'download-json', type: 'button', class: 'secondary', text: 'Download JSON' }))),
      (el.message = h('div', { id: 'report-message', class: 'message', 'aria-live': 'polite' })),
      (el.warnings = h('ul', { id: 'report-warnings', class: 'warnings', hidden: true }))),
    (el.sections = h('div', { class: 'sections' })));
  main.append(loading);
  const say = (...content) => el.message.replaceChildren(...content);

  if (flash && flash.id === id) {
    const notes = [...flash.warnings];
    if (flash.duplicate) notes.unshift('This request matched an earlier report: showing that one.');
    el.warnings.replaceChildren(...notes.map((w) => h('li', { text: w })));
    el.warnings.hidden = !notes.length;
    flash = null;
  }

  let view = null;
  let template = null;
  let skew = 0; // server clock − this clock, from the last view
  let fetchedAt = 0;
  const groups = new Map(); // section id → its elements
  // The report runs through the provider's Batch API: a running section waits for its batch.
  let batchApi = false;

  const render = () => {
    const v = view;
    const t = v.totals;
    if (!root.isConnected) {
      const focused = document.activeElement === main; // the router's, while loading
      main.replaceChildren(root);
      if (focused) el.title.focus();
    }
    root.dataset.status = v.status;
    document.title = `${v.title || v.template} · Fanout`;
    setText(el.title, v.title || v.template);
    batchApi = !!v.batch_api;
    const mode = v.batch_api
      ? ` · Batch API${v.deadline_at ? `, due ${fmt.time(v.deadline_at)}` : ''}`
      : '';
    setText(el.about, `${v.template} · ${v.id} · created ${fmt.time(v.created_at)} · ${v.lane}${mode}`);
    setText(el.status, v.status);
    el.status.className = `badge state-${v.status}`;
    const finished = t.done + t.failed + t.skipped + t.cancelled;
    el.progress.max = Math.max(1, t.sections);
    el.progress.value = finished;
    setText(el.progressText, `${finished} of ${t.sections} jobs finished`);
    setText(el.tokens, String(t.total_tokens)); // plain digits: easy to read back and compare
    el.tokens.title = `${fmt.int(t.prompt_tokens)} in, ${fmt.int(t.completion_tokens)} out`;
    setText(el.cost, fmt.cost(t.cost));
    setText(el.wall, fmt.ms(v.status === 'running' ? t.wall_ms + Date.now() - fetchedAt : t.wall_ms));
    const parts = [`${t.done} done`];
    if (t.failed) parts.push(`${t.failed} failed`);
    if (t.skipped) parts.push(`${t.skipped} skipped`);
    if (t.cancelled) parts.push(`${t.cancelled} cancelled`);
    if (t.in_progress) parts.push(`${t.in_progress} to go`);
    setText(el.jobs, parts.join(', '));
    el.cancel.hidden = v.status !== 'running';
    renderSections(v);
  };

  const renderSections = (v) => {
    const bySection = new Map();
    for (const s of v.sections) {
      if (!bySection.has(s.section)) bySection.set(s.section, []);
      bySection.get(s.section).push(s);
    }
    // Template order; sections the template does not list (it changed) after them.
    const order = (template ? template.sections.map((s) => s.id) : []).filter((s) => bySection.has(s));
    for (const s of bySection.keys()) if (!order.includes(s)) order.push(s);
    order.forEach((sid, i) => {
      const jobs = bySection.get(sid);
      const spec = template && template.sections.find((s) => s.id === sid);
      const each = Boolean(spec ? spec.for_each : jobs.some((j) => j.index != null));
      let g = groups.get(sid);
      if (!g) {
        g = jobView('section', { sectionId: sid }, 'h2', 'section-title');
        g.items = new Map();
        groups.set(sid, g);
      }
      if (el.sections.children[i] !== g.root) el.sections.insertBefore(g.root, el.sections.children[i] || null);
      setText(g.title, jobs[0].title || humanize(sid));
      if (!each) {
        updateJob(g, jobs[0], spec);
        return;
      }
      const state = groupState(jobs);
      g.root.dataset.state = state;
      setText(g.state, state);
      g.state.className = `section-state badge state-${state}`;
      const done = jobs.filter((j) => j.state === 'done').length;
      const tokens = jobs.reduce((a, j) => a + j.prompt_tokens + j.completion_tokens, 0);
      const cost = jobs.reduce((a, j) => a + j.cost, 0);
      setText(g.meta, `${done} of ${jobs.length} done · ${fmt.int(tokens)} tokens · ${fmt.cost(cost)}`);
      g.reason.hidden = true;
      jobs.forEach((job, k) => {
        let it = g.items.get(job.job_id);
        if (!it) {
          it = jobView('article', { jobId: job.job_id }, 'h3', 'item-title');
          it.root.classList.add('item');
          g.items.set(job.job_id, it);
        }
        if (g.body.children[k] !== it.root) g.body.insertBefore(it.root, g.body.children[k] || null);
        setText(it.title, job.item || `${humanize(singular(spec ? spec.for_each : sid))} ${(job.index ?? k) + 1}`);
        updateJob(it, job, spec);
      });
    });
  };

  /** The elements of one section or one for_each item. */
  const jobView = (tag, data, heading, titleClass) => {
    const v = { text: null };
    v.root = h(tag, { class: tag === 'section' ? 'section' : '', data },
      h('header', { class: 'section-head' },
        (v.title = h(heading, { class: titleClass })),
        (v.state = h('span', { class: 'section-state badge' }))),
      (v.meta = h('p', { class: 'section-meta' })),
      (v.reason = h('p', { class: 'section-reason', hidden: true })),
      (v.body = h('div', { class: 'section-body' })));
    return v;
  };

  const updateJob = (v, job, spec) => {
    v.root.dataset.state = job.state;
    setText(v.state, job.state);
    v.state.className = `section-state badge state-${job.state}`;
    setText(v.meta, jobMeta(job, spec));
    const showReason = job.reason && job.state !== 'done';
    v.reason.hidden = !showReason;
    if (showReason) setText(v.reason, job.state === 'running' ? `Last attempt failed: ${job.reason}` : job.reason);
    // Re-render Markdown only when the text changed: keeps selections and scroll steady.
    if (job.text !== v.text) {
      v.text = job.text;
      v.body.replaceChildren(job.text ? renderMarkdown(job.text) : '');
    }
  };

  const jobMeta = (job, spec) => {
    const now = Date.now() + skew;
    const parts = [];
    if (job.state === 'pending') {
      const deps = spec && spec.depends_on.length ? spec.depends_on : [];
      parts.push(deps.length ? `waits for ${deps.join(', ')}` : 'waiting');
    } else if (job.state === 'ready') parts.push('queued for a worker');
    else if (job.state === 'running' && job.started_at && batchApi) parts.push(`in the Batch API lane for ${fmt.ms(now - job.started_at)}`);
    else if (job.state === 'running' && job.started_at) parts.push(`running for ${fmt.ms(now - job.started_at)}`);
    else if (job.latency_ms != null) parts.push(fmt.ms(job.latency_ms));
    else if (job.started_at && job.finished_at) parts.push(fmt.ms(job.finished_at - job.started_at));
    if (job.prompt_tokens || job.completion_tokens) parts.push(`${fmt.int(job.prompt_tokens + job.completion_tokens)} tokens`);
    if (job.cost) parts.push(fmt.cost(job.cost));
    if (job.model) parts.push(job.model);
    if (job.attempts > 1) parts.push(`${job.attempts} attempts`);
    if (job.cached) parts.push('cached');
    if (job.batch_api) parts.push('batch API');
    if (job.optional) parts.push('optional');
    return parts.join(' · ');
  };

  // At most one fetch at a time; events that arrive meanwhile cause one more.
  let busy = false;
  let again = false;
  const refresh = async () => {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    try {
      do {
        again = false;
        const v = await api('GET', `/v1/reports/${id}`, { signal: ctx.signal });
        if (!ctx.alive) return;
        if (!template) template = await templates().then((ts) => ts.find((t) => t.name === v.template)).catch(() => null);
        view = v;
        fetchedAt = Date.now();
        skew = v.created_at + v.totals.wall_ms - fetchedAt;
        render();
      } while (again && ctx.alive);
    } catch (e) {
      if (!ctx.alive) return;
      const text = e instanceof ApiError && e.status === 404
        ? 'No such report: it never existed, expired, or belongs to another tenant.'
        : errorText(e);
      if (root.isConnected) say(h('p', { text }));
      else setText(loading, text);
    } finally {
      busy = false;
    }
  };

  el.cancel.addEventListener('click', async () => {
    el.cancel.disabled = true;
    say(h('p', { text: 'Cancelling…' }));
    try {
      const r = await api('DELETE', `/v1/reports/${id}`);
      say(h('p', { text: `Cancellation requested: the report is ${r.status}.` }));
      refresh();
    } catch (e) {
      say(h('p', { text: `Could not cancel: ${errorText(e)}` }));
    } finally {
      el.cancel.disabled = false;
    }
  });

  const download = async (ext, btn) => {
    btn.disabled = true;
    try {
      const res = await request('GET', `/v1/reports/${id}/report.${ext}`, { accept: ext === 'md' ? 'text/markdown' : 'application/json' });
      const url = URL.createObjectURL(await res.blob());
      const name = `report-${id}.${ext}`;
      const a = h('a', { href: url, download: name, text: `Save ${name}` });
      // Also left on the page, in case the browser blocks the started download.
      say(h('p', {}, 'Downloaded. ', a));
      a.click();
      setTimeout(() => URL.revokeObjectURL(url), 5 * 60_000);
    } catch (e) {
      say(h('p', { text: `Could not download: ${errorText(e)}` }));
    } finally {
      btn.disabled = false;
    }
  };
  el.md.addEventListener('click', () => download('md', el.md));
  el.json.addEventListener('click', () => download('json', el.json));

  // Running times tick between events.
  ctx.every(1000, () => {
    if (view && view.status === 'running') render();
  });
  // A finished report does not change: only a running one is followed.
  refresh().then(() => {
    if (ctx.alive && view && view.status === 'running') followEvents(ctx, id, refresh, (s) => setText(el.live, s));
  });
}

/** A for_each section's state, from its items'. */
function groupState(jobs) {
  const has = (s) => jobs.some((j) => j.state === s);
  for (const s of ['running', 'ready', 'pending']) if (has(s)) return s;
  for (const s of ['failed', 'cancelled', 'skipped']) if (has(s)) return s;
  return 'done';
}

/** Follow a report's Server-Sent Events with fetch (EventSource cannot send the token).
 * Each event triggers `onEvent` (a re-fetch of the report). A dropped connection is
 * reopened with backoff, sending the last event id so that nothing is missed or repeated;
 * the final `report` event ends it. */
async function followEvents(ctx, id, onEvent, onStatus) {
  let lastId = null;
  let delay = 1000;
  while (ctx.alive) {
    try {
      const headers = { 'Cache-Control': 'no-cache' };
      if (lastId) headers['Last-Event-ID'] = lastId;
      const res = await request('GET', `/v1/reports/${id}/events`, { signal: ctx.signal, accept: 'text/event-stream', headers });
      onStatus('· live');
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buf = '';
      let ev = { data: [], type: '' };
      let ended = false;
      while (!ended) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        const lines = buf.split(/\r\n|\r|\n/);
        buf = lines.pop(); // an unfinished line waits for the next chunk
        for (const line of lines) {
          if (line === '') { // end of an event
            if (ev.data.length) {
              delay = 1000;
              if (ev.type === 'report') ended = true;
              if (ev.type !== 'error') onEvent(ev);
            }
            ev = { data: [], type: '' };
            continue;
          }
          if (line.startsWith(':')) continue; // keep-alive comment
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'id' && !value.includes('\0')) lastId = value;
          else if (field === 'event') ev.type = value;
          else if (field === 'data') ev.data.push(value);
        }
        if (ended) break;
      }
      if (ended) {
        reader.cancel().catch(() => {});
        onStatus('');
        return;
      }
      throw new Error('the stream ended early');
    } catch (e) {
      if (!ctx.alive) return;
      if (e instanceof ApiError && [401, 403, 404].includes(e.status)) {
        onStatus('');
        return;
      }
      onStatus(`· connection lost, retrying in ${Math.round(delay / 1000)} s`);
      await ctx.sleep(delay);
      delay = Math.min(delay * 2, 30_000);
      onEvent(null); // catch up on the report itself while reconnecting
    }
  }
}

// ---------------------------------------------------------------------------- page: operations

const SERIES_COLOURS = ['#2563eb', '#d97706', '#059669', '#db2777', '#7c3aed', '#0891b2', '#65a30d', '#dc2626'];
const CHART_SPAN_MS = 10 * 60_000;

function opsPage(main, ctx) {
  document.title = 'Operations · Fanout';
  const table = (id, heads) => h('div', { class: 'table-wrap' },
    h('table', { id }, h('thead', {}, h('tr', {}, heads.map((t) => h('th', { scope: 'col', text: t })))), h('tbody')));
  const section = (title, ...content) => h('section', { class: 'panel' }, h('h2', { text: title }), ...content);
  const message = h('div', { id: 'ops-message', class: 'message', 'aria-live': 'polite', tabindex: '-1' });
  const warnings = h('ul', { id: 'ops-warnings', class: 'warnings', hidden: true });
  const canvas = h('canvas', { id: 'budget-chart', height: 160, role: 'img', 'aria-label': 'Requests in the last minute' });
  const legend = h('ul', { class: 'legend' });
  const outbox = h('p', { class: 'hint', id: 'webhook-outbox' });
  main.append(
    h('h1', { tabindex: '-1', text: 'Operations' }),
    message, warnings,
    section('Queues', table('lanes', ['Lane', 'Ready', 'In flight', 'Delayed', 'Dead', 'Lag', 'Oldest ready'])),
    section('Workers', table('workers', ['Worker', 'Host', 'Version', 'In flight', 'Last seen'])),
    section('Budget',
      table('budget', ['Key', 'Family', 'Requests (last min / limit)', 'Tokens (last min / limit)', 'Calls in flight', 'Waiting', 'Paused']),
      h('figure', { class: 'chart' }, canvas, h('figcaption', {}, 'Requests in the last minute, since this page opened', legend))),
    section('Dead letters', table('dead-letters', ['Dead letter', 'Reason', 'Report', 'Section', 'Attempts', 'Dead since', 'Actions'])),
    section('Dead webhooks', outbox, table('dead-webhooks', ['Report', 'URL', 'Attempts', 'Reason', 'Actions'])));
  const tbody = (id) => $(`#${id} tbody`, main);
  const say = (text) => setText(message, text);

  const history = new Map(); // "key / family" → [{t, v}]
  let denied = false;

  const load = async () => {
    if (denied) return;
    try {
      const [status, dead, hooks] = await Promise.all([
        api('GET', '/v1/status', { signal: ctx.signal }),
        api('GET', '/v1/dead-letters?limit=100', { signal: ctx.signal }),
        api('GET', '/v1/webhooks/dead?limit=100', { signal: ctx.signal }),
      ]);
      if (!ctx.alive) return;
      if (message.dataset.kind === 'error') { say(''); delete message.dataset.kind; }
      warnings.replaceChildren(...status.warnings.map((w) => h('li', { text: w })));
      warnings.hidden = !status.warnings.length;
      syncRows(tbody('lanes'), status.lanes, 'lane', (l) => l.lane, (l) => [
        l.lane, fmt.int(l.ready), fmt.int(l.in_flight), fmt.int(l.delayed),
        { text: fmt.int(l.dead), class: l.dead ? 'warn' : '' }, l.lag == null ? '—' : fmt.int(l.lag),
        l.oldest_ready_ms == null ? '—' : fmt.ms(l.oldest_ready_ms),
      ]);
      syncRows(tbody('workers'), status.workers, 'workerId', (w) => w.id, (w) => [
        { text: w.id, class: 'mono' }, w.host, w.version, `${w.in_flight} / ${w.concurrency}`, fmt.ago(w.last_seen_ms),
      ], 'No worker is alive.');
      syncRows(tbody('budget'), status.budget, 'budget', (b) => `${b.key}/${b.family}`, (b) => [
        b.key, b.family,
        usage(b.requests_last_minute, b.requests_per_minute, b.configured_requests_per_minute),
        usage(b.tokens_last_minute, b.tokens_per_minute, b.configured_tokens_per_minute),
        `${b.in_flight} / ${b.max_concurrent_requests}`, fmt.int(b.waiters),
        b.paused_for_ms ? fmt.ms(b.paused_for_ms) : '—',
      ], 'No budget in use yet.');
      sample(history, status.budget);
      drawChart(canvas, legend, history);
      syncRows(tbody('dead-letters'), dead.dead_letters, 'deadId', (d) => d.id, (d) => [
        { text: d.id, class: 'mono' },
        d.last_error && d.last_error !== d.reason ? `${d.reason}: ${d.last_error}` : d.reason,
        () => (d.report_id ? h('a', { href: `#/reports/${d.report_id}`, class: 'mono', text: d.report_id }) : '—'),
        d.section || '—', String(d.attempts), fmt.ago(d.dead_at),
        () => h('span', { class: 'row-actions' },
          h('button', { type: 'button', class: 'replay', text: 'Replay', 'aria-label': `Replay ${d.id}`,
            on: { click: (e) => act(e.target, '/v1/dead-letters/replay', { ids: [d.id] }, 'Replay') } }),
          h('button', { type: 'button', class: 'drop secondary', text: 'Drop', 'aria-label': `Drop ${d.id}`,
            on: { click: (e) => act(e.target, '/v1/dead-letters/drop', { ids: [d.id] }, 'Drop') } })),
      ], 'No dead letters.');
      setText(outbox, `Webhook outbox: ${fmt.int(status.webhooks.pending)} pending, ${fmt.int(status.webhooks.dead)} dead.`);
      syncRows(tbody('dead-webhooks'), hooks.webhooks, 'reportId', (w) => w.report_id, (w) => [
        () => h('a', { href: `#/reports/${w.report_id}`, class: 'mono', text: w.report_id }),
        { text: w.url, class: 'mono url' }, String(w.attempts), w.reason,
        () => h('span', { class: 'row-actions' },
          h('button', { type: 'button', class: 'redeliver', text: 'Redeliver', 'aria-label': `Redeliver the webhook of ${w.report_id}`,
            on: { click: (e) => act(e.target, '/v1/webhooks/redeliver', { report_ids: [w.report_id] }, 'Redeliver') } }),
          h('button', { type: 'button', class: 'drop secondary', text: 'Drop', 'aria-label': `Drop the webhook of ${w.report_id}`,
            on: { click: (e) => act(e.target, '/v1/webhooks/drop', { report_ids: [w.report_id] }, 'Drop') } })),
      ], 'No dead webhooks.');
    } catch (e) {
      if (!ctx.alive) return;
      if (e instanceof ApiError && e.status === 403) {
        // Polling cannot fix this: wait for another token (saving one reloads the page).
        denied = true;
        say('The operations page needs an admin token: this token is a tenant\'s. Enter an admin token to continue.');
        showTokenForm('Operations need an admin token.');
      } else {
        say(errorText(e));
      }
      message.dataset.kind = 'error';
    }
  };

  /** An operator action on one row; its outcome is said in #ops-message. */
  const act = async (btn, path, body, label) => {
    const buttons = btn.closest('td').querySelectorAll('button');
    buttons.forEach((b) => { b.disabled = true; });
    try {
      const { results } = await api('POST', path, { body });
      say(results.length
        ? results.map((r) => `${label} ${r.id}: ${r.outcome.replace(/_/g, ' ')}${r.detail ? ` (${r.detail})` : ''}`).join('; ')
        : `${label}: nothing to do.`);
      delete message.dataset.kind;
    } catch (e) {
      say(`${label} failed: ${errorText(e)}`);
    }
    buttons.forEach((b) => { b.disabled = false; });
    message.focus(); // the row may be gone after the refresh: keep keyboard focus nearby
    await load();
  };

  window.addEventListener('resize', () => drawChart(canvas, legend, history), { signal: ctx.signal });
  ctx.poll(2500, load);
}

/** "12 / 3,500": used in the last minute of the effective limit (and the configured one when
 * the budget paces lower), flagged from 90 %. */
function usage(used, limit, configured) {
  const text = `${fmt.int(used)} / ${fmt.int(limit)}${configured && Math.round(limit) < configured ? ` (configured ${fmt.int(configured)})` : ''}`;
  const share = limit > 0 ? used / limit : 0;
  return { text, class: share >= 0.9 ? 'warn' : '' };
}

function sample(history, budget) {
  const now = Date.now();
  for (const b of budget) {
    const key = `${b.key} / ${b.family}`;
    if (!history.has(key)) history.set(key, []);
    const points = history.get(key);
    points.push({ t: now, v: b.requests_last_minute });
    while (points.length && points[0].t < now - CHART_SPAN_MS) points.shift();
  }
}

/** A line per budget: requests admitted in the last minute, over the time the page is open. */
function drawChart(canvas, legend, history) {
  const series = [...history.entries()];
  legend.replaceChildren(...series.map(([name, pts], i) => {
    const swatch = h('span', { class: 'swatch', 'aria-hidden': 'true' });
    swatch.style.background = SERIES_COLOURS[i % SERIES_COLOURS.length];
    return h('li', {}, swatch, `${name}: ${fmt.int(pts.length ? pts[pts.length - 1].v : 0)}`);
  }));
  canvas.setAttribute('aria-label', `Requests in the last minute: ${series.map(([n, p]) => `${n} ${fmt.int(p.length ? p[p.length - 1].v : 0)}`).join(', ') || 'no data yet'}`);
  const ctx2d = canvas.getContext && canvas.getContext('2d');
  const width = canvas.clientWidth;
  if (!ctx2d || !width) return;
  const dpr = window.devicePixelRatio || 1;
  const height = 160;
  if (canvas.width !== Math.round(width * dpr)) canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  ctx2d.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx2d.clearRect(0, 0, width, height);
  const style = getComputedStyle(canvas);
  const ink = style.color;
  const pad = { l: 44, r: 10, t: 10, b: 22 };
  const now = Date.now();
  const first = Math.min(now - 60_000, ...series.flatMap(([, p]) => p.map((x) => x.t)));
  // Four grid steps of a round size: 0, 2, 4, 6, 8 rather than 0, 2.5, 5, 7.5, 10.
  const max = 4 * niceStep(Math.max(1, ...series.flatMap(([, p]) => p.map((x) => x.v))) / 4);
  const x = (t) => pad.l + ((t - first) / Math.max(1, now - first)) * (width - pad.l - pad.r);
  const y = (v) => height - pad.b - (v / max) * (height - pad.t - pad.b);
  ctx2d.font = '11px system-ui, sans-serif';
  ctx2d.lineWidth = 1;
  ctx2d.strokeStyle = style.getPropertyValue('--grid').trim() || '#8884';
  ctx2d.fillStyle = ink;
  ctx2d.textAlign = 'right';
  ctx2d.textBaseline = 'middle';
  for (let k = 0; k <= 4; k++) {
    const v = (max / 4) * k;
    ctx2d.beginPath();
    ctx2d.moveTo(pad.l, y(v));
    ctx2d.lineTo(width - pad.r, y(v));
    ctx2d.stroke();
    ctx2d.fillText(fmt.int(v), pad.l - 6, y(v));
  }
  ctx2d.textBaseline = 'top';
  ctx2d.fillText('now', width - pad.r, height - pad.b + 6);
  ctx2d.textAlign = 'left';
  ctx2d.fillText(`−${fmt.ms(now - first)}`, pad.l, height - pad.b + 6);
  ctx2d.lineWidth = 2;
  series.forEach(([, pts], i) => {
    ctx2d.strokeStyle = SERIES_COLOURS[i % SERIES_COLOURS.length];
    ctx2d.beginPath();
    pts.forEach((p, k) => (k ? ctx2d.lineTo(x(p.t), y(p.v)) : ctx2d.moveTo(x(p.t), y(p.v))));
    if (pts.length === 1) ctx2d.arc(x(pts[0].t), y(pts[0].v), 2, 0, 2 * Math.PI);
    ctx2d.stroke();
  });
}

/** The least of 1, 2, 5 × 10^n (at least 1) at or above `v`. */
function niceStep(v) {
  if (v <= 1) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((m) => m * p).find((n) => n >= v);
}

// ---------------------------------------------------------------------------------- start

setupTokenForm();
window.addEventListener('hashchange', () => route(true));
route();
