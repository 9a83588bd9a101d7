// End-to-end test of the web UI in a real browser: two relays and two people
// (alice, bob) as real `tidings` processes on loopback, each person's own UI
// in headless Chromium, driven as a person would.
//
//   node ui-tests/e2e.mjs
//
// Needs a built `tidings` (TIDINGS_BIN, else the newer of target/release/tidings
// and target/debug/tidings, under CARGO_TARGET_DIR if set) and Chromium
// (CHROMIUM, else /usr/bin/chromium).
// Screenshots go to ui-tests/out/. Exits non-zero if any check fails; the
// last line is `N passed, N failed`.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { Cluster, OUT, CHROMIUM_ARGS, chromiumPath, befriend, openUi, until, sleep } from './lib.mjs';

const WAIT = 20000; // every wait for the other side is bounded by this
const WATCHDOG = 8 * 60 * 1000; // the whole run

const results = [];
const PAGES = {}; // name → page, for screenshots of failures
async function check(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    results.push({ name, ok: true });
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    results.push({ name, ok: false });
    console.log(`FAIL ${name} (${Date.now() - t0} ms): ${(e && e.message ? e.message : String(e)).split('\n')[0]}`);
    for (const [who, page] of Object.entries(PAGES)) {
      await page.screenshot({ path: join(OUT, `failed-${results.length}-${who}.png`) }).catch(() => {});
    }
  }
}

const exact = (s) => new RegExp(`^${s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`);

/** The row of the message whose text is exactly `text`. */
const row = (page, text) => page.locator('.msg-row', { has: page.locator('.text', { hasText: exact(text) }) });

/** Opens the chat named `name` from the chat list. */
async function openChat(page, name) {
  await page.locator('.chat-item', { has: page.locator('.chat-name', { hasText: exact(name) }) }).click({ timeout: WAIT });
  await page.locator('.compose-input').waitFor({ timeout: WAIT });
}

async function send(page, text) {
  const input = page.locator('.compose-input');
  await input.click();
  await input.fill(text);
  await input.press('Enter');
}

/** Opens the actions menu of the message with text `text`. */
async function menu(page, text) {
  const r = row(page, text);
  await r.locator('.bubble').hover({ timeout: WAIT });
  await r.locator('.msg-more').click({ timeout: WAIT });
  await page.locator('.menu').waitFor({ timeout: WAIT });
}

