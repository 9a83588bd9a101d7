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

use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};

/// `B` (the AutoNAT client) without the candidates a dial-back cannot test.
pub struct DirectCandidates<B>(pub B);

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

impl<B: NetworkBehaviour> NetworkBehaviour for DirectCandidates<B> {
    type ConnectionHandler = B::ConnectionHandler;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.0
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.0
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
        self.0
            .handle_established_outbound_connection(connection_id, peer, addr, role_override, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::NewExternalAddrCandidate(c) = &event
            && !testable(c.addr)
        {
            return;
        }
        self.0.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.0.on_connection_handler_event(peer_id, connection_id, event)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.0.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use libp2p::swarm::{NewExternalAddrCandidate, dummy};

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
        let mut b = DirectCandidates(Told::default());
        for addr in [&circuit, &direct] {
            b.on_swarm_event(FromSwarm::NewExternalAddrCandidate(NewExternalAddrCandidate { addr }));
        }
        assert_eq!(b.0.0, vec![direct]);
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
