//! The AutoNAT client, told only of the address candidates a dial-back can
//! test.
//!
//! Identify reports the address each peer sees us on, and libp2p hands every
//! such report to the AutoNAT client as a candidate external address. Over a
//! relayed connection that address is our circuit address
//! (`…/p2p/<relay>/p2p-circuit`) or a bare `/p2p/<our id>`. An AutoNAT v2
//! server makes the client send it 30 to 100 kB before it dials an address
//! other than the one it sees the client on, so each such candidate cost a
//! probe of that size, and the answer says nothing of our reachability: a
//! circuit address is reachable while its reservation lasts (the relay client
//! confirms it), a bare peer id names no transport.

use libp2p::core::Multiaddr;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{ConnectionHandler, FromSwarm};

use super::wrap::{WrapHandler, Wrapped};

/// `B` (the AutoNAT client) without the candidates a dial-back cannot test.
pub type DirectCandidates<B> = Wrapped<B, OnlyTestable>;

pub fn direct_candidates<B>(behaviour: B) -> DirectCandidates<B> {
    Wrapped::new(behaviour, OnlyTestable)
}

/// Keeps from the behaviour the candidates a dial-back cannot test; its
/// handlers are left as they are.
pub struct OnlyTestable;

impl<H: ConnectionHandler> WrapHandler<H> for OnlyTestable {
    type Handler = H;

    fn wrap(&self, _: libp2p::swarm::ConnectionId, handler: H) -> H {
        handler
    }

    fn passes(&self, event: &FromSwarm) -> bool {
        !matches!(event, FromSwarm::NewExternalAddrCandidate(c) if !testable(c.addr))
    }
}

/// Whether a dial-back to `addr` can tell if we are reachable there: it
/// names a transport and does not go through a relay.
pub(crate) fn testable(addr: &Multiaddr) -> bool {
    let mut transport = false;
    for p in addr.iter() {
        match p {
            Protocol::P2pCircuit => return false,
            Protocol::P2p(_) => {}
            _ => transport = true,
        }
    }
    transport
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll};

    use libp2p::PeerId;
    use libp2p::core::Endpoint;
    use libp2p::core::transport::PortUse;
    use libp2p::swarm::{
        ConnectionDenied, ConnectionId, NetworkBehaviour, NewExternalAddrCandidate, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm, dummy,
    };

    use super::*;

    /// Records the candidates it is told of.
    #[derive(Default)]
    struct Told(Vec<Multiaddr>);

    impl NetworkBehaviour for Told {
        type ConnectionHandler = dummy::ConnectionHandler;
        type ToSwarm = ();

        fn handle_established_inbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: &Multiaddr,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn handle_established_outbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: Endpoint,
            _: PortUse,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn on_swarm_event(&mut self, event: FromSwarm) {
            if let FromSwarm::NewExternalAddrCandidate(c) = event {
                self.0.push(c.addr.clone());
            }
        }

        fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, e: THandlerOutEvent<Self>) {
            match e {}
        }

        fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<(), THandlerInEvent<Self>>> {
            Poll::Pending
        }
    }

    #[test]
    fn the_client_is_told_only_of_candidates_a_dial_back_can_test() {
        let relay = "12D3KooWBwVVpZUC58yupBpthjkMosj8qU4d9oNEb3bGS8v4GLb3";
        let direct: Multiaddr = "/ip4/203.0.113.7/tcp/4001".parse().unwrap();
        let circuit: Multiaddr = format!("/ip4/198.51.100.1/tcp/4001/p2p/{relay}/p2p-circuit")
            .parse()
            .unwrap();
        let mut b = direct_candidates(Told::default());
        for addr in [&circuit, &direct] {
            b.on_swarm_event(FromSwarm::NewExternalAddrCandidate(NewExternalAddrCandidate { addr }));
        }
        assert_eq!(b.0, vec![direct]);
    }

    #[test]
    fn relayed_and_transportless_addresses_are_not_candidates() {
        let relay = "12D3KooWBwVVpZUC58yupBpthjkMosj8qU4d9oNEb3bGS8v4GLb3";
        let yes = [
            "/ip4/203.0.113.7/tcp/4001",
            "/ip6/2001:db8::1/udp/4001/quic-v1",
            "/memory/14",
        ];
        let no = [
            format!("/ip4/198.51.100.1/tcp/4001/p2p/{relay}/p2p-circuit"),
            format!("/memory/14/p2p/{relay}/p2p-circuit"),
            format!("/p2p/{relay}"),
        ];
        for a in yes {
            assert!(testable(&a.parse().unwrap()), "{a} can be dialled back");
        }
        for a in no {
            assert!(!testable(&a.parse().unwrap()), "{a} cannot");
        }
    }
}
