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
//! the handler's own interval takes over.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use tokio::time::{Instant, Sleep};

/// `B` (the ping behaviour) whose connections open no substream of their own
/// before they are `first_after` old.
pub struct PingLater<B> {
    inner: B,
    first_after: Duration,
}

impl<B> PingLater<B> {
    pub fn new(inner: B, first_after: Duration) -> Self {
        Self { inner, first_after }
    }

    fn wrap<H: ConnectionHandler>(&self, inner: H) -> Handler<H> {
        Handler {
            inner,
            quiet_until: Instant::now() + self.first_after,
            held: None,
        }
    }
}

/// What a handler asks for to open an outbound substream.
type Outbound<H> =
    SubstreamProtocol<<H as ConnectionHandler>::OutboundProtocol, <H as ConnectionHandler>::OutboundOpenInfo>;

/// The connection handler of [`PingLater`].
pub struct Handler<H: ConnectionHandler> {
    inner: H,
    /// Until when outbound substream requests are held back.
    quiet_until: Instant,
    /// A held request, and the timer that releases it.
    held: Option<(Outbound<H>, Pin<Box<Sleep>>)>,
}

impl<H: ConnectionHandler> ConnectionHandler for Handler<H> {
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        if let Some((_, timer)) = &mut self.held
            && timer.as_mut().poll(cx).is_ready()
            && let Some((protocol, _)) = self.held.take()
        {
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol });
        }
        loop {
            match self.inner.poll(cx) {
                Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol })
                    if Instant::now() < self.quiet_until =>
                {
                    // The inner handler waits for its stream meanwhile (it
                    // asks for one at a time), so at most one is ever held.
                    let mut timer = Box::pin(tokio::time::sleep_until(self.quiet_until));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest { protocol });
                    }
                    self.held = Some((protocol, timer));
                }
                other => return other,
            }
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.inner.on_behaviour_event(event)
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        self.inner.on_connection_event(event)
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for PingLater<B> {
    type ConnectionHandler = Handler<B::ConnectionHandler>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self
            .inner
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)?;
        Ok(self.wrap(inner))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(connection_id, maybe_peer, addresses, effective_role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner =
            self.inner
                .handle_established_outbound_connection(connection_id, peer, addr, role_override, port_use)?;
        Ok(self.wrap(inner))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer_id, connection_id, event)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}
