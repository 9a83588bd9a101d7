//! The dials a behaviour asked for that have not ended, so that those no
//! one waits for any longer can be called off.
//!
//! libp2p-kad (0.49) dials a peer a lookup wants to ask that is not
//! connected, and keeps the request until the connection is up. A lookup
//! that ends first (it found its record, or the closest peers all answered)
//! forgets the request, but the dial goes on: the connection is made, runs
//! identify and AutoNAT, carries nothing and closes at the idle timeout. In
//! the simulator (1,000 nodes, 10 minutes) half of the clients' lookup dials
//! ended that way. [`DialsInFlight`] wraps the DHT behaviour and records the
//! dials it asks for until each is established or fails; the node calls off
//! those only it waits for once it has no lookup running
//! ([`DialsInFlight::only_ours`]).
//!
//! A dial is shared, and never called off, if anyone else dialled the same
//! peer while it was pending: another behaviour's dial refused because this
//! one was under way (that behaviour's requests wait for this connection),
//! or a dial of its own still pending (calling off a peer's dials calls off
//! them all).

use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, DialError, DialFailure, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};

/// `B`, and the dials it asked for that are still pending.
pub struct DialsInFlight<B> {
    inner: B,
    /// `B`'s pending dials.
    own: HashMap<ConnectionId, PeerId>,
    /// Peers that `B` is dialling whose dial another's dial, refused, waits for.
    shared: HashSet<PeerId>,
    /// Others' pending dials of peers that `B` is dialling too.
    others: HashMap<ConnectionId, PeerId>,
}

impl<B> DialsInFlight<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            own: HashMap::new(),
            shared: HashSet::new(),
            others: HashMap::new(),
        }
    }

    /// The peers whose pending dials `B` asked for and no one else waits for.
    pub fn only_ours(&self) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = self
            .own
            .values()
            .filter(|p| !self.shared.contains(*p) && !self.others.values().any(|o| o == *p))
            .copied()
            .collect();
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    fn dialling(&self, peer: &PeerId) -> bool {
        self.own.values().any(|p| p == peer)
    }

    /// Forgets a dial that ended, `B`'s or another's.
    fn ended(&mut self, connection: ConnectionId) {
        if let Some(peer) = self.own.remove(&connection)
            && !self.dialling(&peer)
        {
            self.shared.remove(&peer);
        }
        self.others.remove(&connection);
    }
}

impl<B> Deref for DialsInFlight<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B> DerefMut for DialsInFlight<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for DialsInFlight<B> {
    type ConnectionHandler = B::ConnectionHandler;
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
        self.inner
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(peer) = maybe_peer
            && !self.own.contains_key(&connection_id)
            && self.dialling(&peer)
        {
            self.others.insert(connection_id, peer);
        }
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
        self.inner
            .handle_established_outbound_connection(connection_id, peer, addr, role_override, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match &event {
            FromSwarm::ConnectionEstablished(e) => self.ended(e.connection_id),
            FromSwarm::DialFailure(DialFailure {
                peer_id,
                error,
                connection_id,
            }) => {
                if let DialError::DialPeerConditionFalse(_) = error
                    && let Some(peer) = peer_id
                    && !self.own.contains_key(connection_id)
                    && self.dialling(peer)
                {
                    // Refused because ours was under way: its dialler waits for ours.
                    self.shared.insert(*peer);
                }
                self.ended(*connection_id);
            }
            _ => {}
        }
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
        let polled = self.inner.poll(cx);
        if let Poll::Ready(ToSwarm::Dial { opts }) = &polled
            && let Some(peer) = opts.get_peer_id()
        {
            self.own.insert(opts.connection_id(), peer);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::time::Duration;

    use futures::StreamExt;
    use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
    use libp2p::swarm::{SwarmEvent, dummy};
    use libp2p::{Swarm, SwarmBuilder, noise, tcp, yamux};

    use super::*;

    /// Dials the peers it is given, as the DHT behaviour does for a lookup.
    #[derive(Default)]
    struct Dialer(VecDeque<(PeerId, Multiaddr)>);

    impl NetworkBehaviour for Dialer {
        type ConnectionHandler = dummy::ConnectionHandler;
        type ToSwarm = Infallible;

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

        fn on_swarm_event(&mut self, _: FromSwarm) {}

        fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, e: THandlerOutEvent<Self>) {
            match e {}
        }

        fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
            match self.0.pop_front() {
                Some((peer, addr)) => Poll::Ready(ToSwarm::Dial {
                    opts: DialOpts::peer_id(peer).addresses(vec![addr]).build(),
                }),
                None => Poll::Pending,
            }
        }
    }

