// DOM helpers. Everything that comes from the network (message text, names,
// cards) becomes a Text node: these helpers never parse a string as HTML.

/**
 * Creates an element. `props`: `class`, `text` (set as textContent), `attrs`
 * (attributes), `on` (event listeners), `dataset`; any other key is set as a
 * property. Children may be nodes, strings (turned into Text nodes) or null.
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = String(v);
    else if (k === 'attrs') for (const [a, av] of Object.entries(v)) { if (av !== null && av !== undefined && av !== false) el.setAttribute(a, String(av)); }
    else if (k === 'on') for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el[k] = v;
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
}

/** Replaces every child of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const $ = (sel, root = document) => root.querySelector(sel);

const SVG = 'http://www.w3.org/2000/svg';
// Constant icon drawings on a 24×24 grid, stroked with the text colour; never data.
const ICONS = {
  search: [['circle', { cx: 10.5, cy: 10.5, r: 6 }], ['path', { d: 'M15 15l5.5 5.5' }]],
  send: [['path', { d: 'M3 20.5 21 12 3 3.5l2.5 8.5zM5.5 12H13', fill: 'currentColor' }]],
  close: [['path', { d: 'M6 6l12 12M18 6 6 18' }]],
  contacts: [['circle', { cx: 10, cy: 8, r: 3.5 }], ['path', { d: 'M3 20c0-4 3-6 7-6s7 2 7 6M19 7v6M16 10h6' }]],
  group: [['circle', { cx: 8.5, cy: 8.5, r: 3 }], ['circle', { cx: 16.5, cy: 9.5, r: 2.5 }], ['path', { d: 'M2.5 19.5c0-3.5 2.5-5.5 6-5.5s6 2 6 5.5M15 14.2c3.5-.4 6.5 1.3 6.5 5.3' }]],
  devices: [['rect', { x: 2.5, y: 5, width: 14, height: 10, rx: 1.5 }], ['path', { d: 'M1 18.5h13' }], ['rect', { x: 17.5, y: 8, width: 5, height: 11, rx: 1 }]],
  settings: [['circle', { cx: 12, cy: 12, r: 3.2 }], ['path', { d: 'M12 2.5v3M12 18.5v3M2.5 12h3M18.5 12h3M5.3 5.3l2.1 2.1M16.6 16.6l2.1 2.1M5.3 18.7l2.1-2.1M16.6 7.4l2.1-2.1' }]],
  info: [['circle', { cx: 12, cy: 12, r: 9 }], ['path', { d: 'M12 11v6M12 7.2v.1' }]],
  pin: [['path', { d: 'M9 3.5h6M10 3.5v6l-3 3.5h10L14 9.5v-6M12 13v7.5' }]],
  mute: [['path', { d: 'M4 9.5h3.5L12 5.5v13l-4.5-4H4zM16 9.5l5 5M21 9.5l-5 5' }]],
  timer: [['circle', { cx: 12, cy: 13, r: 8 }], ['path', { d: 'M12 13V8.5M9.5 2.5h5' }]],
  more: [['circle', { cx: 12, cy: 5.5, r: 1.3, fill: 'currentColor' }], ['circle', { cx: 12, cy: 12, r: 1.3, fill: 'currentColor' }], ['circle', { cx: 12, cy: 18.5, r: 1.3, fill: 'currentColor' }]],
  reply: [['path', { d: 'M9.5 6 4 11.5 9.5 17M4 11.5h9c4 0 7 2.5 7 7' }]],
  back: [['path', { d: 'M11 5 4 12l7 7M4 12h16' }]],
  tick: [['path', { d: 'M3.5 12.5l4.5 4.5L18.5 6.5' }]],
  ticks: [['path', { d: 'M1.5 12.5 6 17 16.5 6.5M10 15.5l1.5 1.5L22 6.5' }]],
  clock: [['circle', { cx: 12, cy: 12, r: 8 }], ['path', { d: 'M12 7.5V12l3 2' }]],
  relay: [['path', { d: 'M7 18.5h10.5a4 4 0 0 0 .5-8 6 6 0 0 0-11.5-1A4.5 4.5 0 0 0 7 18.5z' }], ['path', { d: 'M9 13.5l2 2 4-4' }]],
};

/** An icon from the constant set above; decorative unless given a label. */
export function icon(name, label) {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('class', `icon icon-${name}`);
  svg.setAttribute('fill', 'none');
  svg.setAttribute('stroke', 'currentColor');
  svg.setAttribute('stroke-width', '1.8');
  svg.setAttribute('stroke-linecap', 'round');
  svg.setAttribute('stroke-linejoin', 'round');
  if (label) { svg.setAttribute('role', 'img'); svg.setAttribute('aria-label', label); }
  else svg.setAttribute('aria-hidden', 'true');
  for (const [tag, attrs] of ICONS[name] || []) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    svg.append(el);
  }
  return svg;
}

