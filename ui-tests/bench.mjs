// Benchmark of the web UI (not a test): real `tidings` processes on loopback,
// each person's UI in headless Chromium. Prints one JSON document.
//
//   node ui-tests/bench.mjs [--messages 200] [--history 10000]
//
// - send_to_paint_ms: from alice's Enter keydown in her page to the message's
//   row painted in bob's page (bob has the chat open). Both pages run in one
//   browser on one machine and stamp with `performance.timeOrigin +
//   performance.now()` (the same wall clock): alice at the keydown event, bob
//   in the first animation frame after the row was inserted, once that frame
//   has been painted (a task queued from the frame callback).
// - first_load_ms: from navigation start to the chat list's first row in the
//   DOM, and to the frame that paints it, over fresh loads of the logged-in page.
// - history: bob sends `--history` messages through his API; alice opens the
//   chat (time to the newest row painted), then scrolls from the bottom to the
//   very top in steps of 400 px per frame, paging older messages as the UI
//   does; longest frame, frames over 50 ms, long tasks, rows in the DOM.

import { chromium } from 'playwright-core';
import { Cluster, CHROMIUM_ARGS, chromiumPath, befriend, openUi, until, sleep } from './lib.mjs';

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const MESSAGES = arg('messages', 200);
const HISTORY = arg('history', 10000);
const LOADS = arg('loads', 20);

function stats(xs) {
  const s = [...xs].sort((x, y) => x - y);
  const q = (p) => s[Math.min(s.length - 1, Math.max(0, Math.ceil(p * s.length) - 1))];
  const r = (v) => Math.round(v * 100) / 100;
  return { n: s.length, p50: r(q(0.5)), p90: r(q(0.9)), p99: r(q(0.99)), min: r(s[0]), max: r(s[s.length - 1]), mean: r(s.reduce((a, b) => a + b, 0) / s.length) };
}

// Installed in bob's page: stamps every new message row once painted.
function watchRows() {
  window.__painted = {};
  const now = () => performance.timeOrigin + performance.now();
  const ch = new MessageChannel();
  const pending = [];
  ch.port1.onmessage = () => { const t = now(); for (const k of pending.splice(0)) if (!(k in window.__painted)) window.__painted[k] = t; };
  new MutationObserver((muts) => {
    const fresh = [];
    for (const m of muts) for (const n of m.addedNodes) {
      if (n.nodeType !== 1) continue;
      const rows = n.matches('.msg-row') ? [n] : n.querySelectorAll ? n.querySelectorAll('.msg-row') : [];
      for (const r of rows) { const t = r.querySelector('.text'); if (t && t.textContent.startsWith('bench ')) fresh.push(t.textContent); }
    }
    if (fresh.length) requestAnimationFrame(() => { pending.push(...fresh); ch.port2.postMessage(0); });
  }).observe(document.body, { childList: true, subtree: true });
}

// Installed in alice's page: stamps the Enter keydown with the composer's text.
function watchEnter() {
  window.__sent = {};
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && e.target.classList.contains('compose-input')) window.__sent[e.target.value] = performance.timeOrigin + e.timeStamp;
  }, true);
}

async function sendToPaint(A, B) {
  await A.page.evaluate(watchEnter);
  await B.page.evaluate(watchRows);
  const input = A.page.locator('.compose-input');
  const lat = [];
  for (let i = 0; i < MESSAGES + 10; i++) {
    const text = `bench ${i}`;
    await input.fill(text);
    await input.press('Enter');
    await until(`bob paints "${text}"`, () => B.page.evaluate((k) => k in window.__painted, text), 20000, 2);
    const [sent, painted] = await Promise.all([A.page.evaluate((k) => window.__sent[k], text), B.page.evaluate((k) => window.__painted[k], text)]);
    if (i >= 10) lat.push(painted - sent); // the first ten warm up connections and caches
  }
  return stats(lat);
}

async function firstLoad(browser, person) {
  const { page, context } = await openUi(browser, person);
  await context.addInitScript(() => {
    window.__first = null;
    new MutationObserver((muts, obs) => {
      if (document.querySelector('.chat-item')) {
        obs.disconnect();
        const dom = performance.now();
        requestAnimationFrame(() => setTimeout(() => { window.__first = { dom, painted: performance.now() }; }, 0));
      }
    }).observe(document, { childList: true, subtree: true });
  });
  const dom = [], painted = [], load = [];
  for (let i = 0; i < LOADS + 2; i++) {
    await page.goto(`${person.base}/`);
    const f = await until('the chat list', () => page.evaluate(() => window.__first), 10000, 5);
    const nav = await page.evaluate(() => performance.getEntriesByType('navigation')[0].loadEventEnd);
    if (i >= 2) { dom.push(f.dom); painted.push(f.painted); load.push(nav); }
  }
  await context.close();
  return { chat_list_in_dom: stats(dom), chat_list_painted: stats(painted), load_event: stats(load) };
}

