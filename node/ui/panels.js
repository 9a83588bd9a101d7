// Side panels: contacts (own card as QR, add by card), new group, group info,
// contact info, devices and settings. Esc or the close button closes them.

import { h, replace, $, iconButton, avatar, duration } from './dom.js';

let back = null;

function open(title, ...body) {
  const panel = $('#panel');
  if (panel.hidden) back = document.activeElement;
  replace(panel,
    h('header', { class: 'panel-head' },
      iconButton('close', 'Close', close),
      h('h2', { text: title, id: 'panel-title' })),
    h('div', { class: 'panel-body' }, body));
  panel.setAttribute('aria-labelledby', 'panel-title');
  panel.setAttribute('role', 'dialog');
  panel.hidden = false;
  document.body.classList.add('panel-open');
  const first = panel.querySelector('.panel-body input, .panel-body textarea, .panel-body button, .panel-body select') || panel.querySelector('button');
  if (first) first.focus();
  return panel;
}

export function close() {
  const panel = $('#panel');
  panel.hidden = true;
  replace(panel);
  document.body.classList.remove('panel-open');
  if (back && back.isConnected) back.focus();
  back = null;
}

const section = (title, ...body) => h('section', { class: 'panel-section' }, title ? h('h3', { text: title }) : null, body);
const field = (label, control) => h('label', { class: 'field' }, h('span', { class: 'field-label', text: label }), control);
const loading = () => h('p', { class: 'muted-text', text: 'Loading…' });

function busy(btn, fn) {
  return async (e) => {
    if (e) e.preventDefault();
    btn.disabled = true;
    try { await fn(); } finally { btn.disabled = false; }
  };
}

// ---------- contacts ----------

export async function contacts(ctx) {
  const list = h('ul', { class: 'people' }, h('li', {}, loading()));
  const cardText = h('textarea', { class: 'card-uri', readOnly: true, rows: 3, attrs: { 'aria-label': 'Your card' } });
  const copy = h('button', { type: 'button', class: 'btn', text: 'Copy my card' });
  copy.addEventListener('click', () => {
    cardText.select();
    navigator.clipboard?.writeText(cardText.value).then(() => ctx.toast('Card copied'), () => {});
  });
  const paste = h('textarea', { rows: 3, placeholder: 'tidings:…', attrs: { 'aria-label': 'Their card' } });
  const nick = h('input', { type: 'text', placeholder: 'optional', attrs: { 'aria-label': 'Name for this contact' } });
  const add = h('button', { type: 'submit', class: 'btn primary', text: 'Add contact' });
  const form = h('form', { class: 'stack' }, field('Their card', paste), field('Name', nick), add);
  form.addEventListener('submit', busy(add, async () => {
    const card = paste.value.trim();
    if (!card) { ctx.toast('Paste a card first'); return; }
    try {
      const c = await ctx.api.addContact(card, nick.value.trim() || undefined);
      paste.value = '';
      nick.value = '';
      ctx.toast(`Added ${c.name || c.account}`);
      ctx.refreshChats();
      await fill();
    } catch (e) { ctx.fail(e); }
  }));
  open('Contacts',
    section('Your card', h('p', { class: 'muted-text', text: 'Show this code to a friend, or send them the text below.' }),
      h('img', { class: 'qr', src: '/api/card/qr.svg', alt: 'Your contact card as a QR code', width: 220, height: 220 }),
      cardText, copy),
    section('Add a contact', form),
    section('Your contacts', list));
  ctx.api.card().then((c) => { cardText.value = c.uri; }).catch(ctx.fail);
  async function fill() {
    try {
      const people = await ctx.loadNames();
      replace(list, people.length ? people.map((c) => h('li', { class: 'person' },
        avatar(c.name, `c:${c.account}`),
        h('span', { class: 'person-text' }, h('span', { class: 'person-name', text: c.name || '(no name)' }), h('span', { class: 'mono small', text: c.account })),
        h('button', { type: 'button', class: 'btn', text: 'Message', on: { click: () => { close(); ctx.openChat(`c:${c.account}`); } } })))
        : h('li', { class: 'muted-text', text: 'No contacts yet.' }));
    } catch (e) { ctx.fail(e); }
  }
  fill();
}

// ---------- groups ----------

