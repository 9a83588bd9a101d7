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

export const api = {
  status: () => get('/api/status'),
  card: () => get('/api/card'),
  settings: () => get('/api/settings'),
  saveSettings: (body) => patch('/api/settings', body),
  setPassphrase: (current, next) => post('/api/settings/passphrase', { current, new: next }),
  chats: () => get('/api/chats'),
  chat: (id) => get(`/api/chats/${enc(id)}`),
  updateChat: (id, body) => patch(`/api/chats/${enc(id)}`, body),
  messages(id, before, limit = 100) {
    const q = new URLSearchParams({ limit: String(limit) });
    if (before) q.set('before', before);
    return get(`/api/chats/${enc(id)}/messages?${q}`);
  },
  send: (id, text, replyTo) => post(`/api/chats/${enc(id)}/messages`, replyTo ? { text, reply_to: replyTo } : { text }),
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
    delay = Math.min(delay * 2, 5000);
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
