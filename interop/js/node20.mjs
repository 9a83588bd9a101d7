// Node.js 20 lacks Promise.withResolvers (ES2024, Node 22+). One transitive
// dependency of js-libp2p 2.x (it-queue, via @libp2p/peer-store → mortice)
// calls it, and no published version of that chain avoids it. This module is
// imported before libp2p and adds the standard behaviour only when missing.
if (typeof Promise.withResolvers !== 'function') {
  Object.defineProperty(Promise, 'withResolvers', {
    configurable: true,
    writable: true,
    value: function withResolvers () {
      let resolve, reject
      const promise = new this((res, rej) => { resolve = res; reject = rej })
      return { promise, resolve, reject }
    }
  })
}
