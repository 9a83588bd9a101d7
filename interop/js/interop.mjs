#!/usr/bin/env node
// Interop check: a js-libp2p node talks to a Tidings relay (rust-libp2p).
//
//   node interop.mjs --relay /ip4/127.0.0.1/tcp/4001/p2p/<relay id> --peer <peer id>
//                    [--expect-dial-from <peer id>] [--timeout-ms 60000]
//
// --relay            the relay's TCP address, ending in /p2p/<relay id>
// --peer             a Tidings node in the relay's DHT (not known to us in advance):
//                    we look it up through the relay's Kademlia
// --expect-dial-from a peer that will dial our circuit address through the relay
//                    (the address is announced on stderr as `TIDINGS-INTEROP RESERVED <addr>`);
//                    we wait for that relayed connection and ping the peer over it
//
// Prints exactly one JSON line with the results on stdout; progress goes to
// stderr. Exits 0 only if every check passed.

import './node20.mjs' // must come before libp2p: see the file
import { parseArgs } from 'node:util'
import { performance } from 'node:perf_hooks'
import { webcrypto } from 'node:crypto'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { multiaddr } from '@multiformats/multiaddr'
import { peerIdFromString } from '@libp2p/peer-id'

const KAD_PROTOCOL = '/tidings/kad/1.0.0'
const PING_PROTOCOL = '/ipfs/ping/1.0.0'
const REQUIRED_PROTOCOLS = [
  '/ipfs/id/1.0.0',
  PING_PROTOCOL,
  KAD_PROTOCOL,
  '/libp2p/circuit/relay/0.2.0/hop'
]

const { values: args } = parseArgs({
  options: {
    relay: { type: 'string' },
    peer: { type: 'string' },
    'expect-dial-from': { type: 'string' },
    'timeout-ms': { type: 'string', default: '60000' }
  }
})

function log (...parts) {
  process.stderr.write(`interop.mjs: ${parts.join(' ')}\n`)
}

function usage (msg) {
  log(msg)
  log('usage: node interop.mjs --relay <multiaddr/p2p/id> --peer <peer id> [--expect-dial-from <peer id>] [--timeout-ms N]')
  process.exit(2)
}

if (args.relay == null) usage('--relay is required')
if (args.peer == null) usage('--peer is required')
const relayAddr = multiaddr(args.relay)
const relayIdText = relayAddr.getPeerId()
if (relayIdText == null) usage('--relay must end in /p2p/<relay peer id>')
const relayId = peerIdFromString(relayIdText)
const targetId = peerIdFromString(args.peer)
const dialerId = args['expect-dial-from'] != null ? peerIdFromString(args['expect-dial-from']) : undefined
const totalTimeout = Number(args['timeout-ms'])
if (!Number.isFinite(totalTimeout) || totalTimeout <= 0) usage('--timeout-ms must be a positive number')
// Each step gets a share of the budget; the whole run is also capped.
const STEP_MS = Math.max(5000, Math.floor(totalTimeout / 3))

const started = performance.now()
const results = {
  ok: false,
  relay: { addr: relayAddr.toString(), peer: relayId.toString() },
  identify: { ok: false },
  ping: { ok: false },
  kad: { ok: false },
  circuit: { ok: false },
  errors: []
}

function fail (step, err) {
  const msg = `${step}: ${err?.message ?? err}`
  log('FAILED', msg)
  results.errors.push(msg)
}

function finish () {
  results.ok = results.errors.length === 0 &&
    results.identify.ok && results.ping.ok && results.kad.ok && results.circuit.ok
  results.elapsed_ms = Math.round(performance.now() - started)
  process.stdout.write(JSON.stringify(results) + '\n')
}

// A hard stop, so the process never hangs whatever a library does.
const watchdog = setTimeout(() => {
  fail('timeout', `the run took longer than ${totalTimeout} ms`)
  finish()
  process.exit(1)
}, totalTimeout)

