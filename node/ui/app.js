// Tidings web UI: the chat list, the conversation and the composer. Panels
// (contacts, group info, devices, settings) live in panels.js.
//
// Rule: anything that came from the network is put on the page as text
// (textContent, Text nodes, attribute values) and never parsed as HTML.

import { api, connectEvents, ApiError } from './api.js';
import { h, replace, $, icon, iconButton, avatar, clock, dayKey, dayLabel, shortWhen, duration, onPictureChange, forgetPicture } from './dom.js';
import { VirtualList } from './vlist.js';
import * as panels from './panels.js';

const PAGE = 200; // messages per page of history
const QUICK_REACTIONS = ['👍', '❤️', '😂', '😮', '😢', '🙏'];
const TIMERS = [0, 5, 30, 300, 3600, 86400, 604800];
const TYPING_MS = 5000;

const EMPTY = document.getElementById('conv-empty');

const S = {
  me: { account: '', name: '', picture: null },
  chats: new Map(), // id → ChatView
  order: [], // chat ids as listed
  active: -1, // keyboard position in the chat list
  current: null, // the open conversation (see openChat)
  typing: new Map(), // chat → Map(account → until ms)
  presence: new Map(), // account → { online, last_seen_ms }
  names: new Map(), // account → name (contacts)
  query: '',
};

// ---------- small things ----------

let toastTimer = 0;
export function toast(msg) {
  const t = $('#toast');
  t.textContent = String(msg);
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
}

function fail(e) {
  if (e instanceof ApiError && e.status === 401) return showLogin();
  toast(e && e.message ? e.message : String(e));
}

function showLogin() {
  $('#app').hidden = true;
  $('#login').hidden = false;
}

const chatOf = (m) => m.chat || (m.contact ? `c:${m.contact}` : '');

function nameOf(account) {
  if (!account) return '';
  if (account === S.me.account) return 'You';
  return S.names.get(account) || account.slice(0, 8);
}

function debounce(fn, ms) {
  let t = 0;
  return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); };
}

/** A group's size: `members` counts the accounts besides ours. */
function memberCount(c) {
  const n = (c.members || 0) + 1;
  return n === 1 ? 'only you' : `${n} members`;
}

// ---------- ticks ----------

const STATES = {
  waiting: ['clock', 'Setting up the conversation; waits until the contact can be reached'],
  pending: ['clock', 'Sending'],
  sent: ['tick', 'Sent'],
  stored: ['relay', 'Stored on a relay'],
  delivered: ['ticks', 'Delivered'],
  read: ['ticks', 'Read'],
};

function ticks(state) {
  const [name, label] = STATES[state] || STATES.sent;
  const el = h('span', { class: `ticks state-${state}`, title: label, dataset: { state } }, icon(name, label));
  return el;
}

// ---------- chat list ----------

async function loadChats() {
  const list = await api.chats();
  S.chats = new Map(list.map((c) => [c.id, c]));
  paintChats();
}

const refreshChats = debounce(() => loadChats().catch(fail), 250);

function sortedChats() {
  return [...S.chats.values()].sort((a, b) =>
    (b.pinned - a.pinned) || ((b.last_activity_ms || 0) - (a.last_activity_ms || 0)));
}

function preview(c) {
  const typing = typingIn(c.id);
  if (typing.length) return [h('span', { class: 'typing-text', text: c.kind === 'group' ? `${typing.map(nameOf).join(', ')} typing…` : 'typing…' })];
  const m = c.last_message;
  if (!m) return [h('span', { class: 'muted-text', text: c.kind === 'group' ? memberCount(c) : 'No messages yet' })];
  const parts = [];
  if (m.outgoing) parts.push(ticks(m.state));
  else if (c.kind === 'group') parts.push(h('span', { class: 'who', text: `${m.sender_name || nameOf(m.sender)}: ` }));
  if (m.deleted) parts.push(h('em', { text: 'This message was deleted' }));
  else parts.push(h('span', { text: m.text }));
  return parts;
}

let chatFrame = 0;
function paintChats() {
  if (chatFrame) return;
  chatFrame = requestAnimationFrame(() => { chatFrame = 0; paintChatsNow(); });
}

