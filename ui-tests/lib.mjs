// Shared by the browser tests and the benchmark: real `tidings` processes on
// loopback (two relays, then people), their APIs, and headless Chromium.

import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { existsSync, mkdtempSync, rmSync, readFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const OUT = join(ROOT, 'ui-tests', 'out');

/**
 * The `tidings` binary: $TIDINGS_BIN, else the newer of the release and the
 * debug build (under $CARGO_TARGET_DIR or target/).
 */
export function binary() {
  if (process.env.TIDINGS_BIN) return resolve(process.env.TIDINGS_BIN);
  const target = process.env.CARGO_TARGET_DIR ? resolve(process.env.CARGO_TARGET_DIR) : join(ROOT, 'target');
  const built = [join(target, 'release', 'tidings'), join(target, 'debug', 'tidings')].filter((p) => existsSync(p));
  built.sort((x, y) => statSync(y).mtimeMs - statSync(x).mtimeMs);
  if (built.length) return built[0];
  throw new Error(`no tidings binary in ${target}/{release,debug}: build one (cargo build -p tidings-node --bin tidings) or set TIDINGS_BIN`);
}

/** Chromium: $CHROMIUM, else Debian's /usr/bin/chromium. */
export function chromiumPath() {
  const p = process.env.CHROMIUM || '/usr/bin/chromium';
  if (!existsSync(p)) throw new Error(`no Chromium at ${p}: install it (apt-get install chromium) or set CHROMIUM`);
  return p;
}

export const CHROMIUM_ARGS = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
];

/** Waits for `fn()` to be truthy, polling; throws after `ms`. */
export async function until(what, fn, ms = 20000, every = 50) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try { const v = await fn(); if (v) return v; } catch (e) { last = e; }
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? ` (${last.message})` : ''}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A run's processes and temporary directory; `stop()` ends all of them. */
export class Cluster {
  constructor(label = 'tidings-ui') {
    this.bin = binary();
    this.dir = mkdtempSync(join(tmpdir(), `${label}-`));
    this.children = [];
    this.relays = [];
    this.people = {};
    this.stopped = false;
  }

