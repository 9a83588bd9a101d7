//! Keeps the connections that carry conversations open for a while after
//! their last use, so that the swarm's idle timeout can be short for all the
//! others (DHT lookups, identify, AutoNAT touch many peers once each).
//!
//! The event loop calls [`Behaviour::touch`] whenever it sends a request to a
//! peer or takes one from it; every connection to that peer then stays open
//! until the deadline, after which the swarm's idle timeout applies as usual.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::DeniedUpgrade;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use tokio::time::{Instant, Sleep};

/// Peers remembered at most; when full, the entries already past their
/// deadline are dropped first, then the one that ends soonest.
const MAX_PEERS: usize = 4096;

/// See the module documentation.
pub struct Behaviour {
    /// How long a use keeps the connections to a peer open.
    hold: Duration,
    until: HashMap<PeerId, Instant>,
    /// The open connections to each peer.
    conns: HashMap<PeerId, Vec<ConnectionId>>,
    /// Deadlines still to be passed to the handlers of open connections.
    pending: Vec<(PeerId, ConnectionId, Instant)>,
}

impl Behaviour {
    pub fn new(hold: Duration) -> Self {
        Self {
            hold,
            until: HashMap::new(),
            conns: HashMap::new(),
            pending: Vec::new(),
        }
    }

    /// The peer was just used: keep every connection to it open for `hold`.
    pub fn touch(&mut self, peer: PeerId) {
        if self.hold.is_zero() {
            return;
        }
        let now = Instant::now();
        let until = now + self.hold;
        if self.until.len() >= MAX_PEERS && !self.until.contains_key(&peer) {
            self.until.retain(|_, t| *t > now);
            if self.until.len() >= MAX_PEERS
                && let Some(soonest) = self.until.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p)
            {
                self.until.remove(&soonest);
            }
        }
        self.until.insert(peer, until);
        for c in self.conns.get(&peer).into_iter().flatten() {
            self.pending.push((peer, *c, until));
        }
    }

    /// Whether connections to `peer` are being held open now.
    #[cfg(test)]
    pub fn holds(&self, peer: &PeerId) -> bool {
        self.until.get(peer).is_some_and(|t| *t > Instant::now())
    }

    fn handler_for(&self, peer: &PeerId) -> Handler {
        Handler::new(self.until.get(peer).copied())
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler_for(&peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler_for(&peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => self.conns.entry(e.peer_id).or_default().push(e.connection_id),
            FromSwarm::ConnectionClosed(e) => {
                if let Some(list) = self.conns.get_mut(&e.peer_id) {
                    list.retain(|c| *c != e.connection_id);
                    if list.is_empty() {
                        self.conns.remove(&e.peer_id);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.pending.pop() {
            Some((peer_id, connection, until)) => Poll::Ready(ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(connection),
                event: until,
            }),
            None => Poll::Pending,
        }
    }
}

/// Keeps its connection alive until a deadline; speaks no protocol.
pub struct Handler {
    until: Option<Instant>,
    /// Wakes the connection at the deadline, so that the swarm sees it end.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Handler {
    fn new(until: Option<Instant>) -> Self {
        Self {
            until,
            timer: until.map(|t| Box::pin(tokio::time::sleep_until(t))),
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Instant;
    type ToBehaviour = Infallible;
    type InboundProtocol = DeniedUpgrade;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        SubstreamProtocol::new(DeniedUpgrade, ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.until.is_some_and(|t| t > Instant::now())
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        if let Some(timer) = self.timer.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            // Past the deadline: `connection_keep_alive` now says no, and the
            // swarm starts its idle countdown after this poll.
            self.timer = None;
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, until: Instant) {
        if self.until.is_some_and(|t| t >= until) {
            return;
        }
        self.until = Some(until);
        match self.timer.as_mut() {
            Some(timer) => timer.as_mut().reset(until),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(until))),
        }
    }

    fn on_connection_event(
        &mut self,
        _: ConnectionEvent<
            '_,
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
    }
}