function paintChatsNow() {
  const ul = $('#chat-list');
  const q = S.query.toLowerCase();
  const chats = sortedChats().filter((c) => !q || (c.name || '').toLowerCase().includes(q));
  S.order = chats.map((c) => c.id);
  if (S.active >= S.order.length) S.active = S.order.length - 1;
  const items = chats.map((c, i) => {
    const open = S.current && S.current.id === c.id;
    const li = h('li', {
      class: 'chat-item' + (open ? ' open' : '') + (i === S.active ? ' active' : '') + (c.unread ? ' has-unread' : ''),
      id: `chat-${i}`,
      attrs: { role: 'option', 'aria-selected': open ? 'true' : 'false' },
      dataset: { chat: c.id },
      on: { click: () => { S.active = i; openChat(c.id); } },
    },
      avatar(c.name, c.id, c.picture),
      h('div', { class: 'chat-main' },
        h('div', { class: 'chat-top' },
          h('span', { class: 'chat-name', text: c.name || '(no name)' }),
          h('span', { class: 'chat-time', text: shortWhen(c.last_message ? c.last_message.timestamp_ms : c.last_activity_ms) })),
        h('div', { class: 'chat-bottom' },
          h('span', { class: 'chat-preview' }, preview(c)),
          h('span', { class: 'chat-badges' },
            c.muted ? h('span', { class: 'badge-icon', title: 'Muted' }, icon('mute', 'Muted')) : null,
            c.pinned ? h('span', { class: 'badge-icon', title: 'Pinned' }, icon('pin', 'Pinned')) : null,
            c.unread ? h('span', { class: 'unread' + (c.muted ? ' quiet' : ''), text: String(c.unread), attrs: { 'aria-label': `${c.unread} unread` } }) : null))));
    return li;
  });
  if (!items.length) {
    items.push(h('li', { class: 'chat-none', attrs: { role: 'presentation' } },
      q ? 'No chat matches.' : 'No chats yet. Add a contact with the person icon above.'));
  }
  replace(ul, items);
  if (S.active >= 0) ul.setAttribute('aria-activedescendant', `chat-${S.active}`);
  else ul.removeAttribute('aria-activedescendant');
}

function onListKey(e) {
  const n = S.order.length;
  if (!n) return;
  let i = S.active;
  if (e.key === 'ArrowDown') i = Math.min(n - 1, i + 1);
  else if (e.key === 'ArrowUp') i = Math.max(0, i - 1);
  else if (e.key === 'Home') i = 0;
  else if (e.key === 'End') i = n - 1;
  else if (e.key === 'Enter' && i >= 0) { e.preventDefault(); openChat(S.order[i]); return; }
  else return;
  e.preventDefault();
  S.active = i;
  paintChatsNow();
  const li = document.getElementById(`chat-${i}`);
  if (li) li.scrollIntoView({ block: 'nearest' });
}

// ---------- search ----------

const runSearch = debounce(async (q) => {
  const box = $('#search-results');
  if (!q) { box.hidden = true; replace(box); return; }
  let found;
  try { found = await api.search(q, 50); } catch (e) {
    if (S.query !== q) return;
    box.hidden = false;
    replace(box, h('h2', { text: 'Messages' }), h('p', { class: 'muted-text', text: e.status === 404 ? 'Search is not available on this node.' : e.message }));
    return;
  }
  if (S.query !== q) return;
  box.hidden = false;
  replace(box, h('h2', { text: found.length ? 'Messages' : 'No messages found' }),
    found.map((m) => {
      const chat = S.chats.get(chatOf(m));
      return h('button', { type: 'button', class: 'result', on: { click: () => openChat(chatOf(m), m.id) } },
        h('span', { class: 'result-top' },
          h('span', { class: 'chat-name', text: chat ? chat.name : (m.sender_name || nameOf(m.contact)) }),
          h('span', { class: 'chat-time', text: shortWhen(m.timestamp_ms) })),
        h('span', { class: 'result-text', text: (m.outgoing ? 'You: ' : '') + m.text }));
    }));
}, 200);

function onSearchInput(e) {
  S.query = e.target.value.trim();
  S.active = -1;
  paintChats();
  runSearch(S.query);
}

// ---------- typing ----------

function typingIn(chat) {
  const m = S.typing.get(chat);
  if (!m) return [];
  const now = Date.now();
  return [...m.entries()].filter(([, until]) => until > now).map(([a]) => a);
}

