//! Circuit dials that wait for their relay's connection.
//!
//! libp2p's relay client asks for a circuit over an open connection to the
//! relay; without one it dials the relay itself, on the condition that the
//! relay is "disconnected and not being dialled". So a circuit dialled while
//! some other part of the node (a deposit, a lookup, a reservation) is still
//! dialling the same relay is dropped at once ("ResponseFromBehaviourCanceled")
//! and the device behind it is not reached.
//!
//! [`CircuitsWaiting`] holds such a dial instead: the network task dials the
//! relay (or lets the dial already under way go on) and dials the waiting
//! circuits once a connection to the relay is established. A circuit waits at
//! most [`CIRCUIT_WAIT`]; if no connection to its relay comes by then, it is
//! dropped, as a failed dial would have been. Both the relays and the circuits
//! per relay are bounded.

use std::collections::HashMap;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::time::Instant;

/// How long a circuit waits for a connection to its relay.
pub const CIRCUIT_WAIT: Duration = Duration::from_secs(30);
/// Relays with circuits waiting, at most.
const MAX_RELAYS: usize = 256;
/// Circuits waiting on one relay, at most.
const MAX_PER_RELAY: usize = 64;

/// The relay part of a circuit address: `<relay addr>/p2p/<relay>` of
/// `<relay addr>/p2p/<relay>/p2p-circuit/p2p/<device>`, or `None` if `addr`
/// is not a circuit through a named relay.
pub fn relay_of(addr: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    if !addr.iter().any(|p| p == Protocol::P2pCircuit) {
        return None;
    }
    let relay: Multiaddr = addr.iter().take_while(|p| *p != Protocol::P2pCircuit).collect();
    Some((super::peer_of(&relay)?, relay))
}

/// Circuit dials waiting for a connection to their relay, by relay.
#[derive(Debug, Default)]
pub struct CircuitsWaiting {
    by_relay: HashMap<PeerId, Vec<(Instant, Multiaddr)>>,
}

impl CircuitsWaiting {
    /// Holds `circuit` until a connection to `relay` is up. Returns `false`
    /// when it was not held because too many already wait.
    pub fn hold(&mut self, relay: PeerId, circuit: Multiaddr, now: Instant) -> bool {
        self.expire(now);
        if !self.by_relay.contains_key(&relay) && self.by_relay.len() >= MAX_RELAYS {
            return false;
        }
        let waiting = self.by_relay.entry(relay).or_default();
        if waiting.iter().any(|(_, c)| *c == circuit) {
            return true;
        }
        if waiting.len() >= MAX_PER_RELAY {
            return false;
        }
        waiting.push((now, circuit));
        true
    }

    /// The circuits waiting on `relay`, now that a connection to it is up.
    pub fn take(&mut self, relay: &PeerId, now: Instant) -> Vec<Multiaddr> {
        self.expire(now);
        self.by_relay
            .remove(relay)
            .map(|w| w.into_iter().map(|(_, c)| c).collect())
            .unwrap_or_default()
    }

    /// How many circuits wait.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_relay.values().map(Vec::len).sum()
    }

    fn expire(&mut self, now: Instant) {
        self.by_relay.retain(|_, waiting| {
            waiting.retain(|(since, _)| now.saturating_duration_since(*since) < CIRCUIT_WAIT);
            !waiting.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit(relay: PeerId, device: PeerId) -> Multiaddr {
        format!("/memory/7/p2p/{relay}/p2p-circuit/p2p/{device}")
            .parse()
            .unwrap()
    }

    #[test]
    fn the_relay_of_a_circuit_is_its_address_up_to_the_circuit() {
        let (relay, device) = (PeerId::random(), PeerId::random());
        let (peer, addr) = relay_of(&circuit(relay, device)).unwrap();
        assert_eq!(peer, relay);
        assert_eq!(addr, format!("/memory/7/p2p/{relay}").parse::<Multiaddr>().unwrap());
        let direct: Multiaddr = format!("/memory/7/p2p/{device}").parse().unwrap();
        assert_eq!(relay_of(&direct), None, "a direct address is no circuit");
        let unnamed: Multiaddr = format!("/memory/7/p2p-circuit/p2p/{device}").parse().unwrap();
        assert_eq!(relay_of(&unnamed), None, "a circuit needs its relay's id");
    }

    #[tokio::test(start_paused = true)]
    async fn circuits_wait_for_their_relay_once_each_and_not_past_the_wait() {
        let mut w = CircuitsWaiting::default();
        let (r1, r2, d) = (PeerId::random(), PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        assert!(w.hold(r1, circuit(r1, d), t0));
        assert!(w.hold(r1, circuit(r1, d), t0), "the same circuit again");
        assert!(w.hold(r2, circuit(r2, d), t0 + Duration::from_secs(20)));
        assert_eq!(w.len(), 2);
        assert_eq!(w.take(&r1, t0 + Duration::from_secs(1)), vec![circuit(r1, d)]);
        assert!(w.take(&r1, t0 + Duration::from_secs(1)).is_empty(), "taken once");
        assert!(
            w.take(&r2, t0 + Duration::from_secs(20) + CIRCUIT_WAIT).is_empty(),
            "dropped after the wait"
        );
        assert_eq!(w.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuits_held_are_bounded() {
        let mut w = CircuitsWaiting::default();
        let t0 = Instant::now();
        let relay = PeerId::random();
        for _ in 0..MAX_PER_RELAY {
            assert!(w.hold(relay, circuit(relay, PeerId::random()), t0));
        }
        assert!(
            !w.hold(relay, circuit(relay, PeerId::random()), t0),
            "one relay's share is full"
        );
        for _ in 1..MAX_RELAYS {
            let r = PeerId::random();
            assert!(w.hold(r, circuit(r, PeerId::random()), t0));
        }
        let r = PeerId::random();
        assert!(
            !w.hold(r, circuit(r, PeerId::random()), t0),
            "no room for another relay"
        );
        assert_eq!(w.len(), MAX_PER_RELAY + MAX_RELAYS - 1);
    }
}
