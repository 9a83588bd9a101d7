//! Pings that start once a connection has lived for a ping interval.
//!
//! libp2p-ping (0.48) sends its first ping the moment a connection is up, from
//! both ends: each opens a substream, negotiates the protocol and exchanges a
//! ping. Nothing in Tidings reads the round trips; pings are there to keep
//! long-lived idle connections (to home relays, to a device in a
//! conversation) and their NAT mappings fresh. Most connections live for one
//! exchange (a DHT request, a deposit) and close at the idle timeout, before a
//! second ping would be due; their first ping was two of their five or so
//! substreams, and nothing was gained by it: the connection had just been made.
//!
//! [`PingLater`] wraps the ping behaviour and holds back its handler's
//! requests for an outbound substream until the connection is `first_after`
//! old. Inbound pings are answered as before, and once the first ping is out
//! the handler's own interval takes over. Only the side that dialled pings:
//! its pings and their answers keep the link fresh both ways, so the side
//! that accepted (a relay, for most of its connections) holds its request for
//! good and only answers.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::swarm::{ConnectionHandler, ConnectionHandlerEvent, SubstreamProtocol};
use tokio::time::{Instant, Sleep};

use super::wrap::{WrapHandler, Wrapped, pass_through_events, pass_through_handler};

/// `B` (the ping behaviour) whose connections open no substream of their own
/// before they are `first_after` old.
pub type PingLater<B> = Wrapped<B, FirstAfter>;

pub fn ping_later<B>(behaviour: B, first_after: Duration) -> PingLater<B> {
    Wrapped::new(behaviour, FirstAfter(first_after))
}

/// How old a connection must be before its handler opens a substream.
pub struct FirstAfter(Duration);

impl<H: ConnectionHandler> WrapHandler<H> for FirstAfter {
    type Handler = Handler<H>;

    fn wrap(&self, _: libp2p::swarm::ConnectionId, inner: H) -> Handler<H> {
        Handler {
            inner,
            quiet_until: Some(Instant::now() + self.0),
            held: None,
        }
    }

    /// The side that accepted a connection answers pings but sends none: the dialer's pings keep
    /// the link (and the NAT mapping in front of it) fresh for both, and a relay, which accepts
    /// most of its connections, pings half as much.
    fn wrap_inbound(&self, _: libp2p::swarm::ConnectionId, inner: H) -> Handler<H> {
        Handler {
            inner,
            quiet_until: None,
            held: None,
        }
    }
}

/// What a handler asks for to open an outbound substream.
type Outbound<H> =
    SubstreamProtocol<<H as ConnectionHandler>::OutboundProtocol, <H as ConnectionHandler>::OutboundOpenInfo>;

/// The timer that releases a held request; `None` if it is held for good.
type Release = Option<Pin<Box<Sleep>>>;

/// The connection handler of [`PingLater`].
pub struct Handler<H: ConnectionHandler> {
    inner: H,
    /// Until when outbound substream requests are held back; `None`: for good.
    quiet_until: Option<Instant>,
    /// A held request, and the timer that releases it (none if held for good).
    held: Option<(Outbound<H>, Release)>,
}

impl<H: ConnectionHandler> ConnectionHandler for Handler<H> {
    pass_through_handler!(H, inner);

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        if let Some((_, Some(timer))) = &mut self.held
            && timer.as_mut().poll(cx).is_ready()
            && let Some((protocol, _)) = self.held.take()
        {
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol });
        }
        loop {
            match self.inner.poll(cx) {
                Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol })
                    if self.quiet_until.is_none_or(|t| Instant::now() < t) =>
                {
                    // The inner handler waits for its stream meanwhile (it
                    // asks for one at a time), so at most one is ever held.
                    let Some(until) = self.quiet_until else {
                        self.held = Some((protocol, None));
                        continue;
                    };
                    let mut timer = Box::pin(tokio::time::sleep_until(until));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol });
                    }
                    self.held = Some((protocol, Some(timer)));
                }
                other => return other,
            }
        }
    }

    pass_through_events!(inner);
}
