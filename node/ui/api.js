// The node's local API, as the UI uses it: JSON over fetch with the session
// cookie, and live events over the WebSocket (or server-sent events).

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'the node is not reachable');
  }
  if (resp.status === 204) return null;
  const text = await resp.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  if (!resp.ok) {
    const msg = json && typeof json.error === 'string' ? json.error : `${resp.status} ${resp.statusText}`;
    throw new ApiError(resp.status, msg);
  }
  return json;
}

export const get = (path) => call('GET', path);
export const post = (path, body = {}) => call('POST', path, body);
export const patch = (path, body) => call('PATCH', path, body);
export const del = (path) => call('DELETE', path);

const enc = encodeURIComponent;

// A node without the chat routes (`/api/chats...`) still has per-contact and
// per-group routes; the chat list, history and sending fall back to them.
let plain = false;
const missing = (e) => e instanceof ApiError && (e.status === 404 || e.status === 405);

async function plainChats() {
  const [contacts, groups] = await Promise.all([get('/api/contacts'), get('/api/groups').catch(() => [])]);
  const chats = await Promise.all([
    ...contacts.map(async (c) => ({ id: `c:${c.account}`, kind: 'contact', name: c.name || c.account.slice(0, 8), members: 2, history: await get(`/api/contacts/${enc(c.account)}/messages`).catch(() => []) })),
    ...groups.filter((g) => !g.left).map(async (g) => ({ id: `g:${g.id}`, kind: 'group', name: g.name, members: g.members.length, history: await get(`/api/groups/${enc(g.id)}/messages`).catch(() => []) })),
  ]);
  return chats.map(({ history, ...c }) => {
    const last = history[history.length - 1] || null;
    return { ...c, last_message: last, unread: 0, pinned: false, muted: false, disappearing_secs: 0, last_activity_ms: last ? last.timestamp_ms : 0 };
  });
}

async function plainHistory(id, before, limit) {
  const all = id.startsWith('g:') ? await get(`/api/groups/${enc(id.slice(2))}/messages`) : await get(`/api/contacts/${enc(id.slice(2))}/messages`);
  const msgs = all.map((m) => ({ ...m, chat: id }));
  const end = before ? msgs.findIndex((m) => m.id === before) : msgs.length;
  const stop = end < 0 ? msgs.length : end;
  return msgs.slice(Math.max(0, stop - limit), stop);
}

export const api = {
  status: () => get('/api/status'),
  card: () => get('/api/card'),
  settings: () => get('/api/settings'),
  saveSettings: (body) => patch('/api/settings', body),
  async chats() {
    if (!plain) {
      try { return await get('/api/chats'); } catch (e) { if (!missing(e)) throw e; plain = true; }
    }
    return plainChats();
  },
  async chat(id) {
    if (!plain) return get(`/api/chats/${enc(id)}`);
    const c = (await plainChats()).find((x) => x.id === id);
    if (!c) throw new ApiError(404, 'unknown chat');
    return c;
  },
  updateChat: (id, body) => patch(`/api/chats/${enc(id)}`, body),
  messages(id, before, limit = 100) {
    if (plain) return plainHistory(id, before, limit);
    const q = new URLSearchParams({ limit: String(limit) });
    if (before) q.set('before', before);
    return get(`/api/chats/${enc(id)}/messages?${q}`);
  },
  send(id, text, replyTo) {
    if (!plain) return post(`/api/chats/${enc(id)}/messages`, replyTo ? { text, reply_to: replyTo } : { text });
    if (id.startsWith('g:')) return post(`/api/groups/${enc(id.slice(2))}/messages`, { text }).then((m) => ({ ...m, chat: id }));
    return post('/api/messages', { contact: id.slice(2), text }).then((m) => ({ ...m, chat: id }));
  },
  edit: (id, msg, text) => patch(`/api/chats/${enc(id)}/messages/${enc(msg)}`, { text }),
  remove: (id, msg) => del(`/api/chats/${enc(id)}/messages/${enc(msg)}`),
  react: (id, msg, emoji) => post(`/api/chats/${enc(id)}/messages/${enc(msg)}/reactions`, { emoji }),
  read: (id, upTo) => post(`/api/chats/${enc(id)}/read`, { up_to: upTo }),
  typing: (id) => post(`/api/chats/${enc(id)}/typing`, {}),
  search: (q, limit = 50) => get(`/api/search?${new URLSearchParams({ q, limit: String(limit) })}`),
  presence: () => get('/api/presence'),
  contacts: () => get('/api/contacts'),
  addContact: (card, name) => post('/api/contacts', name ? { card, name } : { card }),
  groups: () => get('/api/groups'),
  group: (gid) => get(`/api/groups/${enc(gid)}`),
  createGroup: (name, members) => post('/api/groups', { name, members }),
  invite: (gid, contacts) => post(`/api/groups/${enc(gid)}/members`, { contacts }),
  removeMember: (gid, account) => del(`/api/groups/${enc(gid)}/members/${enc(account)}`),
  setRole: (gid, member, role) => post(`/api/groups/${enc(gid)}/roles`, { member, role }),
  devices: () => get('/api/devices'),
  linkDevice: () => post('/api/devices/link', {}),
  revokeDevice: (device) => del(`/api/devices/${enc(device)}`),
};

/**
 * Live events: calls `onEvent(event)` for every NodeEvent and `onState(state)`
 * with 'live' | 'reconnecting'. Uses the WebSocket `/api/ws`; if it cannot be
 * opened at all, the server-sent events of `/api/events`. Reconnects with
 * back-off; `onReconnect` runs after a reconnection so the caller can catch up.
 */
export function connectEvents({ onEvent, onState, onReconnect }) {
  let delay = 500;
  let wsWorked = false;
  let everConnected = false;
  let stopped = false;

  const opened = () => {
    if (everConnected && onReconnect) onReconnect();
    everConnected = true;
    delay = 500;
    onState('live');
  };
  const handle = (data) => {
    let ev;
    try { ev = JSON.parse(data); } catch { return; }
    if (ev && typeof ev.type === 'string') onEvent(ev);
  };
  const retry = (fn) => {
    if (stopped) return;
    onState('reconnecting');
    setTimeout(fn, delay);
    delay = Math.min(delay * 2, 10000);
  };

  function sse() {
    const es = new EventSource('/api/events', { withCredentials: true });
    es.onopen = opened;
    es.onmessage = (m) => handle(m.data);
    es.onerror = () => { es.close(); retry(sse); };
  }

  function ws() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let sock;
    try { sock = new WebSocket(`${proto}//${location.host}/api/ws`); } catch { sse(); return; }
    let open = false;
    sock.onopen = () => { open = true; wsWorked = true; opened(); };
    sock.onmessage = (m) => { if (typeof m.data === 'string') handle(m.data); };
    sock.onclose = () => {
      if (stopped) return;
      if (!open && !wsWorked) sse();
      else retry(ws);
    };
  }

  ws();
  return () => { stopped = true; };
}