function onTyping(ev) {
  if (ev.account === S.me.account) return;
  if (!S.typing.has(ev.chat)) S.typing.set(ev.chat, new Map());
  S.typing.get(ev.chat).set(ev.account, Date.now() + TYPING_MS);
  paintChats();
  if (S.current && S.current.id === ev.chat) paintHeader();
  setTimeout(() => { paintChats(); if (S.current && S.current.id === ev.chat) paintHeader(); }, TYPING_MS + 50);
}

// ---------- conversation ----------

function subtitle(c) {
  const typing = typingIn(c.id);
  if (typing.length) return { text: c.kind === 'group' ? `${typing.map(nameOf).join(', ')} typing…` : 'typing…', cls: 'typing-text' };
  if (c.kind === 'group') return { text: c.left ? 'you are no longer a member' : memberCount(c), cls: '' };
  const p = S.presence.get(c.id.slice(2));
  if (p && p.online) return { text: 'online', cls: '' };
  if (p && p.last_seen_ms) return { text: `last seen ${dayLabel(p.last_seen_ms).toLowerCase()} at ${clock(p.last_seen_ms)}`, cls: '' };
  return { text: '', cls: '' };
}

function paintHeader() {
  const cur = S.current;
  if (!cur) return;
  const c = S.chats.get(cur.id) || cur.chat;
  cur.chat = c;
  const sub = subtitle(c);
  const timer = h('select', {
    class: 'timer-select', title: 'Disappearing messages', attrs: { 'aria-label': 'Disappearing messages' },
    on: { change: (e) => updateChat({ disappearing_secs: Number(e.target.value) }) },
  }, TIMERS.map((s) => h('option', { value: String(s), text: `Disappearing: ${s ? duration(s) : 'off'}` })));
  timer.value = String(c.disappearing_secs || 0);
  if (timer.value === '' && c.disappearing_secs) {
    timer.append(h('option', { value: String(c.disappearing_secs), text: `Disappearing: ${duration(c.disappearing_secs)}` }));
    timer.value = String(c.disappearing_secs);
  }
  replace(cur.head,
    iconButton('back', 'Back to the chat list', closeChat, { class: 'only-narrow' }),
    h('button', { type: 'button', class: 'head-who', on: { click: () => openInfo() }, attrs: { 'aria-label': `About ${c.name}` } },
      avatar(c.name, c.id, c.picture),
      h('span', { class: 'head-text' },
        h('span', { class: 'head-name', text: c.name }),
        h('span', { class: `head-sub ${sub.cls}`, text: sub.text }))),
    h('div', { class: 'head-actions' },
      c.disappearing_secs ? h('span', { class: 'timer-on', title: `Messages disappear after ${duration(c.disappearing_secs)}` }, icon('timer'), duration(c.disappearing_secs)) : null,
      timer,
      iconButton('pin', c.pinned ? 'Unpin chat' : 'Pin chat', () => updateChat({ pinned: !c.pinned }), { class: c.pinned ? 'on' : '', attrs: { 'aria-pressed': c.pinned ? 'true' : 'false' } }),
      iconButton('mute', c.muted ? 'Unmute chat' : 'Mute chat', () => updateChat({ muted: !c.muted }), { class: c.muted ? 'on' : '', attrs: { 'aria-pressed': c.muted ? 'true' : 'false' } }),
      iconButton('info', c.kind === 'group' ? 'Group info' : 'Contact info', () => openInfo())));
}

async function updateChat(body) {
  const cur = S.current;
  if (!cur) return;
  try {
    const c = await api.updateChat(cur.id, body);
    S.chats.set(c.id, c);
    paintHeader();
    paintChats();
  } catch (e) { fail(e); }
}

function openInfo() {
  const c = S.current && S.current.chat;
  if (!c) return;
  if (c.kind === 'group') panels.groupInfo(ctx, c.id.slice(2));
  else panels.contactInfo(ctx, c);
}

function closeChat() {
  if (S.current) S.current.list.destroy();
  S.current = null;
  document.body.classList.remove('chat-open');
  replace($('#conv'), EMPTY);
  paintChats();
}

/** Builds the rows (day separators and messages) of the open conversation. */
function rows(cur) {
  const out = [];
  if (cur.hasMore) out.push({ kind: 'top', key: 'top' });
  let day = '';
  for (const m of cur.msgs) {
    const k = dayKey(m.timestamp_ms);
    if (k !== day) { day = k; out.push({ kind: 'day', key: `d:${k}`, ms: m.timestamp_ms }); }
    out.push({ kind: 'msg', key: `m:${m.id}`, m });
  }
  return out;
}

