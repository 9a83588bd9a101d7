//! The event queue: events ordered by (time, sequence number). The sequence number is the order of
//! scheduling, so two events at the same microsecond always run in the same order.
//!
//! Two levels keep it fast with hundreds of thousands of pending timers: a binary heap holds the
//! events before `horizon`, and events further ahead wait unsorted in one-second buckets
//! (a `BTreeMap`, so the order never depends on hashing) until the horizon reaches them. The pop
//! order is exactly that of a single heap over all events.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use super::Time;
use super::event::Ev;

/// Bucket width, µs.
const WIDTH: Time = 1_000_000;

struct Entry {
    time: Time,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.time == other.time && self.seq == other.seq
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed, so that the max-heap pops the earliest (time, seq) first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.time, other.seq).cmp(&(self.time, self.seq))
    }
}

/// Pending events.
pub struct EventQueue {
    heap: BinaryHeap<Entry>,
    /// Every event in `heap` is before this time; every event in `later` is at or after it.
    horizon: Time,
    later: BTreeMap<Time, Vec<Entry>>,
    next_seq: u64,
    len: usize,
    peak: usize,
}

impl Default for EventQueue {
    fn default() -> Self {
        EventQueue {
            heap: BinaryHeap::new(),
            horizon: WIDTH,
            later: BTreeMap::new(),
            next_seq: 0,
            len: 0,
            peak: 0,
        }
    }
}

impl EventQueue {
    pub fn push(&mut self, time: Time, ev: Ev) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let e = Entry { time, seq, ev };
        if time < self.horizon {
            self.heap.push(e);
        } else {
            self.later.entry(time / WIDTH).or_default().push(e);
        }
        self.len += 1;
        self.peak = self.peak.max(self.len);
    }

    /// Moves the next bucket under the horizon when the heap has run dry.
    fn refill(&mut self) {
        while self.heap.is_empty() {
            let Some((bucket, entries)) = self.later.pop_first() else {
                return;
            };
            self.horizon = (bucket + 1).saturating_mul(WIDTH);
            self.heap.extend(entries);
        }
    }

    pub fn pop(&mut self) -> Option<(Time, Ev)> {
        self.refill();
        let e = self.heap.pop()?;
        self.len -= 1;
        Some((e.time, e.ev))
    }

    pub fn peek_time(&mut self) -> Option<Time> {
        self.refill();
        self.heap.peek().map(|e| e.time)
    }

    pub fn peak(&self) -> usize {
        self.peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(e: &Ev) -> u32 {
        match e {
            Ev::Up(n) => *n,
            _ => u32::MAX,
        }
    }

    #[test]
    fn events_pop_in_time_order_and_ties_in_scheduling_order() {
        let mut q = EventQueue::default();
        q.push(5, Ev::Up(1));
        q.push(3, Ev::Up(2));
        q.push(5, Ev::Up(3));
        q.push(3, Ev::Up(4));
        let ids: Vec<u32> = std::iter::from_fn(|| q.pop()).map(|(_, e)| id(&e)).collect();
        assert_eq!(ids, vec![2, 4, 1, 3]);
    }

    #[test]
    fn far_events_interleave_exactly_with_near_ones() {
        let mut q = EventQueue::default();
        let mut expect = Vec::new();
        let mut x: u64 = 12345;
        for i in 0..2_000u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let t = (x >> 33) % 50_000_000;
            q.push(t, Ev::Up(i));
            expect.push((t, i));
        }
        // Interleave pops with pushes relative to the current time.
        let mut got = Vec::new();
        for _ in 0..500 {
            let (t, e) = q.pop().unwrap();
            got.push((t, id(&e)));
        }
        let now = got.last().unwrap().0;
        for i in 0..500u32 {
            let t = now + u64::from(i) * 7_919;
            q.push(t, Ev::Up(10_000 + i));
            expect.push((t, 10_000 + i));
        }
        got.extend(std::iter::from_fn(|| q.pop()).map(|(t, e)| (t, id(&e))));
        expect.sort(); // (time, then scheduling order: ids were scheduled in increasing order)
        assert_eq!(got, expect);
    }
}
