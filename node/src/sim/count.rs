//! Bytes per protocol in a simulated world.
//!
//! Every substream of a simulated connection is wrapped ([`CountingMuxer`]) and counts what it
//! sends and receives. Its protocol is read from the substream's own first bytes: the
//! multistream-select negotiation that opens every libp2p substream names the protocol in plain
//! length-prefixed lines, above Noise and yamux, in whatever this host writes (a dialer proposes
//! it, a listener echoes it). Until the name is known the bytes wait and are then added to its
//! class; a substream that never names one counts as [`StreamClass::Other`].
//!
//! The links count what they carry too (`SimConn`), so the bytes no substream accounts for are
//! the connection's own: the security handshake, Noise's and yamux's framing, yamux's window
//! updates and pings.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};

/// What a substream carries, by its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamClass {
    /// Kademlia (`/tidings/kad/…`).
    Kad,
    /// Direct delivery of envelopes.
    Deliver,
    /// Mailbox deposits, fetches, acks and long polls.
    Mailbox,
    /// Relay circuits: reservations and the relayed bytes (`/libp2p/circuit/relay/…`).
    Circuit,
    /// Key package fetches.
    KeyPackage,
    /// identify and its pushes (`/ipfs/id/…`).
    Identify,
    /// AutoNAT v2 (`/libp2p/autonat/2/…`): reachability checks, with the 30–100 kB of dial data a
    /// server asks for before it dials an address other than the one it sees.
    Autonat,
    /// libp2p ping (`/ipfs/ping/…`), the keep-alive of long-lived connections.
    Ping,
    /// Anything else: hole punching, device linking, unknown or refused protocols.
    Other,
}

impl StreamClass {
    pub const ALL: [StreamClass; 9] = [
        StreamClass::Kad,
        StreamClass::Deliver,
        StreamClass::Mailbox,
        StreamClass::Circuit,
        StreamClass::KeyPackage,
        StreamClass::Identify,
        StreamClass::Autonat,
        StreamClass::Ping,
        StreamClass::Other,
    ];