function setRows(cur) { cur.list.setItems(rows(cur)); }

function renderRow(it) {
  if (it.kind === 'top') return h('div', { class: 'row top-row' }, h('span', { class: 'loading', text: 'Loading older messages…' }));
  if (it.kind === 'day') return h('div', { class: 'row day-row' }, h('span', { class: 'day', text: dayLabel(it.ms) }));
  return renderMessage(it.m);
}

function renderMessage(m) {
  const cur = S.current;
  const group = cur && cur.chat.kind === 'group';
  const bubble = h('div', { class: 'bubble', attrs: { tabindex: '-1' } },
    group && !m.outgoing ? h('div', { class: 'sender', text: m.sender_name || nameOf(m.sender) }) : null,
    m.reply_to && !m.deleted ? h('button', {
      type: 'button', class: 'quote', attrs: { 'aria-label': 'Go to the quoted message' },
      on: { click: () => jumpTo(m.reply_to.id) },
    }, h('span', { class: 'quote-who', text: nameOf(m.reply_to.sender) }), h('span', { class: 'quote-text', text: m.reply_to.text || 'This message was deleted' })) : null,
    m.deleted ? h('em', { class: 'text deleted', text: m.outgoing ? 'You deleted this message' : 'This message was deleted' })
      : h('span', { class: 'text', text: m.text }),
    h('span', { class: 'meta' },
      m.expires_ms ? h('span', { class: 'expires', title: 'Disappearing message' }, icon('timer', 'Disappearing message')) : null,
      m.edited_ms && !m.deleted ? h('span', { class: 'edited', text: 'edited' }) : null,
      h('time', { text: clock(m.timestamp_ms), dateTime: new Date(m.timestamp_ms).toISOString(), title: new Date(m.timestamp_ms).toLocaleString() }),
      m.outgoing ? ticks(m.state) : null),
    m.deleted ? null : h('button', {
      type: 'button', class: 'msg-more', title: 'Message actions', attrs: { 'aria-label': 'Message actions', 'aria-haspopup': 'menu' },
      on: { click: (e) => messageMenu(m, e.currentTarget) },
    }, icon('more')));
  const reactions = (m.reactions || []).filter((r) => r.accounts && r.accounts.length);
  return h('div', { class: `row msg-row ${m.outgoing ? 'out' : 'in'}`, dataset: { id: m.id, state: m.state || '' } },
    bubble,
    reactions.length ? h('div', { class: 'reactions' }, reactions.map((r) => {
      const mine = r.accounts.includes(S.me.account);
      return h('button', {
        type: 'button', class: 'reaction' + (mine ? ' mine' : ''),
        title: r.accounts.map(nameOf).join(', '),
        attrs: { 'aria-label': `${r.emoji} ${r.accounts.length}${mine ? ', yours' : ''}` },
        on: { click: () => react(m, mine ? '' : r.emoji) },
      }, h('span', { class: 'emoji', text: r.emoji }), r.accounts.length > 1 ? h('span', { text: String(r.accounts.length) }) : null);
    })) : null);
}

let menuEl = null;
function closeMenu() {
  if (menuEl) { const back = menuEl.back; menuEl.remove(); menuEl = null; if (back && back.isConnected) back.focus(); }
}

function messageMenu(m, anchor) {
  closeMenu();
  const items = [
    h('div', { class: 'menu-reactions', attrs: { role: 'group', 'aria-label': 'React' } }, QUICK_REACTIONS.map((e) =>
      h('button', { type: 'button', class: 'menu-emoji', attrs: { role: 'menuitem', 'aria-label': `React ${e}` }, text: e, on: { click: () => { closeMenu(); react(m, e); } } }))),
    h('button', { type: 'button', attrs: { role: 'menuitem' }, text: 'Reply', on: { click: () => { closeMenu(); startReply(m); } } }),
    h('button', { type: 'button', attrs: { role: 'menuitem' }, text: 'Copy text', on: { click: () => { closeMenu(); navigator.clipboard?.writeText(m.text).catch(() => {}); } } }),
  ];
  if (m.outgoing) {
    items.push(h('button', { type: 'button', attrs: { role: 'menuitem' }, text: 'Edit', on: { click: () => { closeMenu(); startEdit(m); } } }));
    const del = h('button', { type: 'button', class: 'danger', attrs: { role: 'menuitem' }, text: 'Delete for everyone' });
    del.addEventListener('click', () => {
      if (del.dataset.confirm) { closeMenu(); removeMessage(m); return; }
      del.dataset.confirm = '1';
      del.textContent = 'Delete for everyone? Click again';
    });
    items.push(del);
  }
  menuEl = h('div', { class: 'menu', attrs: { role: 'menu', 'aria-label': 'Message actions' } }, items);
  menuEl.back = anchor;
  document.body.append(menuEl);
  const r = anchor.getBoundingClientRect();
  const mw = menuEl.offsetWidth, mh = menuEl.offsetHeight;
  menuEl.style.left = `${Math.max(8, Math.min(window.innerWidth - mw - 8, r.right - mw))}px`;
  menuEl.style.top = `${r.bottom + mh + 8 > window.innerHeight ? Math.max(8, r.top - mh - 4) : r.bottom + 4}px`;
  const first = menuEl.querySelector('button');
  if (first) first.focus();
}