export async function newGroup(ctx) {
  const name = h('input', { type: 'text', required: true, attrs: { 'aria-label': 'Group name' } });
  const boxes = h('div', { class: 'checks' }, loading());
  const create = h('button', { type: 'submit', class: 'btn primary', text: 'Create group' });
  const form = h('form', { class: 'stack' }, field('Group name', name), h('fieldset', {}, h('legend', { text: 'Members' }), boxes), create);
  form.addEventListener('submit', busy(create, async () => {
    const members = [...boxes.querySelectorAll('input:checked')].map((b) => b.value);
    if (!name.value.trim()) { ctx.toast('Give the group a name'); return; }
    try {
      const g = await ctx.api.createGroup(name.value.trim(), members);
      close();
      await ctx.loadChats().catch(() => {});
      ctx.openChat(`g:${g.id}`);
    } catch (e) { ctx.fail(e); }
  }));
  open('New group', form);
  try {
    const people = await ctx.loadNames();
    replace(boxes, people.length ? people.map((c) => h('label', { class: 'check' },
      h('input', { type: 'checkbox', value: c.account }), h('span', { text: c.name || c.account })))
      : h('p', { class: 'muted-text', text: 'Add contacts first.' }));
  } catch (e) { ctx.fail(e); }
}

export async function groupInfo(ctx, gid) {
  open('Group info', loading());
  let g;
  try { g = await ctx.api.group(gid); } catch (e) { ctx.fail(e); return; }
  const me = ctx.S.me.account;
  const chat = ctx.S.chats.get(`g:${gid}`);
  if (chat) { chat.members = g.members.filter((m) => m.account !== me).length; ctx.repaint(); }
  const mine = g.members.find((m) => m.account === me);
  const admin = mine && (mine.role === 'owner' || mine.role === 'admin');
  const owner = mine && mine.role === 'owner';
  // Shown again after a change, unless it was closed while the change was on its way.
  const reload = () => {
    const title = $('#panel-title');
    if (!$('#panel').hidden && title && title.textContent === 'Group info') groupInfo(ctx, gid);
  };
  const act = (fn) => async () => { try { await fn(); reload(); } catch (e) { ctx.fail(e); } };
  const members = h('ul', { class: 'people' }, g.members.map((m) => {
    const roleEl = owner && m.account !== me
      ? h('select', { attrs: { 'aria-label': `Role of ${ctx.nameOf(m.account)}` }, on: { change: (e) => act(() => ctx.api.setRole(gid, m.account, e.target.value))() } },
        ['member', 'admin', 'owner'].map((r) => h('option', { value: r, text: r, selected: r === m.role })))
      : h('span', { class: 'role', text: m.role });
    return h('li', { class: 'person' },
      m.account === me ? avatar(ctx.S.me.name, me, ctx.S.me.picture) : avatar(ctx.nameOf(m.account), `c:${m.account}`),
      h('span', { class: 'person-text' },
        h('span', { class: 'person-name', text: m.account === me ? 'You' : ctx.nameOf(m.account) }),
        h('span', { class: 'small muted-text', text: `${m.devices} device${m.devices === 1 ? '' : 's'}` })),
      roleEl,
      admin && m.account !== me ? iconButton('close', `Remove ${ctx.nameOf(m.account)}`, act(() => ctx.api.removeMember(gid, m.account))) : null);
  }));
  const addSel = h('select', { attrs: { 'aria-label': 'Contact to add' } });
  const addBtn = h('button', { type: 'submit', class: 'btn', text: 'Add' });
  const addForm = h('form', { class: 'row-form' }, addSel, addBtn);
  addForm.addEventListener('submit', busy(addBtn, async () => {
    if (!addSel.value) return;
    try { await ctx.api.invite(gid, [addSel.value]); reload(); } catch (e) { ctx.fail(e); }
  }));
  const leave = h('button', { type: 'button', class: 'btn danger', text: g.left ? 'You left this group' : 'Leave group', disabled: g.left });
  leave.addEventListener('click', () => {
    if (!leave.dataset.confirm) { leave.dataset.confirm = '1'; leave.textContent = 'Leave this group? Click again'; return; }
    act(() => ctx.api.removeMember(gid, me))();
  });
  open('Group info',
    h('div', { class: 'profile' }, avatar(g.name, `g:${g.id}`, null, 'lg'), h('h3', { text: g.name }), g.description ? h('p', { text: g.description }) : null,
      h('p', { class: 'small muted-text', text: `${g.members.length} members · epoch ${g.epoch}` })),
    section('Members', members, admin && !g.left ? addForm : null),
    section('Relays', h('ul', { class: 'plain mono small' }, g.relays.map((r) => h('li', { text: r })))),
    section(null, leave));
  try {
    const people = await ctx.loadNames();
    const inGroup = new Set(g.members.map((m) => m.account));
    const candidates = people.filter((c) => !inGroup.has(c.account));
    replace(addSel, candidates.length ? candidates.map((c) => h('option', { value: c.account, text: c.name || c.account }))
      : h('option', { value: '', text: 'No one left to add' }));
  } catch { /* the add form just stays empty */ }
}

