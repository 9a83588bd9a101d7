//! Connection handlers polled only when something happened to them.
//!
//! libp2p's connection task polls the whole composed handler, every protocol's
//! handler in turn, whenever anything on the connection wakes it: a yamux
//! frame, a substream's negotiation, any one handler's timer. Most of those
//! handlers have nothing to do then, but each still looks at all it holds:
//! request-response's handler alone polls a channel and two sets of futures,
//! and a node runs four of them. In a profile of a thousand simulated nodes
//! request-response took 8.7% of all CPU, half of it in its handlers' polls
//! (SIMULATOR.md, "2026-12-04 (evening)").
//!
//! [`WhenWoken`] wraps a behaviour's handler so that it is polled only when it
//! may have work: after its own futures woke it (it is polled with a waker of
//! its own, which marks it and wakes the connection task), after the swarm
//! handed it an event (from its behaviour, or a substream, an address or a
//! protocol change), and again after a poll that returned an event. Otherwise
//! a poll returns `Pending` at once. A handler that needs polling without
//! having been woken would stall on an idle connection anyway, so this relies
//! only on the contract of `Future`s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{ConnectionHandler, ConnectionHandlerEvent, ConnectionId};

use super::wrap::{WrapHandler, Wrapped, pass_through_events, pass_through_handler};

/// `B` whose connection handlers are polled only when woken.
pub type WhenWoken<B> = Wrapped<B, Woken>;

pub fn when_woken<B>(behaviour: B, wakes: &Wakes) -> WhenWoken<B> {
    Wrapped::new(behaviour, wakes.wrapper(true))
}

/// `B`, the behaviour all of whose [`WhenWoken`] parts share `wakes`: its
/// handler registers the connection task's waker for them all, once per poll.
/// Each of those handlers registered it at each of its polls: a dozen
/// registrations of the same waker per poll of a connection (in a profile of
/// a thousand simulated nodes, `AtomicWaker::register` took 3% of the CPU).
pub type Rooted<B> = Wrapped<B, Root>;

pub fn rooted<B>(behaviour: B, wakes: &Wakes) -> Rooted<B> {
    Wrapped::new(behaviour, Root::new(wakes))
}

/// [`when_woken`], and the behaviour is not told of peers' addresses
/// (`FromSwarm::NewExternalAddrOfPeer`). Each request-response behaviour keeps
/// its own cache of them, fed by every address identify, the DHT's answers and
/// the node report, and offers it when the swarm dials a peer; the swarm asks
/// every behaviour for addresses at each dial, so one such cache among a
/// node's four request-response behaviours offers what four did. In a profile
/// of a thousand simulated nodes, the four caches' upkeep took 2.3% of the CPU
/// (SIMULATOR.md, "2026-12-05 (evening)").
pub fn when_woken_without_peer_addresses<B>(behaviour: B, wakes: &Wakes) -> WhenWoken<B> {
    Wrapped::new(behaviour, wakes.wrapper(false))
}

/// The wrapper of [`WhenWoken`].
pub struct Woken {
    /// Whether the behaviour is told of peers' addresses.
    peer_addresses: bool,
    wakes: Wakes,
}

impl<H: ConnectionHandler> WrapHandler<H> for Woken {
    type Handler = Handler<H>;

    fn passes(&self, event: &libp2p::swarm::FromSwarm) -> bool {
        self.peer_addresses || !matches!(event, libp2p::swarm::FromSwarm::NewExternalAddrOfPeer(_))
    }

    fn wrap(&self, connection: ConnectionId, inner: H) -> Handler<H> {
        let (flags, bit, register) = self.wakes.flags(connection, false);
        flags.woken.fetch_or(bit, Ordering::Relaxed);
        Handler {
            register,
            inner,
            waker: Waker::from(Arc::new(BitWaker {
                flags: flags.clone(),
                bit,
            })),
            flags,
            bit,
        }
    }
}

/// What the [`WhenWoken`] behaviours of one swarm share: the wake flags of
/// each connection whose handlers are being made. A connection's handlers
/// share one word of flags, a bit each, and one slot for the connection
/// task's waker: a poll of the connection looks at one cache line rather
/// than one allocation per handler (in a profile of a thousand simulated
/// nodes, the handlers' registrations of the task's waker took 3% of the
/// CPU, `AtomicWaker::register` called from their polls).
#[derive(Clone, Default)]
pub struct Wakes(Arc<Mutex<WakesInner>>);