async function react(m, emoji) {
  try { upsert(await api.react(S.current.id, m.id, emoji)); } catch (e) { fail(e); }
}

async function removeMessage(m) {
  try {
    await api.remove(S.current.id, m.id);
    const local = S.current.byId.get(m.id);
    if (local) upsert({ ...local, deleted: true, text: '', reactions: [] });
  } catch (e) { fail(e); }
}

function startReply(m) {
  const cur = S.current;
  cur.editing = null;
  cur.replyTo = m;
  paintBar();
  cur.input.focus();
}

function startEdit(m) {
  const cur = S.current;
  cur.replyTo = null;
  cur.editing = m;
  cur.input.value = m.text;
  autosize(cur.input);
  paintBar();
  cur.input.focus();
}

function cancelBar() {
  const cur = S.current;
  if (!cur || (!cur.replyTo && !cur.editing)) return false;
  if (cur.editing) cur.input.value = '';
  cur.replyTo = null;
  cur.editing = null;
  paintBar();
  return true;
}

function paintBar() {
  const cur = S.current;
  const m = cur.replyTo || cur.editing;
  cur.bar.hidden = !m;
  if (!m) { replace(cur.bar); return; }
  replace(cur.bar,
    h('div', { class: 'bar-quote' },
      h('span', { class: 'quote-who', text: cur.editing ? 'Edit message' : `Reply to ${nameOf(m.sender)}` }),
      h('span', { class: 'quote-text', text: m.text })),
    iconButton('close', cur.editing ? 'Cancel editing' : 'Cancel reply', () => { cancelBar(); cur.input.focus(); }));
}

async function jumpTo(id) {
  const cur = S.current;
  let guard = 0;
  while (!cur.byId.has(id) && cur.hasMore && guard++ < 50 && S.current === cur) await loadOlder(cur);
  const el = cur.list.scrollToKey(`m:${id}`);
  if (el) {
    const b = el.querySelector('.bubble');
    b.classList.add('flash');
    b.focus({ preventScroll: true });
    setTimeout(() => b.classList.remove('flash'), 1500);
  }
}

async function loadOlder(cur) {
  if (cur.loading || !cur.hasMore) return;
  cur.loading = true;
  try {
    // Pages follow the node's order: the next one ends before the first of the last.
    const page = await api.messages(cur.id, cur.cursor, PAGE);
    if (S.current !== cur) return;
    const fresh = page.filter((m) => !cur.byId.has(m.id));
    for (const m of fresh) cur.byId.set(m.id, m);
    cur.msgs = fresh.concat(cur.msgs);
    if (page.length) cur.cursor = page[0].id;
    cur.hasMore = page.length >= PAGE && fresh.length > 0;
    setRows(cur);
  } catch (e) { fail(e); cur.hasMore = false; setRows(cur); } finally { cur.loading = false; }
  // Still at the top (a short page, a fast scroll): keep going.
  if (S.current === cur && cur.hasMore && cur.scroller.scrollTop < 1500) setTimeout(() => loadOlder(cur), 0);
}