export function contactInfo(ctx, chat) {
  const account = chat.id.slice(2);
  open('Contact info',
    h('div', { class: 'profile' }, avatar(chat.name, chat.id, chat.picture, 'lg'), h('h3', { text: chat.name })),
    section('Account', h('p', { class: 'mono small', text: account })),
    section('Disappearing messages', h('p', { text: duration(chat.disappearing_secs || 0) })));
}

// ---------- devices ----------

export async function devices(ctx) {
  const list = h('ul', { class: 'people' }, h('li', {}, loading()));
  const code = h('div', { class: 'link-code', hidden: true });
  const link = h('button', { type: 'button', class: 'btn primary', text: 'Link a new device' });
  link.addEventListener('click', busy(link, async () => {
    try {
      const r = await ctx.api.linkDevice();
      code.hidden = false;
      replace(code,
        h('p', { text: 'On the new device, within five minutes, run:' }),
        h('pre', { class: 'mono', text: `tidings init --link ${r.code}` }));
    } catch (e) { ctx.fail(e); }
  }));
  open('Devices', section('Link', link, code), section('This account\'s devices', list));
  async function fill() {
    try {
      const ds = await ctx.api.devices();
      replace(list, ds.map((d) => {
        const revoke = h('button', { type: 'button', class: 'btn danger', text: 'Revoke' });
        revoke.addEventListener('click', busy(revoke, async () => {
          if (!revoke.dataset.confirm) { revoke.dataset.confirm = '1'; revoke.textContent = 'Revoke? Click again'; return; }
          try { await ctx.api.revokeDevice(d.device); ctx.toast('Device revoked'); await fill(); } catch (e) { ctx.fail(e); }
        }));
        return h('li', { class: 'person' },
          h('span', { class: 'person-text' },
            h('span', { class: 'person-name mono', text: `${d.device.slice(0, 16)}…` }),
            h('span', { class: 'small muted-text', text: `since ${new Date(d.created_ms).toLocaleString()}${d.this_device ? ' · this device' : ''}` })),
          d.this_device ? null : revoke);
      }));
    } catch (e) { ctx.fail(e); }
  }
  fill();
}

// ---------- settings ----------

/** Reads an image file and shrinks it to a square JPEG data URL (≤ 256 KiB). */
function pictureFrom(file) {
  return new Promise((resolve, reject) => {
    // A data: URL, not a blob: one: the page's policy allows images from data: only.
    const reader = new FileReader();
    reader.onerror = () => reject(new Error('cannot read the file'));
    reader.onload = () => {
      const img = new Image();
      img.onload = () => {
        const size = 192;
        const canvas = document.createElement('canvas');
        canvas.width = size;
        canvas.height = size;
        const side = Math.min(img.width, img.height);
        canvas.getContext('2d').drawImage(img, (img.width - side) / 2, (img.height - side) / 2, side, side, 0, 0, size, size);
        resolve(canvas.toDataURL('image/jpeg', 0.85));
      };
      img.onerror = () => reject(new Error('not an image'));
      img.src = String(reader.result);
    };
    reader.readAsDataURL(file);
  });
}