    /// Its name in the simulator's outputs.
    pub fn name(self) -> &'static str {
        match self {
            StreamClass::Kad => "kad",
            StreamClass::Deliver => "deliver",
            StreamClass::Mailbox => "mailbox",
            StreamClass::Circuit => "circuit",
            StreamClass::KeyPackage => "keypackage",
            StreamClass::Identify => "identify",
            StreamClass::Autonat => "autonat",
            StreamClass::Ping => "ping",
            StreamClass::Other => "other",
        }
    }

    /// The class of a protocol name as multistream-select carries it.
    pub fn of_protocol(name: &[u8]) -> StreamClass {
        let is = |p: &str| name == p.as_bytes();
        if is(crate::net::KAD_PROTOCOL.as_ref()) {
            StreamClass::Kad
        } else if is(crate::net::DELIVER_PROTOCOL.as_ref()) {
            StreamClass::Deliver
        } else if is(crate::net::MAILBOX_PROTOCOL.as_ref()) {
            StreamClass::Mailbox
        } else if is(crate::net::KEY_PACKAGE_PROTOCOL.as_ref()) {
            StreamClass::KeyPackage
        } else if name.starts_with(b"/libp2p/circuit/relay/") {
            StreamClass::Circuit
        } else if name.starts_with(b"/ipfs/id/") {
            StreamClass::Identify
        } else if name.starts_with(b"/libp2p/autonat/") {
            StreamClass::Autonat
        } else if name.starts_with(b"/ipfs/ping/") {
            StreamClass::Ping
        } else {
            StreamClass::Other
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What one host has sent and received: on its links in all, and on its substreams by class
/// (both directions); and how many connections it dialled and accepted.
#[derive(Debug, Default)]
pub(crate) struct HostBytes {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) dialled: AtomicU64,
    pub(crate) accepted: AtomicU64,
    streams: [AtomicU64; StreamClass::ALL.len()],
    /// Connections this host dialled, by the class of the first substream it opened on them that
    /// is not one every connection opens (identify, ping, AutoNAT): what each dial was for.
    dialled_for: [AtomicU64; StreamClass::ALL.len()],
    /// Substreams this host opened, by class.
    opened: [AtomicU64; StreamClass::ALL.len()],
}

impl HostBytes {
    fn add(&self, class: StreamClass, n: u64) {
        self.streams[class.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes sent and received on substreams of each class, in [`StreamClass::ALL`]'s order.
    pub(crate) fn by_class(&self) -> [u64; StreamClass::ALL.len()] {
        std::array::from_fn(|i| self.streams[i].load(Ordering::Relaxed))
    }

    /// Connections dialled for each class, in [`StreamClass::ALL`]'s order (see `dialled_for`).
    /// Those that never opened such a substream are the rest of `dialled`.
    pub(crate) fn dialled_for(&self) -> [u64; StreamClass::ALL.len()] {
        std::array::from_fn(|i| self.dialled_for[i].load(Ordering::Relaxed))
    }

    /// Substreams this host opened, by class, in [`StreamClass::ALL`]'s order.
    pub(crate) fn opened(&self) -> [u64; StreamClass::ALL.len()] {
        std::array::from_fn(|i| self.opened[i].load(Ordering::Relaxed))
    }
}

impl StreamClass {
    /// Whether every connection opens substreams of this class, whatever it was made for.
    fn is_upkeep(self) -> bool {
        matches!(self, StreamClass::Identify | StreamClass::Ping | StreamClass::Autonat)
    }
}

/// A stream muxer whose substreams count their bytes into one host's [`HostBytes`].
pub struct CountingMuxer<M> {
    inner: M,
    host: Arc<HostBytes>,
    /// On a connection this host dialled: whether its purpose has been counted yet.
    purpose: Option<Arc<AtomicBool>>,
}

impl<M> CountingMuxer<M> {
    /// `dialled`: whether this host dialled the connection (its purpose is then counted).
    pub(crate) fn new(inner: M, host: Arc<HostBytes>, dialled: bool) -> Self {
        Self {
            inner,
            host,
            purpose: dialled.then(Arc::default),
        }
    }

    fn wrap<S>(&self, inner: S, outbound: bool) -> CountedStream<S> {
        CountedStream {
            inner,
            host: self.host.clone(),
            class: None,
            sniff: None,
            purpose: if outbound { self.purpose.clone() } else { None },
            outbound,
        }
    }
}

impl<M> StreamMuxer for CountingMuxer<M>
where
    M: StreamMuxer + Unpin,
    M::Substream: Unpin,
{
    type Substream = CountedStream<M::Substream>;
    type Error = M::Error;

    fn poll_inbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner)
            .poll_inbound(cx)
            .map_ok(|s| this.wrap(s, false))
    }

    fn poll_outbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner)
            .poll_outbound(cx)
            .map_ok(|s| this.wrap(s, true))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll(cx)
    }
}

/// Most of a substream's first written bytes kept to find its protocol's name in; the names
/// are far shorter.
const SNIFF_CAP: usize = 256;

/// A substream that counts its bytes, once it knows its class.
pub struct CountedStream<S> {
    inner: S,
    host: Arc<HostBytes>,
    class: Option<StreamClass>,
    /// Until the class is known: the bytes written so far and the count of every byte moved.
    sniff: Option<Box<Sniff>>,
    /// An outbound substream of a connection this host dialled: the connection's flag of
    /// whether its purpose has been counted.
    purpose: Option<Arc<AtomicBool>>,
    /// Whether this host opened the substream.
    outbound: bool,
}

#[derive(Default)]
struct Sniff {
    written: Vec<u8>,
    pending: u64,
}