/** Opens a chat (and, with `jump`, scrolls to one of its messages). */
export async function openChat(id, jump) {
  if (S.current && S.current.id === id) { if (jump) jumpTo(jump); S.current.input.focus(); return; }
  if (S.current) S.current.list.destroy();
  closeMenu();
  let chat = S.chats.get(id);
  if (!chat) {
    try { chat = await api.chat(id); S.chats.set(id, chat); } catch (e) { fail(e); return; }
  }
  const head = h('header', { class: 'conv-head' });
  // Not a live region: rows come and go while scrolling. New messages are announced by #announce.
  const scroller = h('div', { class: 'messages', attrs: { role: 'region', 'aria-label': 'Messages', tabindex: '0' } });
  const bar = h('div', { class: 'compose-bar', hidden: true });
  const input = h('textarea', {
    class: 'compose-input', rows: 1, placeholder: 'Type a message',
    attrs: { 'aria-label': 'Message', enterkeyhint: 'send' },
    on: { keydown: onComposerKey, input: onComposerInput },
  });
  const sendBtn = iconButton('send', 'Send', () => sendNow(), { class: 'send-btn' });
  const composer = h('form', { class: 'composer', on: { submit: (e) => { e.preventDefault(); sendNow(); } } }, input, sendBtn);
  const cur = { id, chat, head, scroller, bar, input, msgs: [], byId: new Map(), cursor: null, hasMore: false, loading: false, replyTo: null, editing: null, lastTyping: 0, readUpTo: null };
  S.current = cur;
  cur.list = new VirtualList(scroller, {
    key: (it) => it.key,
    rev: (it) => (it.kind === 'msg' ? it.m._rev || 0 : 0),
    render: renderRow,
    estimate: (it) => (it.kind === 'msg' ? 58 : 44),
    // Only messages hold the place: a day separator moves up when older messages of its day arrive.
    anchorable: (it) => it.kind === 'msg',
    onNearTop: () => loadOlder(cur),
    onScroll: () => { if (cur.list.stickBottom) markRead(); },
  });
  replace($('#conv'), head, scroller, bar, composer);
  document.body.classList.add('chat-open');
  paintHeader();
  paintChats();
  input.focus();
  // The chat list may be older than the chat (a group's members change without a chat event).
  api.chat(id).then((c) => { S.chats.set(id, c); if (S.current === cur) paintHeader(); paintChats(); }, () => {});
  try {
    const page = await api.messages(id, null, PAGE);
    if (S.current !== cur) return;
    const live = cur.msgs; // arrived while the page loaded
    cur.msgs = [];
    const inPage = new Set(page.map((m) => m.id));
    for (const m of page) {
      const newer = cur.byId.get(m.id); // an event may have updated it already
      if (!newer) cur.byId.set(m.id, m);
      cur.msgs.push(newer || m);
    }
    cur.msgs.push(...live.filter((m) => !inPage.has(m.id)));
    if (page.length) cur.cursor = page[0].id;
    cur.hasMore = page.length >= PAGE;
    setRows(cur);
    cur.list.scrollToBottom();
    markRead(true);
    if (jump) jumpTo(jump);
  } catch (e) { fail(e); }
}

// Delivery states only move forward: an answer or event that arrives late
// (the send's own response after the relay's receipt) must not move one back.
const RANK = { waiting: 0, pending: 1, sent: 2, stored: 3, delivered: 4, read: 5 };
function forward(old, m) {
  if (old && old.state in RANK && m.state in RANK && RANK[old.state] > RANK[m.state]) return { ...m, state: old.state };
  return m;
}

/** Adds or replaces a message of the open conversation and the chat list's preview. */
function upsert(m) {
  const id = chatOf(m);
  const c = S.chats.get(id);
  if (c && c.last_message && c.last_message.id === m.id) m = forward(c.last_message, m);
  const known = S.current && S.current.id === id ? S.current.byId.get(m.id) : null;
  m = forward(known, m);
  if (c && (!c.last_message || c.last_message.id === m.id || c.last_message.timestamp_ms <= m.timestamp_ms)) {
    c.last_message = m;
    c.last_activity_ms = Math.max(c.last_activity_ms || 0, m.timestamp_ms);
    paintChats();
  }
  const cur = S.current;
  if (!cur || cur.id !== id) return;
  const old = cur.byId.get(m.id);
  m._rev = (old ? old._rev || 0 : 0) + 1;
  cur.byId.set(m.id, m);
  if (old) {
    const i = cur.msgs.indexOf(old);
    if (i >= 0) cur.msgs[i] = m;
    // Replies that quote it show its new text (or none once it is deleted).
    if (old.text !== m.text || old.deleted !== m.deleted) {
      for (let j = 0; j < cur.msgs.length; j++) {
        const r = cur.msgs[j];
        if (r.reply_to && r.reply_to.id === m.id) {
          const q = { ...r, reply_to: { ...r.reply_to, text: m.deleted ? '' : m.text }, _rev: (r._rev || 0) + 1 };
          cur.msgs[j] = q;
          cur.byId.set(q.id, q);
        }
      }
    }
    setRows(cur);
  } else {
    cur.msgs.push(m);
    if (m.outgoing) cur.list.stickBottom = true;
    setRows(cur);
    if (!m.outgoing) markRead();
  }
}