/** A button with an icon and an accessible name. */
export function iconButton(name, label, onClick, extra = {}) {
  return h('button', { class: 'icon-btn ' + (extra.class || ''), type: 'button', title: label, attrs: { 'aria-label': label, ...(extra.attrs || {}) }, on: { click: onClick } }, icon(name));
}

const COLORS = ['#e57373', '#f06292', '#ba68c8', '#7986cb', '#4fc3f7', '#4db6ac', '#81c784', '#ffb74d', '#a1887f', '#90a4ae'];

// Contacts' pictures (GET /api/contacts/{account}/picture): account → true
// (has one), false (none), or a pending probe. `pictureChanged` repaints.
const pictures = new Map();
let pictureChanged = () => {};
export function onPictureChange(fn) { pictureChanged = fn; }
export function forgetPicture(account) { pictures.delete(account); }
const pictureUrl = (account) => `/api/contacts/${encodeURIComponent(account)}/picture`;

function probePicture(account) {
  pictures.set(account, 'pending');
  const img = new Image();
  img.onload = () => { pictures.set(account, true); pictureChanged(); };
  img.onerror = () => { pictures.set(account, false); };
  img.src = pictureUrl(account);
}

/**
 * A round avatar: our own picture if given (a data: URL), a contact's picture
 * for `c:<account>` ids when the node has one, else the initial on a colour
 * from the id.
 */
export function avatar(name, id, picture, size = 'md') {
  const el = h('span', { class: `avatar avatar-${size}`, attrs: { 'aria-hidden': 'true' } });
  const contact = typeof id === 'string' && id.startsWith('c:') ? id.slice(2) : null;
  if (contact && !picture && !pictures.has(contact)) probePicture(contact);
  if (picture && /^data:image\/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=]+$/.test(picture)) {
    el.append(h('img', { src: picture, alt: '' }));
  } else if (contact && pictures.get(contact) === true) {
    el.append(h('img', { src: pictureUrl(contact), alt: '' }));
  } else {
    let hash = 0;
    // A contact's chat (c:<account>) gets the same colour as the account.
    for (const ch of String(id || name || '?').replace(/^c:/, '')) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
    el.classList.add('c' + (hash % COLORS.length));
    el.textContent = initial(name);
  }
  return el;
}

export function initial(name) {
  const s = String(name || '').trim();
  return s ? Array.from(s)[0].toUpperCase() : '?';
}

const pad = (n) => String(n).padStart(2, '0');
export const clock = (ms) => { const d = new Date(ms); return `${pad(d.getHours())}:${pad(d.getMinutes())}`; };

export function dayKey(ms) { const d = new Date(ms); return `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`; }

/** "Today", "Yesterday", a weekday within a week, else the date. */
export function dayLabel(ms, now = Date.now()) {
  const d = new Date(ms);
  const start = (t) => { const x = new Date(t); x.setHours(0, 0, 0, 0); return x.getTime(); };
  const days = Math.round((start(now) - start(ms)) / 86400000);
  if (days === 0) return 'Today';
  if (days === 1) return 'Yesterday';
  if (days > 1 && days < 7) return d.toLocaleDateString(undefined, { weekday: 'long' });
  return d.toLocaleDateString(undefined, { year: 'numeric', month: 'long', day: 'numeric' });
}

/** A short time for the chat list: the clock today, else the weekday or date. */
export function shortWhen(ms, now = Date.now()) {
  if (!ms) return '';
  if (dayKey(ms) === dayKey(now)) return clock(ms);
  const label = dayLabel(ms, now);
  if (label === 'Yesterday' || !/\d/.test(label)) return label;
  return new Date(ms).toLocaleDateString();
}

export function duration(secs) {
  if (!secs) return 'Off';
  if (secs < 60) return `${secs} s`;
  if (secs < 3600) return `${Math.round(secs / 60)} min`;
  if (secs < 86400) return `${Math.round(secs / 3600)} h`;
  return `${Math.round(secs / 86400)} d`;
}