async function main() {
  mkdirSync(OUT, { recursive: true });
  let cluster;
  try {
    chromiumPath();
    cluster = new Cluster('tidings-ui-e2e');
  } catch (e) {
    console.log(`FAIL setup: ${e.message}`);
    console.log('0 passed, 1 failed');
    process.exitCode = 1;
    return;
  }
  let browser = null;
  const watchdog = setTimeout(() => {
    console.log('FAIL the whole run took longer than the watchdog allows');
    cluster.killNow();
    console.log(`${results.filter((r) => r.ok).length} passed, ${results.filter((r) => !r.ok).length + 1} failed`);
    process.exit(1);
  }, WATCHDOG);
  const onSignal = () => { cluster.killNow(); process.exit(130); };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('exit', () => cluster.killNow());
  try {
    await cluster.startRelays(2);
    const [alice, bob] = [await cluster.person('alice'), await cluster.person('bob')];
    await befriend(alice, bob);
    browser = await chromium.launch({ executablePath: chromiumPath(), headless: true, args: CHROMIUM_ARGS });
    const A = await openUi(browser, alice);
    const B = await openUi(browser, bob);
    const a = A.page, b = B.page;
    Object.assign(PAGES, { alice: a, bob: b });

    await check('the login link signs each person in (session cookie)', async () => {
      if (!A.viaLink || !B.viaLink) throw new Error('the node gave no login link; the pages used the API token header instead');
      const cookies = await A.context.cookies();
      const s = cookies.find((c) => c.name === `tidings_session_${new URL(alice.base).port}`);
      if (!s) throw new Error(`no tidings_session_<port> cookie: ${cookies.map((c) => c.name).join(', ')}`);
      if (!s.httpOnly || s.sameSite !== 'Strict') throw new Error(`cookie flags: httpOnly=${s.httpOnly} sameSite=${s.sameSite}`);
    });

    await check('each page takes live updates from the WebSocket /api/ws', async () => {
      for (const p of [a, b]) {
        await until('a WebSocket', () => p.sockets.some((u) => new URL(u).pathname === '/api/ws'), WAIT);
      }
    });

    await check('each chat list shows the other person', async () => {
      await a.locator('.chat-item .chat-name', { hasText: exact('bob') }).waitFor({ timeout: WAIT });
      await b.locator('.chat-item .chat-name', { hasText: exact('alice') }).waitFor({ timeout: WAIT });
    });

    const hello = 'Hello bob, this is alice';
    await check('alice types and presses Enter; bob\'s chat list shows the message, unread, and it is announced', async () => {
      await openChat(a, 'bob');
      await send(a, hello);
      await row(a, hello).waitFor({ timeout: WAIT });
      const item = b.locator('.chat-item', { has: b.locator('.chat-name', { hasText: exact('alice') }) });
      await item.locator('.chat-preview', { hasText: hello }).waitFor({ timeout: WAIT });
      await item.locator('.unread').waitFor({ timeout: WAIT });
      await b.locator('#announce', { hasText: `alice: ${hello}` }).waitFor({ state: 'attached', timeout: WAIT });
    });

    await check('bob opens the chat and sees the message; his unread count clears', async () => {
      await openChat(b, 'alice');
      await row(b, hello).waitFor({ timeout: WAIT });
      const item = b.locator('.chat-item', { has: b.locator('.chat-name', { hasText: exact('alice') }) });
      await until('no unread badge', async () => (await item.locator('.unread').count()) === 0, WAIT);
    });

    await check('alice\'s page shows the message as read', async () => {
      await row(a, hello).locator('.ticks[data-state="read"]').waitFor({ timeout: WAIT });
    });

    await check('bob types; alice sees "typing…"', async () => {
      await b.locator('.compose-input').click();
      await b.keyboard.type('wait', { delay: 20 });
      await a.locator('.conv-head .head-sub', { hasText: 'typing' }).waitFor({ timeout: WAIT });
      await b.locator('.compose-input').fill('');
    });

    await check('Shift+Enter makes a new line, Enter sends both lines', async () => {
      const input = a.locator('.compose-input');
      await input.click();
      await a.keyboard.type('line one');
      await a.keyboard.press('Shift+Enter');
      await a.keyboard.type('line two');
      await a.keyboard.press('Enter');
      await row(b, 'line one\nline two').waitFor({ timeout: WAIT });
    });

    await check('bob reacts 👍; both pages show the reaction', async () => {
      await menu(b, hello);
      await b.locator('.menu button[aria-label="React 👍"]').click();
      for (const p of [a, b]) await row(p, hello).locator('.reaction', { hasText: '👍' }).waitFor({ timeout: WAIT });
    });

    const reply = 'A reply from bob';
    await check('bob replies quoting the message; both pages show the quote', async () => {
      await menu(b, hello);
      await b.locator('.menu button', { hasText: 'Reply' }).click();
      await b.locator('.compose-bar .quote-text', { hasText: hello }).waitFor({ timeout: WAIT });
      await send(b, reply);
      for (const p of [a, b]) await row(p, reply).locator('.quote .quote-text', { hasText: hello }).waitFor({ timeout: WAIT });
    });

    const edited = 'Hello bob, this is alice (edited)';
    await check('alice edits her message; both pages show the new text, marked edited, in the quote too', async () => {
      await menu(a, hello);
      await a.locator('.menu button', { hasText: 'Edit' }).click();
      const input = a.locator('.compose-input');
      await until('the composer holds the text', async () => (await input.inputValue()) === hello, WAIT);
      await input.fill(edited);
      await input.press('Enter');
      for (const p of [a, b]) await row(p, edited).locator('.edited').waitFor({ timeout: WAIT });
      for (const p of [a, b]) await row(p, reply).locator('.quote .quote-text', { hasText: edited }).waitFor({ timeout: WAIT });
    });

    const doomed = 'This one will be deleted';
    await check('alice deletes a message for everyone; it is gone from both pages', async () => {
      await send(a, doomed);
      await row(b, doomed).waitFor({ timeout: WAIT });
      await menu(a, doomed);
      const del = a.locator('.menu button', { hasText: 'Delete for everyone' });
      await del.click();
      await del.click();
      for (const p of [a, b]) {
        await until(`"${doomed}" gone`, async () => (await row(p, doomed).count()) === 0, WAIT);
        await p.locator('.text.deleted').first().waitFor({ timeout: WAIT });
      }
    });

    const payloads = ['<script>window.__pwned=1</script>', '<img src=x onerror="window.__pwned=1">'];
    await check('HTML payloads arrive as visible text and run nothing', async () => {
      for (const t of payloads) await send(a, t);
      for (const p of [a, b]) {
        for (const t of payloads) await row(p, t).waitFor({ timeout: WAIT });
        await sleep(300);
        const pwned = await p.evaluate(() => typeof window.__pwned);
        if (pwned !== 'undefined') throw new Error(`window.__pwned is ${pwned}`);
        const imgs = await p.locator('.messages img, .chat-list img[src="x"]').count();
        if (imgs) throw new Error(`${imgs} <img> elements inside the messages`);
      }
      const preview = b.locator('.chat-item .chat-preview', { hasText: payloads[1] });
      await preview.waitFor({ timeout: WAIT });
    });

    const vanish = 'This message disappears';
    await check('a 5 s disappearing timer removes the message from both pages and both stores', async () => {
      await a.locator('.timer-select').selectOption('5');
      await b.locator('.conv-head .timer-on').waitFor({ timeout: WAIT });
      await send(a, vanish);
      for (const p of [a, b]) await row(p, vanish).locator('.expires').waitFor({ timeout: WAIT });
      for (const p of [a, b]) await until(`"${vanish}" removed`, async () => (await row(p, vanish).count()) === 0, WAIT);
      for (const [who, chat] of [[alice, `c:${bob.account}`], [bob, `c:${alice.account}`]]) {
        await until(`${who.name}'s store drops it`, async () => {
          const msgs = await who.get(`/api/chats/${encodeURIComponent(chat)}/messages?limit=1000`);
          return !msgs.some((m) => m.text === vanish);
        }, WAIT);
      }
      await a.locator('.timer-select').selectOption('0');
    });

    await a.screenshot({ path: join(OUT, 'alice.png') });
    await b.screenshot({ path: join(OUT, 'bob.png') });

    await check('search finds a message in the history and a click shows it', async () => {
      await a.locator('#search').fill('reply from');
      await a.locator('.search-results .result-text', { hasText: reply }).click({ timeout: WAIT });
      await row(a, reply).locator('.bubble.flash').waitFor({ timeout: WAIT });
      await a.locator('#search').fill('');
    });

    await check('pinning a chat shows the pin in the chat list', async () => {
      await b.locator('.conv-head button[aria-label="Pin chat"]').click();
      await b.locator('.chat-item .badge-icon[title="Pinned"]').waitFor({ timeout: WAIT });
    });

    await check('contacts panel shows the own card as a QR image; Esc closes it', async () => {
      await a.locator('button[aria-label="Contacts"]').click();
      const qr = a.locator('#panel img.qr');
      await qr.waitFor({ timeout: WAIT });
      await until('the QR code loads', () => qr.evaluate((img) => img.complete && img.naturalWidth > 0), WAIT);
      await a.keyboard.press('Escape');
      await until('the panel closes', async () => a.locator('#panel').isHidden(), WAIT);
    });

    const welcome = 'Welcome to the book club';
    await check('alice creates a group with bob; both pages show it and its messages', async () => {
      await a.locator('button[aria-label="New group"]').click();
      await a.locator('#panel input[aria-label="Group name"]').fill('Book club');
      await a.locator('#panel .check', { hasText: 'bob' }).locator('input').check();
      await a.locator('#panel button', { hasText: 'Create group' }).click();
      await a.locator('.conv-head .head-name', { hasText: exact('Book club') }).waitFor({ timeout: WAIT });
      await send(a, welcome);
      await row(a, welcome).waitFor({ timeout: WAIT });
      await openChat(b, 'Book club');
      await row(b, welcome).locator('.sender', { hasText: 'alice' }).waitFor({ timeout: WAIT });
    });

    await check('group info lists the members and their roles', async () => {
      await a.locator('.conv-head button[aria-label="Group info"]').click();
      await a.locator('#panel .person', { hasText: 'You' }).locator('select, .role').first().waitFor({ timeout: WAIT });
      await a.locator('#panel .person', { hasText: 'bob' }).waitFor({ timeout: WAIT });
      await a.screenshot({ path: join(OUT, 'alice-group-info.png') });
      await a.keyboard.press('Escape');
    });

    await check('alice removes bob from the group; both headers follow without a reload', async () => {
      await a.locator('.conv-head .head-sub', { hasText: '2 members' }).waitFor({ timeout: WAIT });
      await b.locator('.conv-head .head-sub', { hasText: '2 members' }).waitFor({ timeout: WAIT });
      await a.locator('.conv-head button[aria-label="Group info"]').click();
      await a.locator('#panel button[aria-label="Remove bob"]').click({ timeout: WAIT });
      await a.keyboard.press('Escape');
      await a.locator('.conv-head .head-sub', { hasText: 'only you' }).waitFor({ timeout: WAIT });
      await b.locator('.conv-head .head-sub', { hasText: 'you are no longer a member' }).waitFor({ timeout: WAIT });
    });

    await check('devices panel lists this device and gives a link code', async () => {
      await a.locator('button[aria-label="Devices"]').click();
      await a.locator('#panel .person', { hasText: 'this device' }).waitFor({ timeout: WAIT });
      await a.locator('#panel button', { hasText: 'Link a new device' }).click();
      await a.locator('#panel .link-code pre', { hasText: 'tidings init --link ' }).waitFor({ timeout: WAIT });
      await a.screenshot({ path: join(OUT, 'alice-devices.png') });
      await a.keyboard.press('Escape');
    });

    await check('settings change the profile name, picture and read receipts', async () => {
      await b.locator('button[aria-label="Settings"]').click();
      const name = b.locator('#panel input[aria-label="Your name"]');
      await name.waitFor({ timeout: WAIT });
      await name.fill('Bob Builder');
      await b.locator('#panel .check', { hasText: 'Send read receipts' }).locator('input').uncheck();
      const png = await b.evaluate(() => {
        const c = document.createElement('canvas');
        c.width = c.height = 96;
        const x = c.getContext('2d');
        x.fillStyle = '#3949ab'; x.fillRect(0, 0, 96, 96);
        x.fillStyle = '#ffca28'; x.beginPath(); x.arc(48, 48, 28, 0, 7); x.fill();
        return c.toDataURL('image/png').split(',')[1];
      });
      await b.locator('#panel input[type=file]').setInputFiles({ name: 'me.png', mimeType: 'image/png', buffer: Buffer.from(png, 'base64') });
      await b.locator('#panel .pic-slot img').waitFor({ timeout: WAIT });
      await b.locator('#panel button', { hasText: exact('Save') }).click();
      await b.locator('.me-name', { hasText: exact('Bob Builder') }).waitFor({ timeout: WAIT });
      const s = await bob.get('/api/settings');
      if (s.name !== 'Bob Builder' || s.read_receipts !== false || !String(s.picture).startsWith('data:image/')) {
        throw new Error(`settings: ${JSON.stringify({ ...s, picture: String(s.picture).slice(0, 30) })}`);
      }
      await b.locator('#me .avatar img').waitFor({ timeout: WAIT });
      await b.screenshot({ path: join(OUT, 'bob-settings.png') });
      await b.keyboard.press('Escape');
    });

    await check('settings seal alice\'s keys under a passphrase and move her mail to one relay, which bob hears of', async () => {
      await a.locator('button[aria-label="Settings"]').click();
      const form = a.locator('#passphrase-form');
      await form.waitFor({ timeout: WAIT });
      await form.locator('input[aria-label="New passphrase"]').fill('correct horse');
      await form.locator('input[aria-label="New passphrase again"]').fill('correct horse');
      await form.locator('button', { hasText: 'Set passphrase' }).click();
      await form.locator('button', { hasText: 'Change passphrase' }).waitFor({ timeout: WAIT });
      if (!(await alice.get('/api/settings')).passphrase) throw new Error('the node does not report a passphrase');
      // A wrong current passphrase is refused with the node's words.
      await form.locator('input[aria-label="Current passphrase"]').fill('wrong horse');
      await form.locator('input[aria-label="New passphrase"]').fill('battery staple');
      await form.locator('input[aria-label="New passphrase again"]').fill('battery staple');
      await form.locator('button', { hasText: 'Change passphrase' }).click();
      await a.locator('#toast', { hasText: 'wrong passphrase' }).waitFor({ timeout: WAIT });
      const one = cluster.relays[1];
      const relays = a.locator('#relays-form textarea');
      await relays.fill(one);
      await a.locator('#relays-form button', { hasText: 'Save relays' }).click();
      await a.locator('#toast', { hasText: 'Home relays saved' }).waitFor({ timeout: WAIT });
      const s = await alice.get('/api/settings');
      if (JSON.stringify(s.home_relays) !== JSON.stringify([one])) throw new Error(`home relays: ${JSON.stringify(s.home_relays)}`);
      await until('bob knows alice\'s new relay', async () => {
        const c = (await bob.get('/api/contacts')).find((x) => x.account === alice.account);
        return c && JSON.stringify(c.relays) === JSON.stringify([one]);
      }, WAIT);
      await a.screenshot({ path: join(OUT, 'alice-settings.png') });
      await a.keyboard.press('Escape');
    });

    await check('alice\'s chat list shows bob\'s new name and picture', async () => {
      const item = a.locator(`.chat-item[data-chat="c:${bob.account}"]`);
      await item.locator('.chat-name', { hasText: exact('Bob Builder') }).waitFor({ timeout: WAIT });
      await item.locator('.avatar img').waitFor({ timeout: WAIT });
    });

    await check('arrow keys move through the chat list and Enter opens a chat', async () => {
      await b.locator('#chat-list').focus();
      await b.keyboard.press('Home');
      const first = await b.locator('.chat-item.active .chat-name').textContent();
      await b.keyboard.press('ArrowDown');
      const second = await b.locator('.chat-item.active .chat-name').textContent();
      if (first === second) throw new Error('ArrowDown did not move');
      await b.keyboard.press('Enter');
      await b.locator('.conv-head .head-name', { hasText: exact(second) }).waitFor({ timeout: WAIT });
    });

    await check('a long chat keeps few rows in the page and pages older messages in while scrolling up', async () => {
      const n = 600;
      let next = 0;
      const worker = async () => { while (next < n) { const i = next++; await bob.post(`/api/chats/${encodeURIComponent(`c:${alice.account}`)}/messages`, { text: `long ${i}` }); } };
      await Promise.all([worker(), worker(), worker(), worker()]);
      await until('alice holds them all', async () => {
        const last = await alice.get(`/api/chats/${encodeURIComponent(`c:${bob.account}`)}/messages?limit=600`);
        return last.filter((m) => m.text.startsWith('long ')).length === n;
      }, 60000, 200);
      // bob renamed himself above: find his chat by its id. The list may still be moving his chat
      // to the top as the page draws the burst, and a click lands where the item was: click until
      // his chat is the open one.
      const bobsItem = a.locator(`.chat-item[data-chat="c:${bob.account}"]`);
      await until('bob\'s chat is open', async () => {
        if ((await bobsItem.getAttribute('class', { timeout: WAIT })).split(' ').includes('open')) return true;
        await bobsItem.click({ timeout: WAIT });
        return false;
      }, WAIT, 200);
      await a.locator('.msg-row .text', { hasText: /^long \d+$/ }).first().waitFor({ timeout: WAIT });
      const rowsAtBottom = await a.locator('.messages .vrow').count();
      let most = rowsAtBottom;
      // Older messages arriving above must not move what is on screen: the oldest message of
      // the first page, just below the top when the view reaches it, stays there.
      const page = await alice.get(`/api/chats/${encodeURIComponent(`c:${bob.account}`)}/messages?limit=200`);
      const oldest = page[0].text;
      await a.locator('.messages').evaluate((el) => { el.scrollTop = 0; });
      await until('an older page', async () => (await a.locator('.messages').evaluate((el) => el.scrollTop)) > 1000, WAIT);
      await sleep(300);
      const y = await a.locator('.messages').evaluate((el, text) => {
        const r = [...el.querySelectorAll('.msg-row')].find((x) => x.querySelector('.text').textContent === text);
        return r ? r.getBoundingClientRect().top - el.getBoundingClientRect().top : null;
      }, oldest);
      if (y === null || y < 0 || y > 200) throw new Error(`"${oldest}" moved to ${y} px from the top when older messages arrived`);
      await until('the first message of the chat', async () => {
        await a.locator('.messages').evaluate((el) => { el.scrollTop = 0; });
        most = Math.max(most, await a.locator('.messages .vrow').count());
        return (await a.locator('.top-row').count()) === 0 && (await row(a, edited).count()) === 1;
      }, 30000, 100);
      if (most > 120) throw new Error(`${most} rows in the page for a chat of more than ${n} messages`);
      await a.screenshot({ path: join(OUT, 'alice-long-chat-top.png') });
    });

    await check('with presence shared both ways, alice\'s header shows bob online', async () => {
      await alice.patch('/api/settings', { presence: true });
      await bob.patch('/api/settings', { presence: true });
      await a.locator(`.chat-item[data-chat="c:${bob.account}"]`).click({ timeout: WAIT });
      await a.locator('.conv-head .head-sub', { hasText: exact('online') }).waitFor({ timeout: WAIT });
      await alice.patch('/api/settings', { presence: false });
      await bob.patch('/api/settings', { presence: false });
    });

    const away = 'Sent while bob was away';
    await check('while bob\'s node is down a message shows as stored on a relay; back, he gets it and alice sees it read', async () => {
      await bob.patch('/api/settings', { read_receipts: true });
      await a.locator(`.chat-item[data-chat="c:${bob.account}"]`).click({ timeout: WAIT });
      await cluster.stopPerson(bob);
      await b.locator('#conn', { hasText: 'Reconnecting' }).waitFor({ timeout: WAIT });
      await send(a, away);
      await row(a, away).locator('.ticks[data-state="stored"]').waitFor({ timeout: 45000 });
      await cluster.restartPerson(bob);
      // bob's page reconnects on its own or, since his node forgot the session, through a new
      // link. The page may learn of the forgotten session only after it looked live again.
      const bobsChat = b.locator(`.chat-item[data-chat="c:${alice.account}"]`);
      await until('bob\'s page is live again', async () => {
        if (await b.locator('#login').isVisible()) {
          await b.goto(await bob.loginUrl(), { timeout: WAIT });
          await b.waitForSelector('body[data-ready="1"]', { timeout: WAIT });
          return false;
        }
        return (await b.locator('#conn').isHidden()) && (await bobsChat.isVisible());
      }, 2 * WAIT);
      await bobsChat.click({ timeout: WAIT });
      await row(b, away).waitFor({ timeout: 45000 });
      await row(a, away).locator('.ticks[data-state="read"]').waitFor({ timeout: WAIT });
      await a.screenshot({ path: join(OUT, 'alice-after-away.png') });
    });

    await check('a first message to someone who cannot be reached shows as waiting, and is delivered once they are up', async () => {
      // Carol has no home relays: with her node down, nobody hands out a key package of hers.
      const carol = await cluster.person('carol', { homeRelays: false });
      await befriend(alice, carol);
      await cluster.stopPerson(carol);
      await openChat(a, 'carol');
      const text = 'Written before carol was ever reachable';
      await send(a, text);
      // The send first tries to set the conversation up (about 20 s), then keeps the message.
      await row(a, text).locator('.ticks[data-state="waiting"]').waitFor({ timeout: 60000 });
      await cluster.restartPerson(carol);
      await row(a, text).locator('.ticks[data-state="delivered"], .ticks[data-state="read"]').waitFor({ timeout: 120000 });
      const got = await carol.get(`/api/chats/c:${alice.account}/messages`);
      if (!JSON.stringify(got).includes(text)) throw new Error('carol\'s node does not have the message');
    });

    await check('no script errors or Content-Security-Policy violations on either page', async () => {
      const bad = [...a.problems, ...b.problems].filter((p) => /page error|Content Security Policy|Refused to/i.test(p));
      if (bad.length) throw new Error(bad.join(' | '));
    });

    console.log(`screenshots in ${OUT}`);
  } catch (e) {
    results.push({ name: 'setup', ok: false });
    console.log(`FAIL setup: ${e && e.stack ? e.stack : e}`);
  } finally {
    clearTimeout(watchdog);
    if (browser) await browser.close().catch(() => {});
    await cluster.stop();
  }
  const passed = results.filter((r) => r.ok).length;
  const failed = results.length - passed;
  console.log(`${passed} passed, ${failed} failed`);
  process.exitCode = failed ? 1 : 0;
}

main();
