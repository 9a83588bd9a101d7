//! A behaviour whose per-connection handler lives in its own allocation.
//!
//! libp2p keeps every connection in a task whose future holds the connection
//! handler, and the compiler lays that future out with room for the handler
//! in more than one of its states (the `async fn` arguments and the values it
//! moves them into). With a dozen protocols composed, the handler is several
//! kilobytes, so each connection paid for it two or three times over. Boxing
//! the handler leaves one copy on the heap and a pointer in each state: a
//! relay holding hundreds of connections, or a simulated world of thousands
//! of nodes, holds correspondingly less memory.

use std::task::{Context, Poll};

use libp2p::swarm::{ConnectionHandler, ConnectionHandlerEvent};

use super::wrap::{WrapHandler, Wrapped, pass_through_events, pass_through_handler};

/// `B` with its connection handler boxed; dereferences to `B`.
pub type Boxed<B> = Wrapped<B, Boxing>;

pub fn boxed<B>(behaviour: B) -> Boxed<B> {
    Wrapped::new(behaviour, Boxing)
}

/// Puts each connection's handler in a [`BoxedHandler`].
pub struct Boxing;

impl<H: ConnectionHandler> WrapHandler<H> for Boxing {
    type Handler = BoxedHandler<H>;

    fn wrap(&self, _: libp2p::swarm::ConnectionId, handler: H) -> BoxedHandler<H> {
        BoxedHandler(Box::new(handler))
    }
}

/// The connection handler of [`Boxed`].
pub struct BoxedHandler<H>(Box<H>);

impl<H: ConnectionHandler> ConnectionHandler for BoxedHandler<H> {
    pass_through_handler!(H, 0);

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        self.0.poll(cx)
    }

    pass_through_events!(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boxed_handler_is_one_pointer_whatever_it_wraps() {
        type Inner = <crate::net::Behaviour as libp2p::swarm::NetworkBehaviour>::ConnectionHandler;
        assert!(std::mem::size_of::<Inner>() > 1024);
        assert_eq!(std::mem::size_of::<BoxedHandler<Inner>>(), std::mem::size_of::<usize>());
    }
}
