// A virtualised vertical list of rows of varying height: only the rows in and
// near the viewport exist in the DOM. Heights are estimated until a row has
// been rendered once, then measured and cached. The first visible row stays
// where it is on screen when rows are added above it (older pages) or change
// height; a list scrolled to the bottom stays at the bottom.

const OVERSCAN = 600; // px rendered above and below the viewport

export class VirtualList {
  /**
   * @param {HTMLElement} scroller the scrolling element (overflow-y: auto)
   * @param {object} o
   *   key(item) → string, rev(item) → number (re-render when it changes),
   *   render(item) → HTMLElement, estimate(item) → px,
   *   anchorable(item) → false for rows that must not keep the scroll place,
   *   onNearTop() called when the viewport nears the top, onScroll()
   */
  constructor(scroller, o) {
    this.scroller = scroller;
    this.o = o;
    this.inner = document.createElement('div');
    this.inner.className = 'vlist-inner';
    scroller.replaceChildren(this.inner);
    this.items = [];
    this.index = new Map(); // key → index
    this.heights = new Map(); // key → measured px
    this.tops = new Float64Array(1);
    this.rendered = new Map(); // key → { el, rev }
    this.stickBottom = true;
    this.frame = 0;
    this.width = 0;
    scroller.addEventListener('scroll', () => this.onScroll(), { passive: true });
    this.resize = new ResizeObserver(() => {
      const w = this.scroller.clientWidth;
      if (w !== this.width) {
        this.width = w;
        this.heights.clear();
      }
      this.relayout();
    });
    this.resize.observe(scroller);
  }

  destroy() {
    this.resize.disconnect();
    cancelAnimationFrame(this.frame);
  }

  atBottom() {
    const s = this.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < 24;
  }

  onScroll() {
    if (this.suppress) return;
    this.stickBottom = this.atBottom();
    if (!this.frame) {
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.paint();
        if (this.scroller.scrollTop < 1500 && this.o.onNearTop) this.o.onNearTop();
        if (this.o.onScroll) this.o.onScroll();
      });
    }
  }

  /** Replaces the items; keeps the first visible row in place (or the bottom). */
  setItems(items) {
    const anchor = this.anchor();
    this.items = items;
    this.index = new Map();
    items.forEach((it, i) => this.index.set(this.o.key(it), i));
    this.layout();
    this.restore(anchor);
    this.paint();
  }

  /** Re-renders one item whose content changed. */
  refresh(key) {
    const r = this.rendered.get(key);
    if (r) r.rev = -1;
    this.relayout();
  }

  relayout() {
    const anchor = this.anchor();
    this.layout();
    this.restore(anchor);
    this.paint();
  }

  height(i) {
    const it = this.items[i];
    const k = this.o.key(it);
    return this.heights.get(k) ?? this.o.estimate(it);
  }

  layout() {
    const n = this.items.length;
    if (this.tops.length < n + 1) this.tops = new Float64Array(Math.max(n + 1, this.tops.length * 2));
    this.tops[0] = 0;
    for (let i = 0; i < n; i++) this.tops[i + 1] = this.tops[i] + this.height(i);
    this.inner.style.height = `${this.tops[n]}px`;
  }

  total() { return this.tops[this.items.length]; }

  /** Index of the row at vertical position y. */
  find(y) {
    let lo = 0, hi = this.items.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.tops[mid] <= y) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  anchor() {
    if (this.stickBottom || !this.items.length) return { bottom: true };
    const st = this.scroller.scrollTop;
    let i = this.find(st);
    // A row that stays at the top (a "loading" row) cannot hold the place.
    while (i + 1 < this.items.length && this.o.anchorable && !this.o.anchorable(this.items[i])) i++;
    const it = this.items[i];
    return it ? { key: this.o.key(it), offset: st - this.tops[i] } : { bottom: true };
  }

  restore(a) {
    this.suppress = true;
    if (a.bottom) {
      this.scroller.scrollTop = this.total();
    } else {
      const i = this.index.get(a.key);
      if (i !== undefined) this.scroller.scrollTop = this.tops[i] + a.offset;
    }
    this.suppress = false;
  }

  paint() {
    for (let pass = 0; pass < 4; pass++) {
      const anchor = this.anchor();
      if (!this.renderWindow()) return;
      this.layout();
      this.restore(anchor);
      this.position();
    }
  }

  /** Renders the rows in the window and measures them; true if a height changed. */
  renderWindow() {
    const n = this.items.length;
    const keep = new Set();
    let changed = false;
    if (n) {
      const st = this.scroller.scrollTop;
      const vh = this.scroller.clientHeight || 800;
      const first = this.find(Math.max(0, st - OVERSCAN));
      const last = this.find(st + vh + OVERSCAN);
      const fresh = [];
      for (let i = first; i <= last; i++) {
        const it = this.items[i];
        const k = this.o.key(it);
        keep.add(k);
        const rev = this.o.rev(it);
        let r = this.rendered.get(k);
        if (!r || r.rev !== rev) {
          const el = this.o.render(it);
          el.classList.add('vrow');
          el.dataset.key = k;
          if (r) r.el.replaceWith(el); else this.inner.append(el);
          r = { el, rev };
          this.rendered.set(k, r);
          fresh.push(k);
        } else if (!this.heights.has(k)) {
          fresh.push(k); // heights were dropped (the width changed): measure again
        }
        r.el.style.transform = `translateY(${this.tops[i]}px)`;
      }
      for (const k of fresh) {
        const h = this.rendered.get(k).el.offsetHeight;
        if (h && this.heights.get(k) !== h) { this.heights.set(k, h); changed = true; }
      }
    }
    for (const [k, r] of this.rendered) {
      if (!keep.has(k)) { r.el.remove(); this.rendered.delete(k); }
    }
    return changed;
  }

  position() {
    for (const [k, r] of this.rendered) {
      const i = this.index.get(k);
      if (i !== undefined) r.el.style.transform = `translateY(${this.tops[i]}px)`;
    }
  }

  scrollToBottom() {
    this.stickBottom = true;
    this.relayout();
  }

  /** Scrolls so that the row `key` is in view; returns its element. */
  scrollToKey(key) {
    const i = this.index.get(key);
    if (i === undefined) return null;
    this.stickBottom = false;
    this.suppress = true;
    this.scroller.scrollTop = Math.max(0, this.tops[i] - this.scroller.clientHeight / 3);
    this.suppress = false;
    this.paint();
    return this.rendered.get(key)?.el || null;
  }
}