    fn swarm() -> Swarm<DialsInFlight<Dialer>> {
        SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
            .expect("tcp transport")
            .with_behaviour(|_| DialsInFlight::new(Dialer::default()))
            .expect("behaviour")
            .build()
    }

    /// A TCP listener that accepts connections and never answers on them, so
    /// that a dial to it stays pending in the security handshake.
    async fn silent_listener() -> Multiaddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("multiaddr")
    }

    /// Drives the swarm until `done` holds of it or of an event it yields.
    async fn drive(
        swarm: &mut Swarm<DialsInFlight<Dialer>>,
        mut done: impl FnMut(&Swarm<DialsInFlight<Dialer>>, Option<&SwarmEvent<Infallible>>) -> bool,
    ) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if done(swarm, None) {
                    return;
                }
                tokio::select! {
                    ev = swarm.select_next_some() => if done(swarm, Some(&ev)) { return },
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
        .await
        .expect("the swarm got there in time");
    }

    #[tokio::test]
    async fn a_dial_only_the_behaviour_waits_for_is_listed_and_can_be_called_off() {
        let mut swarm = swarm();
        let peer = PeerId::random();
        let addr = silent_listener().await;
        swarm.behaviour_mut().0.push_back((peer, addr));
        drive(&mut swarm, |s, _| s.behaviour().only_ours() == vec![peer]).await;
        assert!(!swarm.is_connected(&peer));

        let _ = swarm.disconnect_peer_id(peer);
        let mut aborted = false;
        drive(&mut swarm, |_, ev| {
            if let Some(SwarmEvent::OutgoingConnectionError { peer_id, error, .. }) = ev {
                aborted = *peer_id == Some(peer) && matches!(error, DialError::Aborted);
                return true;
            }
            false
        })
        .await;
        assert!(aborted, "the pending dial ended as called off");
        assert!(swarm.behaviour().only_ours().is_empty());
        assert!(swarm.behaviour().own.is_empty());
    }

    #[tokio::test]
    async fn a_dial_someone_else_waits_for_is_not_listed() {
        // Another dial of the peer, refused because the behaviour's is under way: its maker waits
        // for the behaviour's connection.
        let mut swarm = swarm();
        let peer = PeerId::random();
        let addr = silent_listener().await;
        swarm.behaviour_mut().0.push_back((peer, addr.clone()));
        drive(&mut swarm, |s, _| !s.behaviour().only_ours().is_empty()).await;
        let refused = swarm.dial(
            DialOpts::peer_id(peer)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build(),
        );
        assert!(matches!(refused, Err(DialError::DialPeerConditionFalse(_))));
        assert!(swarm.behaviour().only_ours().is_empty());
        assert!(swarm.behaviour().own.values().any(|p| *p == peer), "still pending");

        // A second dial of its own, made anyway: calling off the peer's dials would call it off too.
        let mut swarm = self::swarm();
        swarm.behaviour_mut().0.push_back((peer, addr.clone()));
        drive(&mut swarm, |s, _| !s.behaviour().only_ours().is_empty()).await;
        swarm
            .dial(
                DialOpts::peer_id(peer)
                    .addresses(vec![addr])
                    .condition(PeerCondition::Always)
                    .build(),
            )
            .expect("dialled");
        assert!(swarm.behaviour().only_ours().is_empty());
        // Both end once called off, and nothing is left behind.
        let _ = swarm.disconnect_peer_id(peer);
        let mut ended = 0;
        drive(&mut swarm, |_, ev| {
            if let Some(SwarmEvent::OutgoingConnectionError { .. }) = ev {
                ended += 1;
            }
            ended == 2
        })
        .await;
        assert!(swarm.behaviour().own.is_empty());
        assert!(swarm.behaviour().others.is_empty());
        assert!(swarm.behaviour().shared.is_empty());
    }
}