#[derive(Default)]
struct WakesInner {
    /// How many wrappers share this (one handler each per connection), the
    /// [`Root`] among them.
    wrappers: u32,
    /// Whether a [`Root`] registers the task's waker for the handlers.
    rooted: bool,
    /// Connections some of whose handlers are made: their flags and the
    /// handlers made so far. An entry goes once every wrapper has made its
    /// handler.
    making: HashMap<ConnectionId, (Arc<ConnectionFlags>, u32)>,
}

/// Connections a swarm makes handlers for at once, past which entries whose
/// handlers are all gone (a connection another behaviour refused) are
/// dropped.
const MAKING_PRUNE: usize = 64;

impl Wakes {
    fn wrapper(&self, peer_addresses: bool) -> Woken {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.wrappers += 1;
        Woken {
            peer_addresses,
            wakes: self.clone(),
        }
    }

    /// The flags of `connection`, the bit of the next handler made for it, and
    /// whether that handler registers the task's waker itself (none for the
    /// root's handler, which needs no bit and registers for the others).
    fn flags(&self, connection: ConnectionId, root: bool) -> (Arc<ConnectionFlags>, u32, bool) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let wrappers = inner.wrappers;
        if inner.making.len() >= MAKING_PRUNE && !inner.making.contains_key(&connection) {
            inner.making.retain(|_, (flags, _)| Arc::strong_count(flags) > 1);
        }
        let (flags, made) = inner.making.entry(connection).or_default();
        let (flags, index) = (flags.clone(), *made);
        *made += 1;
        if *made >= wrappers {
            inner.making.remove(&connection);
        }
        if root {
            return (flags, 0, false);
        }
        if index >= u32::BITS {
            // More wrappers than bits: this handler gets a word of its own,
            // and registers the task's waker in it itself.
            return (Arc::default(), 1, true);
        }
        (flags, 1 << index, !inner.rooted)
    }
}

/// Which handlers of a connection were woken since their last poll (a bit
/// each), and the connection task's waker to pass a wake on to.
#[derive(Default)]
struct ConnectionFlags {
    woken: AtomicU32,
    task: AtomicWaker,
}

/// The waker one handler is polled with: it sets the handler's bit.
struct BitWaker {
    flags: Arc<ConnectionFlags>,
    bit: u32,
}

impl Wake for BitWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.flags.woken.fetch_or(self.bit, Ordering::Release);
        self.flags.task.wake();
    }
}

/// Registers the connection task's waker for the [`WhenWoken`] handlers
/// within.
pub struct Root {
    wakes: Wakes,
}

impl Root {
    fn new(wakes: &Wakes) -> Root {
        let mut inner = wakes.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.wrappers += 1;
        inner.rooted = true;
        Root { wakes: wakes.clone() }
    }
}

impl<H: ConnectionHandler> WrapHandler<H> for Root {
    type Handler = RootHandler<H>;

    fn wrap(&self, connection: ConnectionId, inner: H) -> RootHandler<H> {
        let (flags, _, _) = self.wakes.flags(connection, true);
        RootHandler { inner, flags }
    }
}

/// The connection handler of [`Rooted`].
pub struct RootHandler<H> {
    inner: H,
    flags: Arc<ConnectionFlags>,
}

impl<H: ConnectionHandler> ConnectionHandler for RootHandler<H> {
    pass_through_handler!(H, inner);

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        // Before any handler within reads its flag: a wake after the read
        // reaches the waker the task polls with now.
        self.flags.task.register(cx.waker());
        self.inner.poll(cx)
    }

    pass_through_events!(inner);
}

/// The connection handler of [`WhenWoken`].
pub struct Handler<H> {
    inner: H,
    flags: Arc<ConnectionFlags>,
    /// This handler's bit in `flags`.
    bit: u32,
    /// The waker the inner handler is polled with: it sets `bit`.
    waker: Waker,
    /// Whether its poll registers the task's waker: unless a [`Root`] does.
    register: bool,
}

impl<H> Handler<H> {
    fn mark(&self) {
        self.flags.woken.fetch_or(self.bit, Ordering::Relaxed);
    }
}

impl<H: ConnectionHandler> ConnectionHandler for Handler<H> {
    pass_through_handler!(H, inner);

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        // Registered before the flag is read: a wake that comes after the
        // read reaches the waker the task polls with now.
        if self.register {
            self.flags.task.register(cx.waker());
        }
        if self.flags.woken.load(Ordering::Acquire) & self.bit == 0
            || self.flags.woken.fetch_and(!self.bit, Ordering::AcqRel) & self.bit == 0
        {
            return Poll::Pending;
        }
        let polled = self.inner.poll(&mut Context::from_waker(&self.waker));
        if polled.is_ready() {
            // It may hold more.
            self.mark();
        }
        polled
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.mark();
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
        self.mark();
        self.inner.on_connection_event(event)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use futures::task::noop_waker;
    use libp2p::core::upgrade::DeniedUpgrade;
    use libp2p::swarm::SubstreamProtocol;