function dropMessage(chat, id) {
  const c = S.chats.get(chat);
  if (c && c.last_message && c.last_message.id === id) refreshChats();
  const cur = S.current;
  if (!cur || cur.id !== chat || !cur.byId.has(id)) return;
  const m = cur.byId.get(id);
  cur.byId.delete(id);
  cur.msgs = cur.msgs.filter((x) => x !== m);
  setRows(cur);
}

// Read receipts: what is on screen in the open chat of a visible page is read.
// Opening a chat reads it (`opened`); later messages count as read while the
// list is scrolled to the bottom.
const markRead = debounce((opened) => {
  const cur = S.current;
  if (!cur || document.visibilityState !== 'visible' || (!opened && !cur.list.stickBottom)) return;
  for (let i = cur.msgs.length - 1; i >= 0; i--) {
    const m = cur.msgs[i];
    if (m.outgoing) continue;
    if (cur.readUpTo === m.id) return;
    cur.readUpTo = m.id;
    const c = S.chats.get(cur.id);
    if (c && c.unread) { c.unread = 0; paintChats(); }
    api.read(cur.id, m.id).catch(() => { cur.readUpTo = null; });
    return;
  }
}, 60);

function autosize(t) {
  t.style.height = 'auto';
  t.style.height = `${Math.min(t.scrollHeight, 160)}px`;
}

function onComposerInput(e) {
  autosize(e.target);
  const cur = S.current;
  const now = Date.now();
  if (cur && e.target.value && now - cur.lastTyping > 3000) {
    cur.lastTyping = now;
    api.typing(cur.id).catch(() => {});
  }
}

function onComposerKey(e) {
  const cur = S.current;
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    sendNow();
  } else if (e.key === 'Escape') {
    if (cancelBar()) { e.preventDefault(); e.stopPropagation(); }
  } else if (e.key === 'ArrowUp' && !e.target.value && cur) {
    const last = [...cur.msgs].reverse().find((m) => m.outgoing && !m.deleted);
    if (last) { e.preventDefault(); startEdit(last); }
  }
}

async function sendNow() {
  const cur = S.current;
  if (!cur) return;
  const text = cur.input.value;
  if (!text.trim()) return;
  const editing = cur.editing;
  const replyTo = cur.replyTo;
  cur.input.value = '';
  autosize(cur.input);
  cur.editing = null;
  cur.replyTo = null;
  paintBar();
  try {
    const m = editing ? await api.edit(cur.id, editing.id, text) : await api.send(cur.id, text, replyTo ? replyTo.id : undefined);
    if (m && m.id) upsert(m);
  } catch (e) {
    if (S.current === cur && !cur.input.value) { cur.input.value = text; autosize(cur.input); }
    fail(e);
  }
}

// Disappearing messages also leave the page at their time, whatever the node says.
setInterval(() => {
  const cur = S.current;
  if (!cur) return;
  const now = Date.now();
  const gone = cur.msgs.filter((m) => m.expires_ms && m.expires_ms <= now);
  if (!gone.length) return;
  for (const m of gone) cur.byId.delete(m.id);
  cur.msgs = cur.msgs.filter((m) => !(m.expires_ms && m.expires_ms <= now));
  setRows(cur);
}, 1000);

// ---------- events ----------