function makeNode (listen) {
  return createLibp2p({
    addresses: { listen },
    transports: [tcp(), circuitRelayTransport()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: {
      identify: identify(),
      ping: ping(),
      // A DHT client that speaks the Tidings protocol id and keeps loopback
      // addresses (the default mapper drops private addresses).
      dht: kadDHT({ protocol: KAD_PROTOCOL, clientMode: true, peerInfoMapper: passthroughMapper })
    }
  })
}

// One ping (32 random bytes echoed back) on a given connection, so that the
// round trip provably uses that connection (relayed connections are
// "limited" in js-libp2p, so the stream must be allowed on them explicitly).
async function pingOver (conn, signal) {
  const stream = await conn.newStream(PING_PROTOCOL, { runOnLimitedConnection: true, signal })
  try {
    const data = webcrypto.getRandomValues(new Uint8Array(32))
    const t0 = performance.now()
    const reply = new Uint8Array(32)
    let got = 0
    const reading = (async () => {
      for await (const chunk of stream.source) {
        const bytes = chunk.subarray()
        reply.set(bytes.subarray(0, 32 - got), got)
        got += Math.min(bytes.length, 32 - got)
        if (got >= 32) break
      }
    })()
    await stream.sink([data])
    await reading
    const rtt = performance.now() - t0
    if (got !== 32) throw new Error(`ping stream ended after ${got} of 32 bytes`)
    if (!reply.every((b, i) => b === data[i])) throw new Error('ping reply does not match')
    return Math.round(rtt * 1000) / 1000
  } finally {
    await stream.close({ signal }).catch(() => stream.abort(new Error('closing')))
  }
}

// The relay's limits on a relayed connection (js-libp2p exposes them as
// non-enumerable getters, the byte count as a BigInt).
function limitsOf (conn) {
  if (conn.limits == null) return null
  return {
    seconds: conn.limits.seconds ?? null,
    bytes: conn.limits.bytes != null ? Number(conn.limits.bytes) : null
  }
}

function withTimeout (promise, ms, what) {
  let timer
  return Promise.race([
    promise,
    new Promise((resolve, reject) => { timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms) })
  ]).finally(() => clearTimeout(timer))
}

async function waitFor (what, fn, ms) {
  const deadline = performance.now() + ms
  for (;;) {
    const v = await fn()
    if (v) return v
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 50))
  }
}

