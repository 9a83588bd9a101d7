//! How long the web UI's history queries take on a 10,000-message chat: search for a rare word
//! and for a word in nearly every message, and a page of 100 at the newest end and in the middle.
//! Medians of 51 runs each, in memory (no disk).
//!
//! `cargo run --release -p tidings-store --example bench_history`

mod common;

use std::time::Duration;

use tidings_store::{MessageState, Store, StoredMessage};

const MESSAGES: u32 = 10_000;
const RUNS: usize = 51;

fn msg(i: u32, text: String) -> StoredMessage {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    StoredMessage::new_text(
        id,
        [1; 32],
        [1; 32],
        u64::from(i) + 1,
        1_000 + u64::from(i),
        1_000 + u64::from(i),
        false,
        text,
        MessageState::Received,
    )
}

fn median(f: impl FnMut()) -> Duration {
    common::median(RUNS, f)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::open_in_memory()?;
    let rows: Vec<StoredMessage> = (0..MESSAGES)
        .map(|i| {
            msg(
                i,
                if i % 1000 == 7 {
                    format!("Meet at the Lighthouse {i}")
                } else {
                    format!("ordinary chatter number {i} about nothing")
                },
            )
        })
        .collect();
    store.unit(|| -> Result<(), tidings_store::StoreError> {
        for r in &rows {
            store.insert_message(r)?;
        }
        Ok(())
    })?;
    let middle = rows[MESSAGES as usize / 2].id;
    let figures = [
        (
            "search, a word in 10 messages",
            median(|| drop(store.search("lightho", 50))),
        ),
        (
            "search, a word in 9,990 messages, newest 20",
            median(|| drop(store.search("chatter", 20))),
        ),
        (
            "a page of 100, the newest",
            median(|| drop(store.messages_before(&[1; 32], None, 100))),
        ),
        (
            "a page of 100 before the 5,000th message",
            median(|| drop(store.messages_before(&[1; 32], Some(&middle), 100))),
        ),
    ];
    println!("{MESSAGES} messages, median of {RUNS} runs each:");
    for (what, t) in figures {
        println!("  {what}: {:.3} ms", t.as_secs_f64() * 1e3);
    }
    Ok(())
}