function onEvent(ev) {
  switch (ev.type) {
    case 'message':
    case 'message_updated': {
      const { type, ...m } = ev;
      if (type === 'message' && !m.outgoing) announce(m);
      upsert(m);
      refreshChats();
      break;
    }
    case 'message_removed':
      dropMessage(ev.chat, ev.id);
      break;
    case 'delivered':
    case 'stored': {
      const cur = S.current;
      const m = cur && cur.byId.get(ev.id);
      if (m && m.state !== 'read') upsert({ ...m, state: ev.type });
      refreshChats();
      break;
    }
    case 'typing':
      onTyping(ev);
      break;
    case 'chat': {
      const { type, ...c } = ev;
      S.chats.set(c.id, c);
      paintChats();
      if (S.current && S.current.id === c.id) paintHeader();
      break;
    }
    case 'presence':
      S.presence.set(ev.account, ev);
      if (S.current) paintHeader();
      break;
    case 'contact':
      S.names.set(ev.account, ev.name);
      forgetPicture(ev.account);
      refreshChats();
      break;
    default:
      break;
  }
}

/** Tells screen readers about a new message (not for muted chats). */
function announce(m) {
  const c = S.chats.get(chatOf(m));
  if (c && c.muted) return;
  const who = m.sender_name || nameOf(m.sender);
  const where = c && c.kind === 'group' ? ` in ${c.name}` : '';
  const el = $('#announce');
  if (el) el.textContent = `${who}${where}: ${m.text}`;
}

function setConn(state) {
  const el = $('#conn');
  el.hidden = state === 'live';
  el.textContent = state === 'live' ? '' : 'Reconnecting to your node…';
  // A node that restarted may have forgotten this session: then a new login link is needed.
  if (state !== 'live') api.status().catch((e) => { if (e instanceof ApiError && e.status === 401) showLogin(); });
}

// ---------- keyboard ----------

function onGlobalKey(e) {
  if (e.key === 'Escape') {
    if (menuEl) { e.preventDefault(); closeMenu(); return; }
    if (!$('#panel').hidden) { e.preventDefault(); panels.close(); return; }
    if (cancelBar()) { e.preventDefault(); return; }
    if (document.activeElement === $('#search') && $('#search').value) {
      $('#search').value = '';
      onSearchInput({ target: $('#search') });
      return;
    }
  }
  if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === 'k') {
    e.preventDefault();
    $('#search').focus();
  }
}

document.addEventListener('pointerdown', (e) => { if (menuEl && !menuEl.contains(e.target)) closeMenu(); });
document.addEventListener('visibilitychange', () => markRead());

// ---------- start ----------

export const ctx = {
  S, api, toast, fail, openChat, refreshChats, loadChats, nameOf,
  repaint() { paintChats(); paintHeader(); },
  setMe(s) {
    S.me = { ...S.me, ...s };
    replace($('#me'), avatar(S.me.name, S.me.account, S.me.picture), h('span', { class: 'me-name', text: S.me.name || 'Me' }));
  },
  async loadNames() {
    const list = await api.contacts();
    for (const c of list) S.names.set(c.account, c.name);
    return list;
  },
};

async function start() {
  let me;
  try {
    me = await api.settings();
  } catch (e) {
    if (e.status === 401) return showLogin();
    try {
      const card = await api.card();
      me = { account: card.account, name: card.name, picture: null };
    } catch (e2) {
      if (e2.status === 401) return showLogin();
      toast(e2.message);
      return;
    }
  }
  ctx.setMe(me);
  onPictureChange(debounce(() => { paintChats(); paintHeader(); }, 50));
  replace($('#side-actions'),
    iconButton('group', 'New group', () => panels.newGroup(ctx)),
    iconButton('contacts', 'Contacts', () => panels.contacts(ctx)),
    iconButton('devices', 'Devices', () => panels.devices(ctx)),
    iconButton('settings', 'Settings', () => panels.settings(ctx)));
  $('#me').addEventListener('click', () => panels.settings(ctx));
  $('#search').addEventListener('input', onSearchInput);
  $('#search').addEventListener('keydown', (e) => {
    if (e.key === 'ArrowDown') { e.preventDefault(); $('#chat-list').focus(); if (S.active < 0) { S.active = 0; paintChatsNow(); } }
  });
  $('#chat-list').addEventListener('keydown', onListKey);
  document.addEventListener('keydown', onGlobalKey);
  connectEvents({ onEvent, onState: setConn, onReconnect: () => { refreshChats(); const c = S.current; if (c) { S.current = null; openChat(c.id); } } });
  await Promise.all([
    loadChats().catch(fail),
    ctx.loadNames().then(paintChats, () => []),
    api.presence().then((l) => { for (const p of l) S.presence.set(p.account, p); }).catch(() => {}),
  ]);
  $('#app').removeAttribute('aria-busy');
  document.body.dataset.ready = '1';
}

start();