async function history(cluster, A, alice, bob) {
  const t0 = Date.now();
  let next = 0;
  const worker = async () => {
    while (next < HISTORY) {
      const i = next++;
      await bob.post('/api/messages', { contact: alice.account, text: `history ${i} ${'lorem ipsum '.repeat(i % 7)}` });
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
  const chat = `c:${bob.account}`;
  // Eight senders at once: the newest row need not be the last one sent, so count them instead
  // (alice reads none of bob's messages, so all of them are unread).
  await until('alice holds the whole history', async () => {
    const c = await alice.get(`/api/chats/${encodeURIComponent(chat)}`);
    return c.unread >= HISTORY;
  }, 600000, 500).catch(() => {});
  const sendSecs = (Date.now() - t0) / 1000;
  const page = A.page;
  await page.reload();
  await page.waitForSelector('body[data-ready="1"]');
  const openStart = await page.evaluate(() => performance.now());
  await page.locator('.chat-item', { has: page.locator('.chat-name', { hasText: /^bob$/ }) }).click();
  const openMs = await page.evaluate(async (t) => {
    const want = (el) => [...document.querySelectorAll('.msg-row .text')].some((x) => x.textContent.startsWith(el));
    for (;;) {
      if (want('history ')) { await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0))); return performance.now() - t; }
      await new Promise((r) => setTimeout(r, 1));
    }
  }, openStart);
  const scroll = await page.evaluate(async () => {
    const box = document.querySelector('.messages');
    const frames = [];
    const longTasks = [];
    const po = new PerformanceObserver((l) => { for (const e of l.getEntries()) longTasks.push(e.duration); });
    try { po.observe({ type: 'longtask', buffered: false }); } catch { /* not supported */ }
    let maxRows = 0;
    const start = performance.now();
    let last = start;
    let reachedTop = false;
    await new Promise((done) => {
      const step = (t) => {
        frames.push(t - last);
        last = t;
        maxRows = Math.max(maxRows, box.querySelectorAll('.vrow').length);
        const atTop = box.scrollTop <= 0 && !document.querySelector('.top-row');
        if (atTop) { reachedTop = true; return done(); }
        if (t - start > 120000) return done();
        box.scrollTop = Math.max(0, box.scrollTop - 400);
        requestAnimationFrame(step);
      };
      requestAnimationFrame(step);
    });
    po.disconnect();
    const rows = [...box.querySelectorAll('.msg-row')].sort((x, y) => x.getBoundingClientRect().top - y.getBoundingClientRect().top);
    const topText = rows.length ? rows[0].querySelector('.text').textContent : null;
    return { frames, longTasks, maxRows, reachedTop, ms: performance.now() - start, topText };
  });
  const frames = scroll.frames.slice(1);
  return {
    messages: HISTORY,
    send_through_api_s: Math.round(sendSecs * 10) / 10,
    open_ms: Math.round(openMs * 10) / 10,
    scroll_to_top_ms: Math.round(scroll.ms),
    // The chat's first message is the warm-up one, sent before the latency run and the history.
    reached_oldest: scroll.reachedTop && scroll.topText === 'warm up',
    frames: frames.length,
    frame_ms: stats(frames),
    frames_over_50ms: frames.filter((f) => f > 50).length,
    long_tasks: scroll.longTasks.length,
    longest_task_ms: scroll.longTasks.length ? Math.round(Math.max(...scroll.longTasks)) : 0,
    max_rows_in_dom: scroll.maxRows,
  };
}

async function main() {
  const cluster = new Cluster('tidings-ui-bench');
  const onSignal = () => { cluster.killNow(); process.exit(130); };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('exit', () => cluster.killNow());
  let browser = null;
  const out = { binary: cluster.bin, messages: MESSAGES };
  try {
    await cluster.startRelays(2);
    const [alice, bob] = [await cluster.person('alice'), await cluster.person('bob')];
    await befriend(alice, bob);
    browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: CHROMIUM_ARGS });
    const A = await openUi(browser, alice);
    const B = await openUi(browser, bob);
    // Open both sides of the chat and let the conversation settle.
    await A.page.locator('.chat-item').first().click();
    await A.page.locator('.compose-input').fill('warm up');
    await A.page.locator('.compose-input').press('Enter');
    await B.page.locator('.chat-item').first().click();
    await B.page.locator('.msg-row .text', { hasText: 'warm up' }).waitFor({ timeout: 30000 });
    await sleep(500);
    out.send_to_paint_ms = await sendToPaint(A, B);
    out.first_load_ms = await firstLoad(browser, alice);
    if (HISTORY > 0) out.history = await history(cluster, A, alice, bob);
  } catch (e) {
    out.error = String(e && e.stack ? e.stack : e);
    process.exitCode = 1;
  } finally {
    if (browser) await browser.close().catch(() => {});
    await cluster.stop();
  }
  console.log(JSON.stringify(out, null, 2));
}

main();
