//! A behaviour with its connection handlers wrapped or some swarm events kept
//! from it, and nothing else changed.
//!
//! [`Wrapped`] passes every call of the swarm to the behaviour it holds, but
//! hands each new connection's handler to a [`WrapHandler`] and asks it which
//! swarm events to pass on: `boxed.rs` puts the composed handler in an
//! allocation of its own, `ping_later.rs` holds back the ping handler's first
//! substream, `candidates.rs` keeps some address candidates from the AutoNAT
//! client.

use std::ops::{Deref, DerefMut};
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};

/// The part of a `ConnectionHandler` impl that a handler wrapping one of type
/// `$inner`, held in `self.$field`, passes through unchanged: the associated
/// types, `listen_protocol`, `connection_keep_alive` and `poll_close`.
macro_rules! pass_through_handler {
    ($inner:ident, $field:tt) => {
        type FromBehaviour = $inner::FromBehaviour;
        type ToBehaviour = $inner::ToBehaviour;
        type InboundProtocol = $inner::InboundProtocol;
        type OutboundProtocol = $inner::OutboundProtocol;
        type InboundOpenInfo = $inner::InboundOpenInfo;
        type OutboundOpenInfo = $inner::OutboundOpenInfo;

        fn listen_protocol(&self) -> libp2p::swarm::SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
            self.$field.listen_protocol()
        }

        fn connection_keep_alive(&self) -> bool {
            self.$field.connection_keep_alive()
        }

        fn poll_close(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::ToBehaviour>> {
            self.$field.poll_close(cx)
        }
    };
}
pub(super) use pass_through_handler;

/// `on_behaviour_event` and `on_connection_event` of a handler that passes
/// both to the one it wraps, held in `self.$field`.
macro_rules! pass_through_events {
    ($field:tt) => {
        fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
            self.$field.on_behaviour_event(event)
        }

        fn on_connection_event(
            &mut self,
            event: libp2p::swarm::handler::ConnectionEvent<
                Self::InboundProtocol,
                Self::OutboundProtocol,
                Self::InboundOpenInfo,
                Self::OutboundOpenInfo,
            >,
        ) {
            self.$field.on_connection_event(event)
        }
    };
}
pub(super) use pass_through_events;

/// Turns a behaviour's connection handler into the one the swarm runs, and
/// says which swarm events reach the behaviour.
pub trait WrapHandler<H: ConnectionHandler> {
    /// The wrapped handler: the same events in and out.
    type Handler: ConnectionHandler<FromBehaviour = H::FromBehaviour, ToBehaviour = H::ToBehaviour>;

    fn wrap(&self, connection: ConnectionId, handler: H) -> Self::Handler;

    /// The handler of a connection the remote dialled; as [`WrapHandler::wrap`] by default.
    fn wrap_inbound(&self, connection: ConnectionId, handler: H) -> Self::Handler {
        self.wrap(connection, handler)
    }

    /// Whether the behaviour is told of `event`; all by default.
    fn passes(&self, event: &FromSwarm) -> bool {
        let _ = event;
        true
    }
}

/// `B` whose connection handlers `W` wraps; dereferences to `B`.
pub struct Wrapped<B, W> {
    behaviour: B,
    wrapper: W,
}

impl<B, W> Wrapped<B, W> {
    pub fn new(behaviour: B, wrapper: W) -> Self {
        Self { behaviour, wrapper }
    }
}

impl<B, W> Deref for Wrapped<B, W> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.behaviour
    }
}

impl<B, W> DerefMut for Wrapped<B, W> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.behaviour
    }
}

impl<B, W> NetworkBehaviour for Wrapped<B, W>
where
    B: NetworkBehaviour,
    W: WrapHandler<B::ConnectionHandler> + 'static,
{
    type ConnectionHandler = W::Handler;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.behaviour
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let handler =
            self.behaviour
                .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)?;
        Ok(self.wrapper.wrap_inbound(connection_id, handler))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.behaviour
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
        let handler = self.behaviour.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        Ok(self.wrapper.wrap(connection_id, handler))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if self.wrapper.passes(&event) {
            self.behaviour.on_swarm_event(event)
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.behaviour
            .on_connection_handler_event(peer_id, connection_id, event)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.behaviour.poll(cx)
    }
}