const nodes = []
try {
  // The probe: not listening anywhere, it only dials out.
  const probe = await makeNode([])
  nodes.push(probe)
  results.probe_peer = probe.peerId.toString()
  log('probe', probe.peerId.toString(), 'dialling', relayAddr.toString())

  // a. connect over TCP/Noise/Yamux and identify.
  let relayConn
  try {
    // js-libp2p identifies every new connection by itself (and allows only one
    // outbound identify stream at a time), so take that exchange's result.
    const identified = new Promise(resolve => {
      probe.addEventListener('peer:identify', ev => { if (ev.detail.peerId.equals(relayId)) resolve(ev.detail) })
    })
    relayConn = await probe.dial(relayAddr, { signal: AbortSignal.timeout(STEP_MS) })
    const id = await withTimeout(identified, STEP_MS, 'the identify exchange with the relay')
    const protocols = [...id.protocols].sort()
    const missing = REQUIRED_PROTOCOLS.filter(p => !protocols.includes(p))
    results.identify = {
      ok: missing.length === 0 && id.peerId.equals(relayId),
      remote_addr: relayConn.remoteAddr.toString(),
      encryption: relayConn.encryption,
      multiplexer: relayConn.multiplexer,
      agent_version: id.agentVersion,
      protocol_version: id.protocolVersion,
      protocols,
      listen_addrs: id.listenAddrs.map(a => a.toString()),
      missing
    }
    if (!id.peerId.equals(relayId)) fail('identify', `identified as ${id.peerId}, expected ${relayId}`)
    if (missing.length > 0) fail('identify', `relay does not advertise ${missing.join(', ')}`)
  } catch (err) {
    fail('identify', err)
    throw err // nothing else works without the connection
  }

  // The relay enters our DHT routing table once identify has shown that it
  // speaks /tidings/kad/1.0.0 and it answered the routing table's liveness
  // ping. Wait for that first: rust-libp2p serves one inbound ping stream per
  // connection at a time, so overlapping pings from us would race.
  let inRoutingTable = false
  try {
    const t = performance.now()
    await waitFor('the relay to enter the DHT routing table (identify must list ' + KAD_PROTOCOL + ')',
      async () => (await probe.services.dht.routingTable.find(relayId)) != null, STEP_MS)
    inRoutingTable = true
    results.kad.routing_table_ms = Math.round(performance.now() - t)
  } catch (err) {
    fail('kad', err)
  }

  // b. ping with the standard ping service.
  try {
    const rtts = []
    for (let i = 0; i < 3; i++) {
      rtts.push(await probe.services.ping.ping(relayId, { signal: AbortSignal.timeout(STEP_MS) }))
    }
    results.ping = { ok: true, rtt_ms: rtts }
  } catch (err) {
    fail('ping', err)
  }

  // c. Kademlia on /tidings/kad/1.0.0: find a peer we have never heard of.
  // Our only DHT peer is the relay, so the answer can only come from its
  // (rust-libp2p) Kademlia.
  try {
    if (await probe.peerStore.has(targetId)) throw new Error('the target is already known before the query')
    if (!inRoutingTable) throw new Error('no DHT peer to ask')
    const dht = probe.services.dht
    const responders = new Set()
    let final
    for await (const ev of dht.findPeer(targetId, { useCache: false, signal: AbortSignal.timeout(STEP_MS) })) {
      if (ev.name === 'PEER_RESPONSE') responders.add(ev.from.toString())
      if (ev.name === 'QUERY_ERROR') log('kad query error from', ev.from?.toString(), ev.error?.message)
      if (ev.name === 'FINAL_PEER' && final == null) final = ev
    }
    if (final == null) throw new Error('findPeer ended without a result')
    const addrs = final.peer.multiaddrs.map(a => a.toString())
    results.kad = {
      ...results.kad,
      ok: false,
      protocol: KAD_PROTOCOL,
      target: targetId.toString(),
      answered_by: final.from.toString(),
      responders: [...responders],
      found_addrs: addrs
    }
    if (!final.from.equals(relayId)) throw new Error(`the peer was found by ${final.from}, not by the relay`)
    if (!final.peer.id.equals(targetId)) throw new Error(`findPeer returned ${final.peer.id}`)
    const tcpAddrs = final.peer.multiaddrs.filter(a => a.toString().includes('/tcp/') && !a.toString().includes('/p2p-circuit'))
    if (tcpAddrs.length === 0) throw new Error('the relay returned no TCP address for the peer')
    // The addresses the relay handed out are real: dial one and ping the peer.
    const direct = await probe.dial(tcpAddrs[0].encapsulate(`/p2p/${targetId}`), { signal: AbortSignal.timeout(STEP_MS) })
    results.kad.dialled = direct.remoteAddr.toString()
    // The peer serves the DHT too, so our routing table pings it on connect;
    // let that finish before our own ping (see above).
    await waitFor('the peer to enter the DHT routing table',
      async () => (await dht.routingTable.find(targetId)) != null, STEP_MS).catch(err => log(err.message))
    results.kad.direct_ping_rtt_ms = await pingOver(direct, AbortSignal.timeout(STEP_MS))
    results.kad.ok = true
  } catch (err) {
    fail('kad', err)
  }

  // d. circuit relay v2: a second js node reserves a slot on the relay, the
  // probe dials it through /p2p-circuit and pings it over the relayed link.
  try {
    const listener = await makeNode([relayAddr.encapsulate('/p2p-circuit').toString()])
    nodes.push(listener)
    const circuitAddr = await waitFor('a reservation on the relay',
      () => listener.getMultiaddrs().find(a => a.toString().includes('/p2p-circuit')), STEP_MS)
    results.circuit = {
      ok: false,
      listener_peer: listener.peerId.toString(),
      reservation_addr: circuitAddr.toString()
    }
    log('reserved', circuitAddr.toString())

    const relayed = await probe.dial(circuitAddr, { signal: AbortSignal.timeout(STEP_MS) })
    if (!relayed.remoteAddr.toString().includes('/p2p-circuit')) throw new Error(`not relayed: ${relayed.remoteAddr}`)
    if (!relayed.remotePeer.equals(listener.peerId)) throw new Error(`reached ${relayed.remotePeer}, not the listener`)
    results.circuit.js_dial = {
      remote_addr: relayed.remoteAddr.toString(),
      limits: limitsOf(relayed),
      rtt_ms: await pingOver(relayed, AbortSignal.timeout(STEP_MS))
    }

    if (dialerId != null) {
      // Another party (the Rust node) dials us through the relay: announce
      // the address, wait for its relayed connection, ping it over that link.
      const isFromDialer = c => c.remotePeer.equals(dialerId) && c.remoteAddr.toString().includes('/p2p-circuit')
      const inbound = new Promise(resolve => {
        listener.addEventListener('connection:open', ev => { if (isFromDialer(ev.detail)) resolve(ev.detail) })
      })
      process.stderr.write(`TIDINGS-INTEROP RESERVED ${circuitAddr.toString()}\n`)
      const conn = listener.getConnections(dialerId).find(isFromDialer) ??
        await withTimeout(inbound, STEP_MS, `${dialerId} to dial us through the relay`)
      results.circuit.inbound_dial = {
        from: conn.remotePeer.toString(),
        direction: conn.direction,
        remote_addr: conn.remoteAddr.toString(),
        limits: limitsOf(conn),
        rtt_ms: await pingOver(conn, AbortSignal.timeout(STEP_MS))
      }
      if (conn.direction !== 'inbound') throw new Error('expected an inbound relayed connection')
    } else {
      results.circuit.inbound_dial = 'not requested'
    }
    results.circuit.ok = true
  } catch (err) {
    fail('circuit', err)
  }
} catch (err) {
  if (results.errors.length === 0) fail('setup', err)
} finally {
  await Promise.allSettled(nodes.map(n => n.stop()))
  clearTimeout(watchdog)
  finish()
  process.exit(results.ok ? 0 : 1)
}