impl<S> CountedStream<S> {
    /// Counts `n` bytes moved; `written` are the bytes if this host wrote them.
    fn count(&mut self, n: usize, written: Option<&[u8]>) {
        if n == 0 {
            return;
        }
        if let Some(class) = self.class {
            self.host.add(class, n as u64);
            return;
        }
        let sniff = self.sniff.get_or_insert_with(Box::default);
        sniff.pending += n as u64;
        let Some(bytes) = written else { return };
        let room = SNIFF_CAP.saturating_sub(sniff.written.len());
        sniff.written.extend_from_slice(&bytes[..bytes.len().min(room)]);
        let class = match protocol_of(&sniff.written) {
            Sniffed::Named(name) => StreamClass::of_protocol(name),
            Sniffed::NotYet if sniff.written.len() < SNIFF_CAP => return,
            Sniffed::NotYet | Sniffed::Garbled => StreamClass::Other,
        };
        self.host.add(class, sniff.pending);
        self.class = Some(class);
        self.sniff = None;
        if self.outbound {
            self.host.opened[class.index()].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(purpose) = self.purpose.take()
            && !class.is_upkeep()
            && !purpose.swap(true, Ordering::Relaxed)
        {
            self.host.dialled_for[class.index()].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<S> Drop for CountedStream<S> {
    fn drop(&mut self) {
        if let Some(sniff) = self.sniff.take() {
            self.host.add(StreamClass::Other, sniff.pending);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountedStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.count(n, None);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountedStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.count(n, Some(&buf[..n.min(buf.len())]));
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Sniffed<'a> {
    /// The protocol this host proposed or accepted.
    Named(&'a [u8]),
    /// The negotiation goes on past these bytes.
    NotYet,
    /// Not a multistream-select negotiation.
    Garbled,
}

/// The first protocol name in `bytes`, the start of what a host wrote on a substream: messages
/// of an unsigned-varint length and a line, the `/multistream/1.0.0` header and `na` refusals
/// skipped.
fn protocol_of(bytes: &[u8]) -> Sniffed<'_> {
    let mut rest = bytes;
    loop {
        // Lengths in this negotiation fit in two varint bytes (the spec caps messages at 64 KiB,
        // three bytes); anything longer is not one.
        let mut len = 0usize;
        let mut used = 0;
        loop {
            let Some(&b) = rest.get(used) else {
                return Sniffed::NotYet;
            };
            len |= usize::from(b & 0x7f) << (7 * used);
            used += 1;
            if b & 0x80 == 0 {
                break;
            }
            if used == 3 {
                return Sniffed::Garbled;
            }
        }
        let Some(msg) = rest.get(used..used + len) else {
            return Sniffed::NotYet;
        };
        rest = &rest[used + len..];
        let Some(line) = msg.strip_suffix(b"\n") else {
            return Sniffed::Garbled;
        };
        if line == b"/multistream/1.0.0" || line == b"na" {
            continue;
        }
        return Sniffed::Named(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lines` as multistream-select writes them.
    fn negotiation(lines: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            let len = l.len() + 1;
            assert!(len < 128);
            out.push(len as u8);
            out.extend_from_slice(l.as_bytes());
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn the_protocol_is_read_from_the_negotiation_past_the_header_and_refusals() {
        let dialer = negotiation(&["/multistream/1.0.0", "/tidings/deliver/1"]);
        assert_eq!(protocol_of(&dialer), Sniffed::Named(&b"/tidings/deliver/1"[..]));
        let listener = negotiation(&["/multistream/1.0.0", "na", "/tidings/kad/1.0.0"]);
        assert_eq!(protocol_of(&listener), Sniffed::Named(&b"/tidings/kad/1.0.0"[..]));
        for cut in 0..dialer.len() {
            assert_eq!(protocol_of(&dialer[..cut]), Sniffed::NotYet, "{cut} bytes");
        }
        let mut with_data = dialer.clone();
        with_data.extend_from_slice(&[0xff; 40]);
        assert_eq!(protocol_of(&with_data), Sniffed::Named(&b"/tidings/deliver/1"[..]));
        assert_eq!(protocol_of(&[0xff, 0xff, 0xff, 0x01]), Sniffed::Garbled);
        assert_eq!(protocol_of(&[3, b'a', b'b', b'c']), Sniffed::Garbled, "no newline");
    }

    #[test]
    fn protocol_names_map_to_their_classes() {
        for (name, class) in [
            ("/tidings/kad/1.0.0", StreamClass::Kad),
            ("/tidings/deliver/1", StreamClass::Deliver),
            ("/tidings/mailbox/1", StreamClass::Mailbox),
            ("/tidings/keypackage/1", StreamClass::KeyPackage),
            ("/libp2p/circuit/relay/0.2.0/hop", StreamClass::Circuit),
            ("/libp2p/circuit/relay/0.2.0/stop", StreamClass::Circuit),
            ("/ipfs/id/1.0.0", StreamClass::Identify),
            ("/ipfs/id/push/1.0.0", StreamClass::Identify),
            ("/libp2p/autonat/2/dial-request", StreamClass::Autonat),
            ("/libp2p/autonat/2/dial-back", StreamClass::Autonat),
            ("/ipfs/ping/1.0.0", StreamClass::Ping),
            ("/tidings/link/1", StreamClass::Other),
        ] {
            assert_eq!(StreamClass::of_protocol(name.as_bytes()), class, "{name}");
        }
    }

    #[test]
    fn a_dial_counts_once_for_the_first_outbound_substream_that_is_not_upkeep() {
        let host = Arc::new(HostBytes::default());
        let dialled = CountingMuxer::new((), host.clone(), true);
        let accepted = CountingMuxer::new((), host.clone(), false);
        let open = |m: &CountingMuxer<()>, outbound: bool, protocol: &str| {
            let mut s = m.wrap((), outbound);
            let neg = negotiation(&["/multistream/1.0.0", protocol]);
            s.count(neg.len(), Some(&neg));
        };
        open(&dialled, true, "/ipfs/id/1.0.0");
        open(&dialled, false, "/tidings/mailbox/1");
        open(&accepted, true, "/tidings/deliver/1");
        assert_eq!(
            host.dialled_for(),
            [0; StreamClass::ALL.len()],
            "upkeep, inbound and accepted"
        );
        open(&dialled, true, "/tidings/kad/1.0.0");
        open(&dialled, true, "/tidings/mailbox/1");
        let mut want = [0; StreamClass::ALL.len()];
        want[StreamClass::Kad.index()] = 1;
        assert_eq!(host.dialled_for(), want);
        let mut opened = [0; StreamClass::ALL.len()];
        for class in [
            StreamClass::Identify,
            StreamClass::Deliver,
            StreamClass::Kad,
            StreamClass::Mailbox,
        ] {
            opened[class.index()] = 1;
        }
        assert_eq!(
            host.opened(),
            opened,
            "every substream the host opened, none it accepted"
        );
    }

    #[test]
    fn bytes_wait_for_the_name_and_a_stream_that_never_names_one_counts_as_other() {
        let host = Arc::new(HostBytes::default());
        let stream = |host: &Arc<HostBytes>| CountedStream {
            inner: (),
            host: host.clone(),
            class: None,
            sniff: None,
            purpose: None,
            outbound: false,
        };
        let mut s = stream(&host);
        s.count(30, None);
        let neg = negotiation(&["/multistream/1.0.0", "/tidings/mailbox/1"]);
        s.count(5, Some(&neg[..5]));
        assert_eq!(
            host.by_class(),
            [0; StreamClass::ALL.len()],
            "nothing counted before the name"
        );
        s.count(neg.len() - 5, Some(&neg[5..]));
        s.count(100, None);
        s.count(7, Some(&[0; 7]));
        let mailbox = StreamClass::Mailbox.index();
        assert_eq!(host.by_class()[mailbox], 30 + neg.len() as u64 + 107);
        drop(s);
        let mut s = stream(&host);
        s.count(12, None);
        s.count(4, Some(&negotiation(&["/mu"])[..4]));
        drop(s);
        assert_eq!(host.by_class()[StreamClass::Other.index()], 16);
        let mut s = stream(&host);
        s.count(SNIFF_CAP + 10, Some(&[1; SNIFF_CAP + 10]));
        assert_eq!(s.class, Some(StreamClass::Other), "a garbled start is not held");
    }
}
