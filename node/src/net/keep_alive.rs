//! Which connections outlive the swarm's short idle timeout.
//!
//! Most connections serve one exchange: a DHT lookup that dials a few
//! servers, a deposit on someone else's relay, an AutoNAT probe. They close
//! once the swarm's idle timeout has passed with no stream open. A connection
//! to a device we are in a conversation with is worth keeping for longer: the
//! next message would otherwise dial again, and behind a NAT that means a
//! circuit and a hole punch. [`KeepAlive::keep`] marks a peer; every
//! connection to it, open or opened later, stays up until the mark runs out.
//! Home relays need no mark: the circuit reservation keeps those connections.
//!
//! A connection notices that nothing keeps it any more only when its task
//! runs, and a keep-alive that lapses by time alone wakes nothing: a mark
//! running out, or libp2p-relay's server, which keeps every connection it
//! serves for [`RELAY_IDLE_GRACE`] after its last reservation without setting
//! a timer for it. Left alone, such a connection waited for its next ping (a
//! minute) before its idle timeout even started, so a relay held every
//! connection a DHT lookup or a deposit had opened three times as long as the
//! idle timeout says (SIMULATOR.md, "2026-12-02 (evening)"). [`Handler`] wakes
//! its connection when either has lapsed.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use tokio::time::{Instant, Sleep};

/// Most peers marked at once; past it, marks that ran out are forgotten, and
/// if none did, the new mark is not kept (its connections fall back to the
/// idle timeout).
const MAX_MARKED: usize = 4096;

/// How long libp2p-relay's server (0.22, `behaviour::handler`) keeps a
/// connection alive after its first poll with no reservation on it.
pub const RELAY_IDLE_GRACE: Duration = Duration::from_secs(10);

/// The wake-up for the relay's grace comes this long after it, so that the
/// grace has surely lapsed when the connection looks.
const WAKE_MARGIN: Duration = Duration::from_millis(500);

/// Keeps connections to marked peers open until their mark runs out.
#[derive(Default)]
pub struct KeepAlive {
    until: HashMap<PeerId, Instant>,
    /// The open connections of each peer, to pass a new mark to.
    connections: HashMap<PeerId, Vec<ConnectionId>>,
    /// Marks to pass to open connections.
    pending: VecDeque<(PeerId, ConnectionId, Instant)>,
}

impl KeepAlive {
    /// Keeps every connection to `peer` open for at least `period` from now.
    pub fn keep(&mut self, peer: PeerId, period: Duration) {
        let now = Instant::now();
        let until = now + period;
        if self.until.len() >= MAX_MARKED && !self.until.contains_key(&peer) {
            self.until.retain(|_, u| *u > now);
            if self.until.len() >= MAX_MARKED {
                return;
            }
        }
        let entry = self.until.entry(peer).or_insert(until);
        *entry = (*entry).max(until);
        let until = *entry;
        for id in self.connections.get(&peer).into_iter().flatten() {
            if self.pending.len() < MAX_MARKED {
                self.pending.push_back((peer, *id, until));
            }
        }
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler::new(self.until.get(&peer).copied(), Instant::now())
    }
}

impl NetworkBehaviour for KeepAlive {
    type ConnectionHandler = Handler;
    type ToSwarm = std::convert::Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(c) => {
                self.connections.entry(c.peer_id).or_default().push(c.connection_id);
            }
            FromSwarm::ConnectionClosed(c) => {
                if let Some(ids) = self.connections.get_mut(&c.peer_id) {
                    ids.retain(|id| *id != c.connection_id);
                    if ids.is_empty() {
                        self.connections.remove(&c.peer_id);
                    }
                }
                if c.remaining_established == 0 && self.until.get(&c.peer_id).is_some_and(|u| *u <= Instant::now()) {
                    self.until.remove(&c.peer_id);
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.pending.pop_front() {
            Some((peer_id, id, until)) => Poll::Ready(ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(id),
                event: until,
            }),
            None => Poll::Pending,
        }
    }
}

/// A connection's side of [`KeepAlive`]: the mark of its peer, if any, and a
/// timer that wakes the connection when a keep-alive by time has lapsed.
pub struct Handler {
    until: Option<Instant>,
    /// Fires at the later of the relay's grace and the mark; gone once fired.
    wake: Option<Pin<Box<Sleep>>>,
}

impl Handler {
    fn new(until: Option<Instant>, now: Instant) -> Self {
        let grace = now + RELAY_IDLE_GRACE + WAKE_MARGIN;
        let at = until.map_or(grace, |u| u.max(grace));
        Self {
            until,
            wake: Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// The wake-up moves to `at` if that is later (or comes back, if it fired).
    fn wake_at(&mut self, at: Instant) {
        match &mut self.wake {
            Some(w) if w.deadline() >= at => {}
            Some(w) => w.as_mut().reset(at),
            None => self.wake = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Instant;
    type ToBehaviour = std::convert::Infallible;
    type InboundProtocol = libp2p::core::upgrade::DeniedUpgrade;
    type OutboundProtocol = libp2p::core::upgrade::DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(libp2p::core::upgrade::DeniedUpgrade, ())
    }

    /// Read whenever the connection's task runs; the timer in [`Handler::poll`]
    /// makes it run once the mark has run out, which starts the idle timeout.
    fn connection_keep_alive(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() < u)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        // Firing is all the timer is for: this poll is part of the connection's, which then
        // finds whether anything still keeps it.
        if let Some(w) = &mut self.wake
            && w.as_mut().poll(cx).is_ready()
        {
            self.wake = None;
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, until: Instant) {
        let until = self.until.map_or(until, |u| u.max(until));
        self.until = Some(until);
        self.wake_at(until);
    }

    fn on_connection_event(&mut self, _: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>) {}
}
