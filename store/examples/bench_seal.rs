//! What a passphrase costs: unlocking (one Argon2id derivation, 64 MiB, 3 passes), setting and
//! removing it on a store with 5,000 MLS rows of 1 KiB (every row rewritten in one transaction),
//! and reading the identity with and without sealing. Medians; a file in a temporary directory.
//!
//! `cargo run --release -p tidings-store --example bench_seal`

mod common;

use std::time::Duration;

use common::median;

use tidings_store::{Identity, Store};

const ROWS: u32 = 5_000;
const ROW_BYTES: usize = 1024;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.redb");
    let store = Store::open(&path)?;
    store.put_identity(&Identity {
        account_seed: [1; 32],
        device_seed: [2; 32],
        mls_seed: [3; 32],
        device_cert: vec![4; 200],
        name: "bench".into(),
        created_ms: 0,
    })?;
    store.unit(|| -> Result<(), tidings_store::StoreError> {
        for i in 0..ROWS {
            store.put_mls_row_for_bench(&i.to_be_bytes(), &[i as u8; ROW_BYTES])?;
        }
        Ok(())
    })?;
    let read_plain = median(1001, || drop(store.identity()));
    let set = median(5, || {
        store.set_passphrase(None, Some("correct horse")).ok();
        store.set_passphrase(Some("correct horse"), None).ok();
    });
    store.set_passphrase(None, Some("correct horse"))?;
    let read_sealed = median(1001, || drop(store.identity()));
    let change = median(5, || {
        store.set_passphrase(Some("correct horse"), Some("correct horse")).ok();
    });
    drop(store);
    let unlock = median(11, || {
        let s = Store::open(&path).ok();
        if let Some(s) = s {
            s.unlock("correct horse").ok();
        }
    });
    println!("{ROWS} MLS rows of {ROW_BYTES} bytes; medians:");
    println!("  open + unlock (Argon2id, 64 MiB, t=3): {:.1} ms", ms(unlock));
    println!(
        "  set then remove the passphrase (two rewrites of every secret row, two derivations): {:.1} ms",
        ms(set)
    );
    println!(
        "  change the passphrase (two derivations, one row): {:.1} ms",
        ms(change)
    );
    println!(
        "  read the identity: plain {:.2} us, sealed {:.2} us (ratio {:.2})",
        read_plain.as_secs_f64() * 1e6,
        read_sealed.as_secs_f64() * 1e6,
        read_sealed.as_secs_f64() / read_plain.as_secs_f64()
    );
    Ok(())
}