  /** Spawns `tidings <args>`; resolves with the child and the first stdout line matching `ready`. */
  start(args, ready, name, ms = 60000) {
    const child = spawn(this.bin, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, TIDINGS_LOG: process.env.TIDINGS_LOG || 'warn,libp2p_kad=error' } });
    this.children.push(child);
    const lines = [];
    const errLines = [];
    const rl = createInterface({ input: child.stdout });
    createInterface({ input: child.stderr }).on('line', (l) => { errLines.push(l); if (errLines.length > 50) errLines.shift(); if (process.env.UI_TEST_VERBOSE) console.error(`[${name}] ${l}`); });
    return new Promise((res, rej) => {
      const timer = setTimeout(() => rej(new Error(`${name} did not start in ${ms} ms: ${errLines.slice(-5).join(' | ')}`)), ms);
      rl.on('line', (l) => {
        lines.push(l);
        if (process.env.UI_TEST_VERBOSE) console.error(`[${name}] ${l}`);
        const m = l.match(ready);
        if (m) { clearTimeout(timer); res({ child, lines, m }); }
      });
      child.on('exit', (code) => { clearTimeout(timer); rej(new Error(`${name} exited (${code}) before it was ready: ${errLines.slice(-5).join(' | ')}`)); });
    });
  }

  /** Runs `tidings <args>` to completion. */
  run(args, ms = 60000) {
    return new Promise((res, rej) => {
      const child = spawn(this.bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '', err = '';
      child.stdout.on('data', (d) => { out += d; });
      child.stderr.on('data', (d) => { err += d; });
      const timer = setTimeout(() => { child.kill('SIGKILL'); rej(new Error(`tidings ${args.join(' ')} timed out`)); }, ms);
      child.on('exit', (code) => { clearTimeout(timer); if (code === 0) res(out); else rej(new Error(`tidings ${args.join(' ')} failed (${code}): ${err}`)); });
    });
  }

  /** Starts `n` community relays on loopback, each bootstrapping from the first. */
  async startRelays(n = 2) {
    for (let i = 0; i < n; i++) {
      const dir = join(this.dir, `relay${i}`);
      const args = ['--data-dir', dir, 'relay', '--listen', '/ip4/127.0.0.1/tcp/0', '--metrics', 'off'];
      if (this.relays.length) args.push('--bootstrap', this.relays[0]);
      let peer = '';
      const { lines } = await this.start(args, /^listening on (\/ip4\/127\.0\.0\.1\/tcp\/\d+\S*)/, `relay${i}`);
      for (const l of lines) { const m = l.match(/^tidings relay (\S+)/); if (m) peer = m[1]; }
      const addr = lines.map((l) => l.match(/^listening on (\/ip4\/127\.0\.0\.1\/tcp\/\d+\S*)/)).find(Boolean)[1];
      this.relays.push(addr.includes('/p2p/') ? addr : `${addr}/p2p/${peer}`);
    }
    return this.relays;
  }

  /**
   * `tidings init` and `tidings run` for one person with every relay as a home relay
   * (or none with `{ homeRelays: false }`: only the person's own device then hands
   * out key packages).
   */
  async person(name, { homeRelays = true } = {}) {
    const dir = join(this.dir, name);
    await this.run(['--data-dir', dir, 'init', '--name', name]);
    const args = ['--data-dir', dir, 'run', '--listen', '/ip4/127.0.0.1/tcp/0', '--bootstrap', this.relays[0]];
    if (homeRelays) for (const r of this.relays) args.push('--relay', r);
    const { child, lines, m } = await this.start(args, /^API on (http:\/\/\S+)/, name);
    const base = m[1];
    const token = readFileSync(join(dir, 'api-token'), 'utf8').trim();
    const p = new Person(name, dir, base, token, child, lines);
    p.args = args;
    this.people[name] = p;
    return p;
  }

  /** Stops a person's node (SIGTERM) and waits until it has exited. */
  async stopPerson(p) {
    const c = p.child;
    if (c.exitCode === null && c.signalCode === null) {
      const gone = new Promise((res) => c.once('exit', res));
      c.kill('SIGTERM');
      await Promise.race([gone, sleep(15000)]);
      if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    }
  }

  /** Starts a stopped person's node again, on the same API/UI port. */
  async restartPerson(p) {
    const port = new URL(p.base).port;
    const { child, lines, m } = await this.start([...p.args, '--ui-port', port], /^API on (http:\/\/\S+)/, p.name);
    Object.assign(p, { child, lines, base: m[1] });
    return p;
  }

  async stop() {
    if (this.stopped) return;
    this.stopped = true;
    for (const c of this.children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
    const end = Date.now() + 5000;
    while (Date.now() < end && this.children.some((c) => c.exitCode === null && c.signalCode === null)) await sleep(50);
    for (const c of this.children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    if (!process.env.UI_TEST_KEEP) rmSync(this.dir, { recursive: true, force: true });
  }

  /** Kills everything at once, synchronously (for process exit). */
  killNow() {
    for (const c of this.children) if (c.exitCode === null && c.signalCode === null) { try { c.kill('SIGKILL'); } catch { /* gone */ } }
  }
}

/** One person's running node and its API. */
export class Person {
  constructor(name, dir, base, token, child, lines) {
    Object.assign(this, { name, dir, base, token, child, lines });
  }

  async call(method, path, body) {
    const init = { method, headers: { Authorization: `Bearer ${this.token}` }, signal: AbortSignal.timeout(30000) };
    if (body !== undefined) { init.headers['Content-Type'] = 'application/json'; init.body = JSON.stringify(body); }
    const r = await fetch(this.base + path, init);
    const text = await r.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch { json = text; }
    if (!r.ok) { const e = new Error(`${method} ${path}: ${r.status} ${typeof json === 'object' && json ? json.error : text}`); e.status = r.status; throw e; }
    return json;
  }

  get(path) { return this.call('GET', path); }
  post(path, body = {}) { return this.call('POST', path, body); }
  patch(path, body) { return this.call('PATCH', path, body); }

  async card() { return this.get('/api/card'); }

  /**
   * A one-time login link: from `POST /api/login-codes`, else the one
   * `tidings run` printed. Null if the node has neither.
   */
  async loginUrl() {
    try {
      const r = await this.post('/api/login-codes', {});
      if (r && r.url) return r.url;
    } catch { /* fall through */ }
    for (const l of this.lines) { const m = l.match(/(http:\/\/\S+\/login\?code=\S+)/); if (m) return m[1]; }
    return null;
  }
}

/** Makes everyone contacts of everyone, through the API. */
export async function befriend(a, b) {
  const [ca, cb] = await Promise.all([a.card(), b.card()]);
  await a.post('/api/contacts', { card: cb.uri });
  await b.post('/api/contacts', { card: ca.uri });
  a.account = ca.account;
  b.account = cb.account;
}

/**
 * Opens `person`'s UI in a fresh browser context (its own cookies) through
 * the login link. Returns { page, context, viaLink }. Without a login link
 * (an older node), the context sends the API token as a header instead and
 * `viaLink` is false.
 */
export async function openUi(browser, person, viewport = { width: 1280, height: 800 }) {
  const url = await person.loginUrl();
  const context = await browser.newContext({ viewport, colorScheme: process.env.UI_COLOR_SCHEME || 'light' });
  if (!url) await context.setExtraHTTPHeaders({ Authorization: `Bearer ${person.token}` });
  if (process.env.UI_DEV_FILES) await serveFromDisk(context, person.base);
  const page = await context.newPage();
  page.problems = [];
  page.sockets = [];
  page.on('websocket', (ws) => page.sockets.push(ws.url()));
  page.on('pageerror', (e) => page.problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') page.problems.push(`console error: ${m.text()}`); });
  await page.goto(url || `${person.base}/`, { timeout: 20000 });
  await page.waitForSelector('body[data-ready="1"]', { timeout: 20000 });
  return { page, context, viaLink: !!url };
}

/**
 * For working on the UI without rebuilding the binary: with UI_DEV_FILES=1 the
 * browser takes the UI files from node/ui/ on disk, with the node's own
 * response headers (Content-Security-Policy included).
 */
async function serveFromDisk(context, base) {
  const names = { '/': 'index.html', '/index.html': 'index.html' };
  await context.route((url) => url.origin === new URL(base).origin && (url.pathname in names || /^\/[a-z]+\.(js|css|svg)$/.test(url.pathname)), async (route) => {
    const resp = await route.fetch();
    const path = new URL(route.request().url()).pathname;
    const file = join(ROOT, 'node', 'ui', names[path] || path.slice(1));
    if (!resp.ok() || !existsSync(file)) return route.fulfill({ response: resp });
    await route.fulfill({ response: resp, body: readFileSync(file) });
  });
}