    use super::*;

    /// A handler that counts its polls and returns what its behaviour sent
    /// it, one event per poll, or what a waker handed out by `wake_me` was
    /// woken for.
    struct Counting {
        polls: Arc<AtomicUsize>,
        queue: VecDeque<u32>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl ConnectionHandler for Counting {
        type FromBehaviour = u32;
        type ToBehaviour = u32;
        type InboundProtocol = DeniedUpgrade;
        type OutboundProtocol = DeniedUpgrade;
        type InboundOpenInfo = ();
        type OutboundOpenInfo = Infallible;

        fn listen_protocol(&self) -> SubstreamProtocol<DeniedUpgrade, ()> {
            SubstreamProtocol::new(DeniedUpgrade, ())
        }

        fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, Infallible, u32>> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            match self.queue.pop_front() {
                Some(e) => Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(e)),
                None => Poll::Pending,
            }
        }

        fn on_behaviour_event(&mut self, event: u32) {
            self.queue.push_back(event);
        }

        fn on_connection_event(&mut self, _: ConnectionEvent<DeniedUpgrade, DeniedUpgrade, (), Infallible>) {}
    }

    /// A connection task's waker that counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A [`Counting`] handler that counts its polls in `polls` and keeps its last waker in `waker`.
    fn counting(polls: &Arc<AtomicUsize>, waker: &Arc<std::sync::Mutex<Option<Waker>>>) -> Counting {
        Counting {
            polls: polls.clone(),
            queue: VecDeque::new(),
            waker: waker.clone(),
        }
    }

    #[test]
    fn a_handler_is_polled_only_after_a_wake_an_event_or_an_event_of_its_own() {
        let polls = Arc::new(AtomicUsize::new(0));
        let inner_waker = Arc::new(std::sync::Mutex::new(None));
        let mut h = Wakes::default().wrapper(true).wrap(
            ConnectionId::new_unchecked(1),
            Counting {
                polls: polls.clone(),
                queue: VecDeque::new(),
                waker: inner_waker.clone(),
            },
        );
        let task = noop_waker();
        let mut cx = Context::from_waker(&task);
        let count = || polls.load(Ordering::Relaxed);

        assert!(h.poll(&mut cx).is_pending());
        assert_eq!(count(), 1, "a new handler is polled once");
        for _ in 0..5 {
            assert!(h.poll(&mut cx).is_pending());
        }
        assert_eq!(count(), 1, "not again while nothing happened to it");

        h.on_behaviour_event(7);
        h.on_behaviour_event(8);
        assert!(matches!(
            h.poll(&mut cx),
            Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(7))
        ));
        assert!(matches!(
            h.poll(&mut cx),
            Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(8))
        ));
        assert!(
            h.poll(&mut cx).is_pending(),
            "polled again after each event it returned"
        );
        assert_eq!(count(), 4);
        assert!(h.poll(&mut cx).is_pending());
        assert_eq!(count(), 4);

        inner_waker.lock().unwrap().take().unwrap().wake();
        assert!(h.poll(&mut cx).is_pending());
        assert_eq!(count(), 5, "polled after its own waker was woken");
    }

    #[test]
    fn a_wake_of_the_handler_wakes_the_connection_task() {
        let inner_waker = Arc::new(std::sync::Mutex::new(None));
        let mut h = Wakes::default().wrapper(true).wrap(
            ConnectionId::new_unchecked(1),
            Counting {
                polls: Arc::default(),
                queue: VecDeque::new(),
                waker: inner_waker.clone(),
            },
        );
        let task = Arc::new(Count(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        assert!(h.poll(&mut cx).is_pending());
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 1);
        assert!(h.poll(&mut cx).is_pending());
        assert!(h.poll(&mut cx).is_pending());
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 2, "and again after the next poll");
    }

    #[test]
    fn a_behaviour_kept_from_peer_addresses_still_hears_of_failed_dials() {
        use libp2p::swarm::{FromSwarm, NewExternalAddrOfPeer};
        let peer = libp2p::PeerId::random();
        let addr: libp2p::Multiaddr = "/memory/7".parse().unwrap();
        let learned = FromSwarm::NewExternalAddrOfPeer(NewExternalAddrOfPeer {
            peer_id: peer,
            addr: &addr,
        });
        let wakes = Wakes::default();
        let kept = wakes.wrapper(true);
        let without = wakes.wrapper(false);
        assert!(WrapHandler::<Counting>::passes(&kept, &learned));
        assert!(!WrapHandler::<Counting>::passes(&without, &learned));
        let error = libp2p::swarm::DialError::Aborted;
        let failed = FromSwarm::DialFailure(libp2p::swarm::DialFailure {
            peer_id: Some(peer),
            error: &error,
            connection_id: libp2p::swarm::ConnectionId::new_unchecked(1),
        });
        assert!(
            WrapHandler::<Counting>::passes(&without, &failed),
            "a failed dial passes"
        );
    }

    #[test]
    fn the_handlers_of_a_connection_share_one_word_and_each_is_polled_after_its_own_wake() {
        let wakes = Wakes::default();
        let (first, second) = (wakes.wrapper(true), wakes.wrapper(false));
        let (polls_a, polls_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (waker_a, waker_b) = (Arc::default(), Arc::default());
        let connection = ConnectionId::new_unchecked(7);
        let mut a = first.wrap(connection, counting(&polls_a, &waker_a));
        assert!(a.register, "each registers the task's waker itself without a root");
        let mut b = second.wrap(connection, counting(&polls_b, &waker_b));
        assert!(Arc::ptr_eq(&a.flags, &b.flags), "one word for the connection");
        assert_ne!(a.bit, b.bit);
        assert!(
            wakes.0.lock().unwrap().making.is_empty(),
            "forgotten once every wrapper made its handler"
        );
        let other = first.wrap(
            ConnectionId::new_unchecked(8),
            counting(&Arc::default(), &Arc::default()),
        );
        assert!(!Arc::ptr_eq(&a.flags, &other.flags), "another connection has its own");

        let task = noop_waker();
        let mut cx = Context::from_waker(&task);
        assert!(a.poll(&mut cx).is_pending());
        assert!(b.poll(&mut cx).is_pending());
        assert_eq!(
            (polls_a.load(Ordering::Relaxed), polls_b.load(Ordering::Relaxed)),
            (1, 1)
        );
        waker_b.lock().unwrap().take().unwrap().wake();
        assert!(a.poll(&mut cx).is_pending());
        assert!(b.poll(&mut cx).is_pending());
        assert_eq!(
            (polls_a.load(Ordering::Relaxed), polls_b.load(Ordering::Relaxed)),
            (1, 2),
            "only the handler that was woken is polled"
        );
        a.on_behaviour_event(3);
        assert!(b.poll(&mut cx).is_pending());
        assert!(matches!(
            a.poll(&mut cx),
            Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(3))
        ));
        assert_eq!(polls_b.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn under_a_root_the_handlers_leave_the_registration_to_it_and_a_wake_still_reaches_the_task() {
        let wakes = Wakes::default();
        let (first, second) = (wakes.wrapper(true), wakes.wrapper(true));
        let root = Root::new(&wakes);
        let (polls_a, polls_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (waker_a, waker_b) = (Arc::default(), Arc::default());
        let connection = ConnectionId::new_unchecked(9);
        let a = first.wrap(connection, counting(&polls_a, &waker_a));
        let b = second.wrap(connection, counting(&polls_b, &waker_b));
        assert!(!a.register && !b.register);
        // The swarm makes the composed handler's parts first, then wraps it.
        let a_flags = a.flags.clone();
        let composed = a.select(b);
        let mut h = root.wrap(connection, composed);
        assert!(Arc::ptr_eq(&h.flags, &a_flags), "the root shares the connection's word");
        assert!(wakes.0.lock().unwrap().making.is_empty());

        let task = Arc::new(Count(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        assert!(h.poll(&mut cx).is_pending());
        assert_eq!(
            (polls_a.load(Ordering::Relaxed), polls_b.load(Ordering::Relaxed)),
            (1, 1)
        );
        waker_b.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::Relaxed), 1, "the wake reached the task");
        assert!(h.poll(&mut cx).is_pending());
        assert_eq!(
            (polls_a.load(Ordering::Relaxed), polls_b.load(Ordering::Relaxed)),
            (1, 2),
            "only the woken handler was polled"
        );
        waker_a.lock().unwrap().take().unwrap().wake();
        assert_eq!(
            task.0.load(Ordering::Relaxed),
            2,
            "and the next, after the root's next poll"
        );
    }
}