export async function settings(ctx) {
  open('Settings', loading());
  let s;
  try { s = await ctx.api.settings(); } catch (e) { ctx.fail(e); return; }
  let picture = s.picture;
  const pic = h('span', { class: 'pic-slot' }, avatar(s.name, s.account, picture, 'lg'));
  const file = h('input', { type: 'file', class: 'visually-hidden', accept: 'image/png,image/jpeg,image/webp,image/gif' });
  const choose = h('label', { class: 'btn' }, file, 'Change picture');
  file.addEventListener('change', async () => {
    const f = file.files && file.files[0];
    if (!f) return;
    try { picture = await pictureFrom(f); replace(pic, avatar(s.name, s.account, picture, 'lg')); } catch (e) { ctx.toast(e.message); }
  });
  const clearPic = h('button', { type: 'button', class: 'btn', text: 'Remove picture', on: { click: () => { picture = ''; replace(pic, avatar(s.name, s.account, null, 'lg')); } } });
  const name = h('input', { type: 'text', value: s.name, attrs: { 'aria-label': 'Your name' } });
  const receipts = h('input', { type: 'checkbox', checked: !!s.read_receipts });
  const presence = h('input', { type: 'checkbox', checked: !!s.presence });
  const save = h('button', { type: 'submit', class: 'btn primary', text: 'Save' });
  const form = h('form', { class: 'stack' },
    h('div', { class: 'pic-row' }, pic, h('div', { class: 'stack' }, choose, clearPic)),
    field('Name', name),
    h('label', { class: 'check' }, receipts, h('span', { text: 'Send read receipts' })),
    h('p', { class: 'small muted-text', text: 'Without them, others do not see when you read their messages.' }),
    h('label', { class: 'check' }, presence, h('span', { text: 'Share when I am online' })),
    h('p', { class: 'small muted-text', text: 'Only contacts who share theirs see yours.' }),
    save);
  form.addEventListener('submit', busy(save, async () => {
    const body = { name: name.value.trim(), read_receipts: receipts.checked, presence: presence.checked };
    if (picture !== s.picture) body.picture = picture || '';
    try {
      s = await ctx.api.saveSettings(body);
      ctx.setMe({ name: s.name, picture: s.picture, account: s.account });
      ctx.toast('Saved');
    } catch (e) { ctx.fail(e); }
  }));
  open('Settings',
    form,
    relaysSection(ctx, s),
    passphraseSection(ctx, s),
    section('Account', h('p', { class: 'mono small', text: s.account })));
}

function relaysSection(ctx, s) {
  const list = h('textarea', {
    class: 'mono small', rows: 4, value: (s.home_relays || []).join('\n'),
    placeholder: '/dns4/relay.example.org/tcp/4001/p2p/12D3Koo…',
    attrs: { 'aria-label': 'Home relays, one per line', spellcheck: 'false' },
  });
  const save = h('button', { type: 'submit', class: 'btn', text: 'Save relays' });
  const form = h('form', { class: 'stack', id: 'relays-form' },
    field('One address per line', list),
    h('p', { class: 'small muted-text', text: 'Your mail waits on these while you are away. Two or more run by different people are safest. Contacts hear of a change at once; relays you drop are still emptied for two weeks.' }),
    save);
  form.addEventListener('submit', busy(save, async () => {
    const relays = list.value.split('\n').map((l) => l.trim()).filter(Boolean);
    try {
      const saved = await ctx.api.saveSettings({ home_relays: relays });
      list.value = saved.home_relays.join('\n');
      ctx.toast('Home relays saved');
    } catch (e) { ctx.fail(e); }
  }));
  return section('Home relays', form);
}

function passphraseSection(ctx, s) {
  const slot = h('div', { class: 'stack' });
  const draw = (set) => {
    const pw = (label) => h('input', { type: 'password', autocomplete: 'new-password', attrs: { 'aria-label': label } });
    const current = pw('Current passphrase');
    const next = pw('New passphrase');
    const again = pw('New passphrase again');
    const apply = h('button', { type: 'submit', class: 'btn', text: set ? 'Change passphrase' : 'Set passphrase' });
    const removeBtn = set ? h('button', { type: 'button', class: 'btn danger', text: 'Remove passphrase' }) : null;
    const form = h('form', { class: 'stack', id: 'passphrase-form' },
      h('p', { class: 'small muted-text', text: set
        ? 'This device\'s keys are sealed under your passphrase; the node asks for it when it starts. There is no way back in without it.'
        : 'Seal this device\'s keys under a passphrase (6 characters or more). The node then asks for it when it starts.' }),
      set ? field('Current passphrase', current) : null,
      field('New passphrase', next),
      field('Again', again),
      h('div', { class: 'row-form' }, apply, removeBtn));
    const done = async (fn, msg) => {
      try {
        const r = await fn();
        ctx.toast(msg);
        draw(r.passphrase);
      } catch (e) { ctx.fail(e); }
    };
    form.addEventListener('submit', busy(apply, async () => {
      if (next.value !== again.value) { ctx.toast('The two new passphrases differ'); return; }
      await done(() => ctx.api.setPassphrase(set ? current.value : null, next.value), set ? 'Passphrase changed' : 'Passphrase set');
    }));
    if (removeBtn) {
      removeBtn.addEventListener('click', busy(removeBtn, async () => {
        await done(() => ctx.api.setPassphrase(current.value, null), 'Passphrase removed');
      }));
    }
    replace(slot, form);
  };
  draw(!!s.passphrase);
  return section('Passphrase', slot);
}
