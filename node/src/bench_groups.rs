//! `tidings bench-groups`: MLS group operations at growing group sizes,
//! through the Tidings engine and through raw openmls, in the same run.
//!
//! For every group size N, five variants build a group of N members and then,
//! once per repetition, add one more device and send messages:
//!
//! - `raw`: plain openmls calls on `OpenMlsRustCrypto` (memory storage),
//!   `MlsGroup::new` with the ratchet tree extension, `BasicCredential`s,
//!   default configuration, `add_members` (which forces an UpdatePath);
//! - `raw-like`: the same with the engine's settings (past epochs kept, its
//!   sender ratchet, add commits without a forced UpdatePath): openmls doing
//!   the work the engine asks of it;
//! - `engine`: [`MlsEngine`] on the same memory storage (the engine's own
//!   checks, without our storage);
//! - `redb-mem`: [`MlsEngine`] on the node's redb provider over an in-memory
//!   database, every operation in one [`Store::unit`];
//! - `redb-file`: the same on redb files in a temporary directory, every unit
//!   committed durably: what a node really pays.
//!
//! Measured per repetition: the adder's commit (`commit_intent` / decode,
//! validate and `add_members`), the adder applying its own commit when the
//! sequence returns it (`process_sequenced` / `merge_pending_commit`), an
//! existing member processing that commit, the newcomer joining from the
//! Welcome, and then a few 100-byte messages: the sender's encrypt and a
//! receiver's processing, with the bytes each puts on the network. Building the
//! group (batched add commits) is not timed. Each repetition adds a fresh
//! device to the current group, so the group grows by one per repetition.
//! Variants take turns within each repetition so that machine noise hits all.
//!
//! Nothing here asserts performance: it prints figures next to their targets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, CredentialWithKey, KeyPackage, MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig,
    MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, ProcessedMessageContent, ProtocolVersion,
    SenderRatchetConfiguration, StagedWelcome,
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::signatures::Signer;
use prost::Message as _;
use tidings_protocol::group::{GroupMeta, Intent};
use tidings_protocol::identity::{AccountKey, DeviceCertificate, DeviceKey};
use tidings_protocol::limits::MAX_MLS_MESSAGE;
use tidings_protocol::mls::{
    CIPHERSUITE, GROUP_PAST_EPOCHS, MAX_FORWARD_DISTANCE, MlsEngine, MlsError, OUT_OF_ORDER_TOLERANCE, Sequenced,
    signature_keys_from_seed, verify_credential,
};
use tidings_protocol::pb::{self, EnvelopeKind};
use tidings_store::Store;

use crate::Clock;
use crate::bench::{COMMIT_PROBES, Machine, commit_probe, median, ms};
use crate::core::Provider;

/// Measure MLS group operations at growing group sizes, against raw openmls.
#[derive(Debug, clap::Args)]
pub struct BenchGroupsArgs {
    /// Group sizes to measure, comma-separated [default: 10,100,1000; --quick: 10,100].
    #[arg(long, value_name = "N,N,…", value_delimiter = ',')]
    pub sizes: Option<Vec<usize>>,
    /// Added devices (repetitions) per size and variant [default: 5, and 3 at
    /// sizes of 2,000 and more; --quick: 2].
    #[arg(long, value_name = "R")]
    pub reps: Option<usize>,
    /// Messages sent per repetition [default: 20; --quick: 5].
    #[arg(long, value_name = "M")]
    pub messages: Option<usize>,
    /// Also write every figure to FILE as a JSON object.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Small sizes and counts for a smoke run.
    #[arg(long)]
    pub quick: bool,
}

/// Key packages per setup commit. A commit adding 200 devices is about 100 KB,
/// well inside [`MAX_MLS_MESSAGE`], which every processed commit must fit.
const SETUP_BATCH: usize = 200;
/// Application payload size, in bytes.
const MESSAGE_BYTES: usize = 100;
/// The group size the targets are stated for.
const TARGET_SIZE: usize = 1_000;
/// Each add operation at [`TARGET_SIZE`] members, in ms.
const TARGET_ADD_MS: f64 = 100.0;
/// The sender's cost of one message at [`TARGET_SIZE`] members, in ms.
const TARGET_SEND_MS: f64 = 1.0;
/// Validity of the benchmark's device certificates.
const CERT_VALIDITY_MS: u64 = 30 * 24 * 3600 * 1000;
/// A relay address of realistic length for the group metadata.
const RELAY: &str = "/dns4/relay.tidings.example/tcp/4001/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo";

#[derive(Debug, Clone)]
struct Counts {
    sizes: Vec<usize>,
    reps: Option<usize>,
    quick: bool,
    messages: usize,
}

impl Counts {
    fn from_args(a: &BenchGroupsArgs) -> Self {
        let sizes = a
            .sizes
            .clone()
            .unwrap_or_else(|| if a.quick { vec![10, 100] } else { vec![10, 100, 1_000] });
        Self {
            sizes,
            reps: a.reps,
            quick: a.quick,
            messages: a.messages.unwrap_or(if a.quick { 5 } else { 20 }),
        }
    }

    fn reps_at(&self, n: usize) -> usize {
        self.reps.unwrap_or(match (self.quick, n) {
            (true, _) => 2,
            (false, n) if n >= 2_000 => 3,
            _ => 5,
        })
    }
}

/// Runs the benchmark.
pub async fn run(args: BenchGroupsArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(&args))
        .await
        .context("the group benchmark panicked")?
}

fn run_blocking(args: &BenchGroupsArgs) -> anyhow::Result<()> {
    let counts = Counts::from_args(args);
    if let Some(n) = counts.sizes.iter().find(|n| **n < 2) {
        bail!("group size {n} is too small: a group needs the adder and one other member");
    }
    if counts.reps.is_some_and(|r| r == 0) || counts.messages == 0 {
        bail!("--reps and --messages must be at least 1");
    }
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut machine = Machine::read();
    (machine.commit_min_ms, machine.commit_ms) =
        commit_probe(tmp.path(), COMMIT_PROBES).context("cannot time a durable commit")?;
    println!("Tidings group benchmark\n");
    machine.print(tmp.path());
    if cfg!(debug_assertions) {
        println!("  WARNING: this is a debug build; build with --release for meaningful figures");
    }
    println!();

    let now = Clock::system().now_ms();
    let max = counts.sizes.iter().copied().max().unwrap_or(2);
    let t0 = Instant::now();
    let fillers = filler_key_packages(max.saturating_sub(2), now)?;
    println!(
        "{} key packages for the other members made in {:.1} s (not timed below)\n",
        fillers.len(),
        t0.elapsed().as_secs_f64()
    );

    let payload: Vec<u8> = (0..MESSAGE_BYTES).map(|i| i as u8).collect();
    let mut results = Vec::new();
    for &n in &counts.sizes {
        let reps = counts.reps_at(n);
        println!("[size {n}] building the group in each variant (batches of {SETUP_BATCH}, not timed)…");
        let dir = tmp.path().join(format!("n{n}"));
        std::fs::create_dir_all(&dir)?;
        let mut variants = build_variants(n, &fillers, &dir, now)?;
        let mut samples: Vec<Vec<RepSample>> = variants.iter().map(|_| Vec::new()).collect();
        for r in 0..reps {
            // Rotate which variant goes first.
            for k in 0..variants.len() {
                let i = (r + k) % variants.len();
                let v = &mut variants[i];
                let s = v
                    .rep(counts.messages, &payload, now)
                    .with_context(|| format!("size {n}, {}, repetition {}", v.name(), r + 1))?;
                samples[i].push(s);
            }
            println!(
                "    repetition {}/{reps}: redb-file add {:.1} ms commit + {:.1} ms merge, {:.1} ms on a member, {:.1} ms join",
                r + 1,
                samples[REDB_FILE][r].commit_ms,
                samples[REDB_FILE][r].merge_ms,
                samples[REDB_FILE][r].member_ms,
                samples[REDB_FILE][r].join_ms,
            );
        }
        // The disk's state now: the redb-file figures move with it.
        let (probe_min, probe) = commit_probe(&dir, COMMIT_PROBES).context("cannot time a durable commit")?;
        let figures: Vec<Figures> = variants
            .iter()
            .zip(&samples)
            .map(|(v, s)| Figures {
                state_bytes: v.state_bytes(),
                ..Figures::of(v.name(), s)
            })
            .collect();
        drop(variants);
        let _ = std::fs::remove_dir_all(&dir);
        let size = SizeResult {
            n,
            reps,
            messages: counts.messages,
            commit_probe_ms: (probe, probe_min),
            figures,
        };
        println!();
        size.print();
        println!();
        results.push(size);
    }
    print_targets(&results);

    if let Some(path) = &args.json {
        let v = to_json(&machine, &counts, &results);
        let text = serde_json::to_string_pretty(&v)?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nfigures written to {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------- devices

/// A device identity: a certificate from a fresh account, and the MLS signing seed.
struct Id {
    cert: DeviceCertificate,
    mls_seed: [u8; 32],
}

impl Id {
    fn new(now: u64) -> Self {
        let account = AccountKey::from_seed(rand::random());
        let device = DeviceKey::from_seed(rand::random());
        let mls_seed: [u8; 32] = rand::random();
        let signer = signature_keys_from_seed(mls_seed);
        let cert = account.certify_device(
            &device.public(),
            signer.public(),
            now.saturating_sub(1000),
            now + CERT_VALIDITY_MS,
        );
        Self { cert, mls_seed }
    }
}

/// Key packages of `n` devices that are added to groups and never act. The
/// same key packages serve every variant, so all trees hold the same leaves.
fn filler_key_packages(n: usize, now: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    let provider = OpenMlsRustCrypto::default();
    (0..n)
        .map(|_| {
            let id = Id::new(now);
            let engine = MlsEngine::new(id.mls_seed, &id.cert)?;
            Ok(engine.key_package(&provider, false)?)
        })
        .collect()
}

/// The key packages that grow a group from its creator to `n` members, in
/// setup commits of at most [`SETUP_BATCH`]: the measured member's first,
/// so that it joins from the first (small) Welcome.
fn setup_batches(n: usize, member: Vec<u8>, fillers: &[Vec<u8>]) -> anyhow::Result<Vec<Vec<Vec<u8>>>> {
    let fill = fillers.get(..n.saturating_sub(2)).context("not enough key packages")?;
    let all: Vec<Vec<u8>> = std::iter::once(member).chain(fill.iter().cloned()).collect();
    Ok(all.chunks(SETUP_BATCH).map(<[Vec<u8>]>::to_vec).collect())
}

/// A device on the engine: its storage, provider and engine.
struct Member<P> {
    store: Option<Arc<Store>>,
    provider: P,
    engine: MlsEngine,
    file: Option<PathBuf>,
}

impl<P: OpenMlsProvider> Member<P> {
    /// Runs `f` in one store unit, as the node does (or directly without a store).
    fn unit<T>(&self, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        match &self.store {
            Some(s) => s.unit(f),
            None => f(),
        }
    }

    fn key_package(&self) -> anyhow::Result<Vec<u8>> {
        self.unit(|| Ok(self.engine.key_package(&self.provider, false)?))
    }

    /// Removes the device's database file, if it has one.
    fn discard(self) {
        let file = self.file.clone();
        drop(self);
        if let Some(f) = file {
            let _ = std::fs::remove_file(f);
        }
    }
}

type MakeMember<P> = Box<dyn Fn(&Id, &str) -> anyhow::Result<Member<P>>>;

fn memory_member(id: &Id, _name: &str) -> anyhow::Result<Member<OpenMlsRustCrypto>> {
    Ok(Member {
        store: None,
        provider: OpenMlsRustCrypto::default(),
        engine: MlsEngine::new(id.mls_seed, &id.cert)?,
        file: None,
    })
}

fn redb_member(id: &Id, file: Option<PathBuf>) -> anyhow::Result<Member<Provider>> {
    let store = Arc::new(match &file {
        Some(path) => Store::open(path)?,
        None => Store::open_in_memory()?,
    });
    Ok(Member {
        provider: Provider::new(store.clone()),
        store: Some(store),
        engine: MlsEngine::new(id.mls_seed, &id.cert)?,
        file,
    })
}

// ---------------------------------------------------------------- samples

/// One repetition of one variant: an add, then `messages` messages.
#[derive(Debug, Clone)]
struct RepSample {
    commit_ms: f64,
    merge_ms: f64,
    member_ms: f64,
    join_ms: f64,
    /// The engine refused the Welcome as larger than [`MAX_MLS_MESSAGE`];
    /// `join_ms` then times the same steps without that limit.
    join_refused: bool,
    commit_bytes: usize,
    welcome_bytes: usize,
    encrypt_us: Vec<f64>,
    decrypt_us: Vec<f64>,
    message_bytes: usize,
    envelope_bytes: usize,
    /// Group size before the add.
    size_before: usize,
}

trait Variant {
    fn name(&self) -> &'static str;
    /// Adds one fresh device, then sends `messages` messages from the adder
    /// to the existing member.
    fn rep(&mut self, messages: usize, payload: &[u8], now: u64) -> anyhow::Result<RepSample>;
    /// Sizes of the adder's stored `MessageSecrets` and `Tree` rows (as
    /// openmls' memory storage keeps them, JSON), where the variant can read them.
    fn state_bytes(&self) -> Option<(usize, usize)> {
        None
    }
}

fn build_variants(n: usize, fillers: &[Vec<u8>], dir: &Path, now: u64) -> anyhow::Result<Vec<Box<dyn Variant>>> {
    let t = Instant::now();
    let raw = build_raw(RawKind::Plain, n, fillers, now)?;
    let t_raw = t.elapsed();
    let like = build_raw(RawKind::Like, n, fillers, now)?;
    let engine = EngineVariant::build("engine", n, fillers, now, Box::new(memory_member))?;
    let redb_mem = EngineVariant::build("redb-mem", n, fillers, now, Box::new(|id, _| redb_member(id, None)))?;
    let t_file = Instant::now();
    let file_dir = dir.to_owned();
    let redb_file = EngineVariant::build(
        "redb-file",
        n,
        fillers,
        now,
        Box::new(move |id, name| redb_member(id, Some(file_dir.join(format!("{name}.redb"))))),
    )?;
    println!(
        "    built in {:.1} s (raw {:.1} s, redb-file {:.1} s)",
        t.elapsed().as_secs_f64(),
        t_raw.as_secs_f64(),
        t_file.elapsed().as_secs_f64()
    );
    Ok(vec![
        Box::new(raw),
        Box::new(like),
        Box::new(engine),
        Box::new(redb_mem),
        Box::new(redb_file),
    ])
}

fn elapsed_ms(t: Instant) -> f64 {
    ms(t.elapsed())
}

fn elapsed_us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

/// Times `messages` rounds of `send` (the sender's whole operation, returning
/// the encoded message) and `receive` (the receiver's, returning the
/// plaintext). Returns the send and receive times in µs and the last message.
fn message_rounds(
    messages: usize,
    payload: &[u8],
    mut send: impl FnMut() -> anyhow::Result<Vec<u8>>,
    mut receive: impl FnMut(&[u8]) -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<u8>)> {
    let mut send_us = Vec::with_capacity(messages);
    let mut receive_us = Vec::with_capacity(messages);
    let mut ct = Vec::new();
    for _ in 0..messages {
        let t = Instant::now();
        ct = send()?;
        send_us.push(elapsed_us(t));
        let t = Instant::now();
        let pt = receive(&ct)?;
        receive_us.push(elapsed_us(t));
        if pt != payload {
            bail!("the receiver decrypted something else");
        }
    }
    Ok((send_us, receive_us, ct))
}

/// The bytes of the envelope that carries a group message to the group's
/// inbox (one copy per group relay, whatever the group's size).
fn envelope_bytes(gid: &[u8], mls_message: Vec<u8>) -> usize {
    pb::Envelope {
        id: vec![0xee; 16],
        conversation_id: gid.to_vec(),
        kind: EnvelopeKind::Message as i32,
        mls_message,
        ..Default::default()
    }
    .encode_to_vec()
    .len()
}

// ------------------------------------------------------------------ engine

/// The Tidings path: [`MlsEngine`] on some storage.
struct EngineVariant<P> {
    name: &'static str,
    gid: [u8; 16],
    owner: Member<P>,
    owner_group: MlsGroup,
    member: Member<P>,
    member_group: MlsGroup,
    make: MakeMember<P>,
    added: usize,
}

fn expect_commit(s: Sequenced, ours: bool) -> anyhow::Result<()> {
    match s {
        Sequenced::Commit {
            ours: o, lost: false, ..
        } if o == ours => Ok(()),
        other => bail!("expected a commit (ours: {ours}), got {other:?}"),
    }
}

impl<P: OpenMlsProvider> EngineVariant<P> {
    fn build(name: &'static str, n: usize, fillers: &[Vec<u8>], now: u64, make: MakeMember<P>) -> anyhow::Result<Self> {
        let owner_id = Id::new(now);
        let member_id = Id::new(now);
        let owner = make(&owner_id, "owner")?;
        let member = make(&member_id, "member")?;
        let gid: [u8; 16] = rand::random();
        let meta = GroupMeta::new("bench", &owner_id.cert.account, vec![RELAY.to_owned()], rand::random());
        let mut og = owner.unit(|| Ok(owner.engine.create_named_group(&owner.provider, &gid, &meta)?))?;
        let mut mg: Option<MlsGroup> = None;
        for batch in setup_batches(n, member.key_package()?, fillers)? {
            let intent = Intent::Add(batch);
            let staged = owner
                .unit(|| Ok(owner.engine.commit_intent(&owner.provider, &mut og, &intent, now)?))?
                .context("the setup commit added nobody")?;
            let s = owner.unit(|| {
                Ok(owner
                    .engine
                    .process_sequenced(&owner.provider, &mut og, &staged.commit, Some(&staged.commit))?)
            })?;
            expect_commit(s, true)?;
            match mg.as_mut() {
                None => {
                    let welcome = staged.welcome.context("the first setup commit made no Welcome")?;
                    mg = Some(member.unit(|| Ok(member.engine.join(&member.provider, &welcome)?))?);
                }
                Some(g) => {
                    let s = member.unit(|| {
                        Ok(member
                            .engine
                            .process_sequenced(&member.provider, g, &staged.commit, None)?)
                    })?;
                    expect_commit(s, false)?;
                }
            }
        }
        if og.members().count() != n {
            bail!("the group has {} members, not {n}", og.members().count());
        }
        Ok(Self {
            name,
            gid,
            owner,
            owner_group: og,
            member,
            member_group: mg.context("the member never joined")?,
            make,
            added: 0,
        })
    }
}

/// The engine's join configuration (`MlsEngine::join` keeps its own private copy).
fn engine_join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .max_past_epochs(GROUP_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAX_FORWARD_DISTANCE,
        ))
        .build()
}

/// The steps of `MlsEngine::join` without its [`MAX_MLS_MESSAGE`] limit:
/// decode, stage the Welcome, verify every member's credential, build the group.
fn join_without_limit<P: OpenMlsProvider>(provider: &P, welcome: &[u8]) -> anyhow::Result<MlsGroup> {
    let welcome = match MlsMessageIn::tls_deserialize_exact(welcome)
        .map_err(|e| anyhow!("decoding the Welcome: {e}"))?
        .extract()
    {
        MlsMessageBodyIn::Welcome(w) => w,
        _ => bail!("not a Welcome"),
    };
    let staged = StagedWelcome::new_from_welcome(provider, &engine_join_config(), welcome, None)
        .map_err(|e| anyhow!("staging the Welcome: {e:?}"))?;
    for m in staged.members() {
        verify_credential(&m.credential, &m.signature_key)?;
    }
    staged.into_group(provider).map_err(|e| anyhow!("joining: {e:?}"))
}

impl<P: OpenMlsProvider> Variant for EngineVariant<P> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn rep(&mut self, messages: usize, payload: &[u8], now: u64) -> anyhow::Result<RepSample> {
        let size_before = self.owner_group.members().count();
        self.added += 1;
        let newcomer = (self.make)(&Id::new(now), &format!("newcomer-{}", self.added))?;
        let kp = newcomer.key_package()?;
        let intent = Intent::Add(vec![kp]);
        let (owner, og) = (&self.owner, &mut self.owner_group);
        let (member, mg) = (&self.member, &mut self.member_group);

        let t = Instant::now();
        let staged = owner
            .unit(|| Ok(owner.engine.commit_intent(&owner.provider, og, &intent, now)?))?
            .context("the commit added nobody")?;
        let commit_ms = elapsed_ms(t);

        let t = Instant::now();
        let s = owner.unit(|| {
            Ok(owner
                .engine
                .process_sequenced(&owner.provider, og, &staged.commit, Some(&staged.commit))?)
        })?;
        let merge_ms = elapsed_ms(t);
        expect_commit(s, true)?;

        let t = Instant::now();
        let s = member.unit(|| {
            Ok(member
                .engine
                .process_sequenced(&member.provider, mg, &staged.commit, None)?)
        })?;
        let member_ms = elapsed_ms(t);
        expect_commit(s, false)?;

        let welcome = staged.welcome.context("the commit made no Welcome")?;
        let t = Instant::now();
        let joined = newcomer.unit(|| Ok(newcomer.engine.join(&newcomer.provider, &welcome)?));
        let mut join_ms = elapsed_ms(t);
        let join_refused = match joined {
            Ok(_) => false,
            Err(e) if matches!(e.downcast_ref::<MlsError>(), Some(MlsError::TooLarge)) => {
                let t = Instant::now();
                newcomer.unit(|| join_without_limit(&newcomer.provider, &welcome))?;
                join_ms = elapsed_ms(t);
                true
            }
            Err(e) => return Err(e.context("joining from the Welcome")),
        };
        newcomer.discard();
        if og.epoch() != mg.epoch() {
            bail!("the adder and the member disagree on the epoch");
        }

        let (encrypt_us, decrypt_us, ct) = message_rounds(
            messages,
            payload,
            || owner.unit(|| Ok(owner.engine.encrypt(&owner.provider, og, payload)?)),
            |ct| match member.unit(|| Ok(member.engine.process_sequenced(&member.provider, mg, ct, None)?))? {
                Sequenced::Application { plaintext, .. } => Ok(plaintext),
                other => bail!("expected the message back, got {other:?}"),
            },
        )?;
        Ok(RepSample {
            commit_ms,
            merge_ms,
            member_ms,
            join_ms,
            join_refused,
            commit_bytes: staged.commit.len(),
            welcome_bytes: welcome.len(),
            message_bytes: ct.len(),
            envelope_bytes: envelope_bytes(&self.gid, ct),
            encrypt_us,
            decrypt_us,
            size_before,
        })
    }
}

// --------------------------------------------------------------------- raw

/// The raw openmls path: plain calls on `OpenMlsRustCrypto`.
struct RawDevice<S> {
    provider: OpenMlsRustCrypto,
    signer: S,
    credential: CredentialWithKey,
}

fn raw_device(id: &Id) -> RawDevice<impl Signer + use<>> {
    let signer = signature_keys_from_seed(id.mls_seed);
    let credential = CredentialWithKey {
        credential: BasicCredential::new(id.cert.to_bytes()).into(),
        signature_key: signer.to_public_vec().into(),
    };
    RawDevice {
        provider: OpenMlsRustCrypto::default(),
        signer,
        credential,
    }
}

impl<S: Signer> RawDevice<S> {
    fn key_package(&self) -> anyhow::Result<Vec<u8>> {
        let bundle = KeyPackage::builder()
            .build(CIPHERSUITE, &self.provider, &self.signer, self.credential.clone())
            .map_err(|e| anyhow!("key package: {e:?}"))?;
        MlsMessageOut::from(bundle.key_package().clone())
            .to_bytes()
            .map_err(|e| anyhow!("encoding: {e:?}"))
    }
}

/// How a raw openmls group is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawKind {
    /// Plain openmls: default configuration (no past epochs kept) and
    /// `add_members`, which always puts an UpdatePath in the commit.
    Plain,
    /// openmls with the engine's group settings: [`GROUP_PAST_EPOCHS`] past epochs
    /// kept, the engine's sender ratchet, and add commits from the commit
    /// builder without a forced UpdatePath, as `commit_intent` makes them.
    Like,
}

impl RawKind {
    fn name(self) -> &'static str {
        match self {
            RawKind::Plain => "raw",
            RawKind::Like => "raw-like",
        }
    }

    fn create_config(self) -> MlsGroupCreateConfig {
        let b = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true);
        match self {
            RawKind::Plain => b.build(),
            RawKind::Like => b
                .max_past_epochs(GROUP_PAST_EPOCHS)
                .sender_ratchet_configuration(SenderRatchetConfiguration::new(
                    OUT_OF_ORDER_TOLERANCE,
                    MAX_FORWARD_DISTANCE,
                ))
                .build(),
        }
    }

    fn join_config(self) -> MlsGroupJoinConfig {
        match self {
            RawKind::Plain => MlsGroupJoinConfig::builder().use_ratchet_tree_extension(true).build(),
            RawKind::Like => engine_join_config(),
        }
    }
}

fn decode(bytes: &[u8]) -> anyhow::Result<MlsMessageIn> {
    MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| anyhow!("decoding: {e}"))
}

/// Decodes and validates key packages, then commits their addition (pending).
/// Returns the commit and the Welcome, encoded.
fn raw_add<S: Signer>(
    kind: RawKind,
    d: &RawDevice<S>,
    group: &mut MlsGroup,
    key_packages: &[Vec<u8>],
) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let kps = key_packages
        .iter()
        .map(|b| match decode(b)?.extract() {
            MlsMessageBodyIn::KeyPackage(kp) => kp
                .validate(d.provider.crypto(), ProtocolVersion::Mls10)
                .map_err(|e| anyhow!("key package: {e:?}")),
            _ => bail!("not a key package"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (commit, welcome) = match kind {
        RawKind::Plain => {
            let (commit, welcome, _info) = group
                .add_members(&d.provider, &d.signer, &kps)
                .map_err(|e| anyhow!("add_members: {e:?}"))?;
            (commit, welcome)
        }
        RawKind::Like => {
            let (commit, welcome, _info) = group
                .commit_builder()
                .propose_adds(kps)
                .load_psks(d.provider.storage())
                .map_err(|e| anyhow!("load_psks: {e:?}"))?
                .build(d.provider.rand(), d.provider.crypto(), &d.signer, |_| true)
                .map_err(|e| anyhow!("building the commit: {e:?}"))?
                .stage_commit(&d.provider)
                .map_err(|e| anyhow!("staging the commit: {e:?}"))?
                .into_messages();
            (commit, welcome.context("the commit made no Welcome")?)
        }
    };
    Ok((
        commit.to_bytes().map_err(|e| anyhow!("encoding: {e:?}"))?,
        welcome.to_bytes().map_err(|e| anyhow!("encoding: {e:?}"))?,
    ))
}

/// Decodes and processes a protocol message.
fn raw_process(
    provider: &OpenMlsRustCrypto,
    group: &mut MlsGroup,
    bytes: &[u8],
) -> anyhow::Result<ProcessedMessageContent> {
    let msg = decode(bytes)?
        .try_into_protocol_message()
        .map_err(|e| anyhow!("not a protocol message: {e:?}"))?;
    Ok(group
        .process_message(provider, msg)
        .map_err(|e| anyhow!("process_message: {e:?}"))?
        .into_content())
}

fn raw_process_commit(provider: &OpenMlsRustCrypto, group: &mut MlsGroup, commit: &[u8]) -> anyhow::Result<()> {
    match raw_process(provider, group, commit)? {
        ProcessedMessageContent::StagedCommitMessage(staged) => group
            .merge_staged_commit(provider, *staged)
            .map_err(|e| anyhow!("merge_staged_commit: {e:?}")),
        _ => bail!("expected a commit"),
    }
}

fn raw_join(kind: RawKind, provider: &OpenMlsRustCrypto, welcome: &[u8]) -> anyhow::Result<MlsGroup> {
    let welcome = match decode(welcome)?.extract() {
        MlsMessageBodyIn::Welcome(w) => w,
        _ => bail!("not a Welcome"),
    };
    StagedWelcome::new_from_welcome(provider, &kind.join_config(), welcome, None)
        .map_err(|e| anyhow!("staging the Welcome: {e:?}"))?
        .into_group(provider)
        .map_err(|e| anyhow!("joining: {e:?}"))
}

struct RawVariant<S> {
    kind: RawKind,
    owner: RawDevice<S>,
    owner_group: MlsGroup,
    member_provider: OpenMlsRustCrypto,
    member_group: MlsGroup,
    gid: Vec<u8>,
}

/// Builds the raw variant's group of `n` members.
fn build_raw(
    kind: RawKind,
    n: usize,
    fillers: &[Vec<u8>],
    now: u64,
) -> anyhow::Result<RawVariant<impl Signer + use<>>> {
    let owner = raw_device(&Id::new(now));
    let member = raw_device(&Id::new(now));
    let config = kind.create_config();
    let mut og = MlsGroup::new(&owner.provider, &owner.signer, &config, owner.credential.clone())
        .map_err(|e| anyhow!("MlsGroup::new: {e:?}"))?;
    let mut mg: Option<MlsGroup> = None;
    for batch in setup_batches(n, member.key_package()?, fillers)? {
        let (commit, welcome) = raw_add(kind, &owner, &mut og, &batch)?;
        og.merge_pending_commit(&owner.provider)
            .map_err(|e| anyhow!("merge_pending_commit: {e:?}"))?;
        match mg.as_mut() {
            None => mg = Some(raw_join(kind, &member.provider, &welcome)?),
            Some(g) => raw_process_commit(&member.provider, g, &commit)?,
        }
    }
    if og.members().count() != n {
        bail!("the group has {} members, not {n}", og.members().count());
    }
    Ok(RawVariant {
        kind,
        gid: og.group_id().as_slice().to_vec(),
        owner,
        owner_group: og,
        member_provider: member.provider,
        member_group: mg.context("the member never joined")?,
    })
}

impl<S: Signer> Variant for RawVariant<S> {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn state_bytes(&self) -> Option<(usize, usize)> {
        let values = self.owner.provider.storage().values.read().ok()?;
        let row = |label: &[u8]| -> usize {
            values
                .iter()
                .filter(|(k, _)| k.starts_with(label))
                .map(|(_, v)| v.len())
                .sum()
        };
        Some((row(b"MessageSecrets"), row(b"Tree")))
    }

    fn rep(&mut self, messages: usize, payload: &[u8], now: u64) -> anyhow::Result<RepSample> {
        let size_before = self.owner_group.members().count();
        let newcomer = raw_device(&Id::new(now));
        let kp = newcomer.key_package()?;
        let (owner, og) = (&self.owner, &mut self.owner_group);
        let (mp, mg) = (&self.member_provider, &mut self.member_group);

        let t = Instant::now();
        let (commit, welcome) = raw_add(self.kind, owner, og, &[kp])?;
        let commit_ms = elapsed_ms(t);

        let t = Instant::now();
        og.merge_pending_commit(&owner.provider)
            .map_err(|e| anyhow!("merge_pending_commit: {e:?}"))?;
        let merge_ms = elapsed_ms(t);

        let t = Instant::now();
        raw_process_commit(mp, mg, &commit)?;
        let member_ms = elapsed_ms(t);

        let t = Instant::now();
        raw_join(self.kind, &newcomer.provider, &welcome)?;
        let join_ms = elapsed_ms(t);
        if og.epoch() != mg.epoch() {
            bail!("the adder and the member disagree on the epoch");
        }

        let (encrypt_us, decrypt_us, ct) = message_rounds(
            messages,
            payload,
            || {
                og.create_message(&owner.provider, &owner.signer, payload)
                    .map_err(|e| anyhow!("create_message: {e:?}"))?
                    .to_bytes()
                    .map_err(|e| anyhow!("encoding: {e:?}"))
            },
            |ct| match raw_process(mp, mg, ct)? {
                ProcessedMessageContent::ApplicationMessage(app) => Ok(app.into_bytes()),
                _ => bail!("expected an application message"),
            },
        )?;
        Ok(RepSample {
            commit_ms,
            merge_ms,
            member_ms,
            join_ms,
            join_refused: false,
            commit_bytes: commit.len(),
            welcome_bytes: welcome.len(),
            message_bytes: ct.len(),
            envelope_bytes: envelope_bytes(&self.gid, ct),
            encrypt_us,
            decrypt_us,
            size_before,
        })
    }
}

// ------------------------------------------------------------------ report

/// Median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

impl Stat {
    fn of(v: &[f64]) -> Self {
        Self {
            median: median(v),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "median": self.median, "min": self.min, "max": self.max })
    }
}

/// The figures of one variant at one size.
struct Figures {
    name: &'static str,
    commit_ms: Stat,
    merge_ms: Stat,
    /// Commit plus merge: until the adder is in the new epoch.
    adder_ms: Stat,
    member_ms: Stat,
    join_ms: Stat,
    join_refused: bool,
    encrypt_us: Stat,
    decrypt_us: Stat,
    commit_bytes: usize,
    welcome_bytes: usize,
    message_bytes: usize,
    envelope_bytes: usize,
    sizes: (usize, usize),
    /// See [`Variant::state_bytes`].
    state_bytes: Option<(usize, usize)>,
}

impl Figures {
    fn of(name: &'static str, s: &[RepSample]) -> Self {
        let col = |f: fn(&RepSample) -> f64| Stat::of(&s.iter().map(f).collect::<Vec<_>>());
        let all =
            |f: fn(&RepSample) -> &Vec<f64>| Stat::of(&s.iter().flat_map(|r| f(r).iter().copied()).collect::<Vec<_>>());
        let last = s.last();
        Self {
            name,
            commit_ms: col(|r| r.commit_ms),
            merge_ms: col(|r| r.merge_ms),
            adder_ms: col(|r| r.commit_ms + r.merge_ms),
            member_ms: col(|r| r.member_ms),
            join_ms: col(|r| r.join_ms),
            join_refused: s.iter().any(|r| r.join_refused),
            encrypt_us: all(|r| &r.encrypt_us),
            decrypt_us: all(|r| &r.decrypt_us),
            commit_bytes: last.map_or(0, |r| r.commit_bytes),
            welcome_bytes: last.map_or(0, |r| r.welcome_bytes),
            message_bytes: last.map_or(0, |r| r.message_bytes),
            envelope_bytes: last.map_or(0, |r| r.envelope_bytes),
            sizes: (
                s.first().map_or(0, |r| r.size_before),
                last.map_or(0, |r| r.size_before + 1),
            ),
            state_bytes: None,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "add_commit_ms": self.commit_ms.json(),
            "add_merge_own_ms": self.merge_ms.json(),
            "add_adder_total_ms": self.adder_ms.json(),
            "add_member_process_ms": self.member_ms.json(),
            "add_join_ms": self.join_ms.json(),
            "join_refused_as_too_large": self.join_refused,
            "message_encrypt_us": self.encrypt_us.json(),
            "message_receive_us": self.decrypt_us.json(),
            "commit_bytes": self.commit_bytes,
            "welcome_bytes": self.welcome_bytes,
            "message_bytes": self.message_bytes,
            "envelope_bytes": self.envelope_bytes,
            "group_size_first_add": self.sizes.0,
            "group_size_after_last_add": self.sizes.1,
            "adder_message_secrets_row_bytes": self.state_bytes.map(|s| s.0),
            "adder_tree_row_bytes": self.state_bytes.map(|s| s.1),
        })
    }
}

struct SizeResult {
    n: usize,
    reps: usize,
    messages: usize,
    /// Durable commit of one small row right after the size's repetitions:
    /// (median, min) in ms.
    commit_probe_ms: (f64, f64),
    /// Indexed by [`RAW`], [`RAW_LIKE`], [`ENGINE`], [`REDB_MEM`], [`REDB_FILE`].
    figures: Vec<Figures>,
}

/// Positions of the variants in every per-size list.
const RAW: usize = 0;
const RAW_LIKE: usize = 1;
const ENGINE: usize = 2;
const REDB_MEM: usize = 3;
const REDB_FILE: usize = 4;

type Pick = fn(&Figures) -> Stat;

const OPS: [(&str, &str, Pick); 7] = [
    ("add: commit (adder)", "ms", |f| f.commit_ms),
    ("add: merge own commit (adder)", "ms", |f| f.merge_ms),
    ("add: adder total", "ms", |f| f.adder_ms),
    ("add: process commit (member)", "ms", |f| f.member_ms),
    ("add: join from Welcome", "ms", |f| f.join_ms),
    ("message: encrypt (sender)", "µs", |f| f.encrypt_us),
    ("message: receive (member)", "µs", |f| f.decrypt_us),
];

impl SizeResult {
    fn raw(&self) -> &Figures {
        &self.figures[RAW]
    }

    fn print(&self) {
        let (from, to) = self.raw().sizes;
        println!(
            "size {} ({} adds per variant, the group growing {from} → {to}; {} messages after each add)",
            self.n, self.reps, self.messages
        );
        print!("{:<30}", "median (min–max)");
        for f in &self.figures {
            print!("  {:>22}", f.name);
        }
        println!("  {:>8}  {:>9}  {:>9}", "file/raw", "file/like", "eng/like");
        println!("{}", "-".repeat(30 + 24 * self.figures.len() + 34));
        for (name, unit, pick) in OPS {
            print!("{:<30}", format!("{name} [{unit}]"));
            for f in &self.figures {
                let s = pick(f);
                let star = if name.contains("join") && f.join_refused {
                    "*"
                } else {
                    ""
                };
                let cell = format!("{}{star} ({}–{})", fmt(s.median), fmt(s.min), fmt(s.max));
                print!("  {cell:>22}");
            }
            let ratio =
                |a: usize, b: usize| format!("{:.2}×", pick(&self.figures[a]).median / pick(&self.figures[b]).median);
            println!(
                "  {:>8}  {:>9}  {:>9}",
                ratio(REDB_FILE, RAW),
                ratio(REDB_FILE, RAW_LIKE),
                ratio(ENGINE, RAW_LIKE)
            );
        }
        for (what, pick) in [
            ("commit bytes", (|f| f.commit_bytes) as fn(&Figures) -> usize),
            ("Welcome bytes", |f| f.welcome_bytes),
            ("message bytes (MLS)", |f| f.message_bytes),
            ("message envelope bytes", |f| f.envelope_bytes),
        ] {
            print!("{what:<30}");
            for f in &self.figures {
                print!("  {:>22}", pick(f));
            }
            println!();
        }
        for (what, pick) in [
            ("adder's MessageSecrets row", (|s| s.0) as fn((usize, usize)) -> usize),
            ("adder's Tree row", |s| s.1),
        ] {
            print!("{what:<30}");
            for f in &self.figures {
                print!(
                    "  {:>22}",
                    f.state_bytes.map_or("-".to_owned(), |s| pick(s).to_string())
                );
            }
            println!();
        }
        println!(
            "a durable redb commit of one small row took {:.3} ms right after these figures (median of {COMMIT_PROBES}; min {:.3} ms)",
            self.commit_probe_ms.0, self.commit_probe_ms.1
        );
        if self.figures.iter().any(|f| f.join_refused) {
            println!(
                "* MlsEngine::join refused the Welcome: it is larger than MAX_MLS_MESSAGE ({MAX_MLS_MESSAGE} bytes); \
                 the figure times the same steps with that limit lifted"
            );
        }
    }
}

/// Three significant digits or so.
fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The targets at the size they are stated for, checked against the
/// redb-file variant (what a node pays), with the other variants alongside.
fn print_targets(results: &[SizeResult]) {
    let Some(at) = results.iter().find(|r| r.n == TARGET_SIZE) else {
        println!("(targets are stated at {TARGET_SIZE} members, which was not measured)");
        return;
    };
    println!("targets at {TARGET_SIZE} members (medians, ms; the verdict is for redb-file):");
    println!(
        "  {:<30} {:>10} {:>10} {:>10} {:>10} {:>10}  {:<9} result",
        "", "redb-file", "redb-mem", "engine", "raw-like", "raw", "target"
    );
    for (name, pick, target) in [
        (
            "add: adder (commit + merge)",
            (|f| f.adder_ms.median) as fn(&Figures) -> f64,
            TARGET_ADD_MS,
        ),
        ("add: member processes commit", |f| f.member_ms.median, TARGET_ADD_MS),
        ("add: newcomer joins", |f| f.join_ms.median, TARGET_ADD_MS),
        ("message: sender cost", |f| f.encrypt_us.median / 1000.0, TARGET_SEND_MS),
    ] {
        let v = |i: usize| pick(&at.figures[i]);
        println!(
            "  {name:<30} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}  ≤ {:<7} {}",
            v(REDB_FILE),
            v(REDB_MEM),
            v(ENGINE),
            v(RAW_LIKE),
            v(RAW),
            target,
            if v(REDB_FILE) <= target { "MET" } else { "MISSED" }
        );
    }
}

fn to_json(machine: &Machine, counts: &Counts, results: &[SizeResult]) -> serde_json::Value {
    use serde_json::json;
    json!({
        "machine": {
            "cpu": machine.cpu,
            "cores": machine.cores,
            "memory_total_mb": machine.mem_total_mb,
            "kernel": machine.kernel,
            "load_average": machine.load,
            "durable_commit_ms": { "median": machine.commit_ms, "min": machine.commit_min_ms },
            "release_build": !cfg!(debug_assertions),
        },
        "setup": {
            "ciphersuite": "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519",
            "ratchet_tree_extension": true,
            "setup_batch": SETUP_BATCH,
            "message_bytes": MESSAGE_BYTES,
            "messages_per_rep": counts.messages,
            "max_mls_message": MAX_MLS_MESSAGE,
            "variants": {
                "raw": "plain openmls (default config, add_members, which forces an UpdatePath) on OpenMlsRustCrypto memory storage; commit includes decoding and validating the key package",
                "raw-like": "openmls with the engine's settings (5 past epochs, the engine's sender ratchet, add commits without a forced UpdatePath) on OpenMlsRustCrypto memory storage",
                "engine": "MlsEngine on OpenMlsRustCrypto memory storage",
                "redb-mem": "MlsEngine on the node's redb provider, in-memory database, one Store::unit per operation",
                "redb-file": "MlsEngine on the node's redb provider, database file, one durable Store::unit per operation",
            },
        },
        "targets": {
            "at_size": TARGET_SIZE,
            "add_each_ms": TARGET_ADD_MS,
            "send_ms": TARGET_SEND_MS,
        },
        "sizes": results.iter().map(|r| {
            let ratios = |f: &Figures, base: &Figures| {
                let mut m = serde_json::Map::new();
                for (name, _, pick) in OPS {
                    m.insert(name.to_owned(), json!(pick(f).median / pick(base).median));
                }
                serde_json::Value::Object(m)
            };
            json!({
                "n": r.n,
                "reps": r.reps,
                "durable_commit_ms_after": { "median": r.commit_probe_ms.0, "min": r.commit_probe_ms.1 },
                "variants": r.figures.iter().map(|f| (f.name.to_owned(), f.json())).collect::<serde_json::Map<_, _>>(),
                "ratio_to_raw": r.figures.iter().skip(1).map(|f| (f.name.to_owned(), ratios(f, r.raw()))).collect::<serde_json::Map<_, _>>(),
                "ratio_to_raw_like": r.figures.iter().skip(2).map(|f| (f.name.to_owned(), ratios(f, &r.figures[RAW_LIKE]))).collect::<serde_json::Map<_, _>>(),
            })
        }).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_batches_grow_the_group_to_its_size() {
        let fillers: Vec<Vec<u8>> = (0..500u16).map(|i| i.to_be_bytes().to_vec()).collect();
        for n in [2, 3, SETUP_BATCH, SETUP_BATCH + 1, 450] {
            let batches = setup_batches(n, b"member".to_vec(), &fillers).unwrap();
            assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), n - 1, "size {n}");
            assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= SETUP_BATCH));
            assert_eq!(batches[0][0], b"member");
        }
        assert!(setup_batches(503, b"member".to_vec(), &fillers).is_err());
    }

    #[test]
    fn a_small_run_writes_every_variant() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("groups.json");
        let args = BenchGroupsArgs {
            sizes: Some(vec![2, 5]),
            reps: Some(1),
            messages: Some(2),
            json: Some(json.clone()),
            quick: true,
        };
        run_blocking(&args).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let sizes = v["sizes"].as_array().unwrap();
        assert_eq!(sizes.len(), 2);
        for s in sizes {
            for name in ["raw", "raw-like", "engine", "redb-mem", "redb-file"] {
                let f = &s["variants"][name];
                assert!(f["add_join_ms"]["median"].as_f64().unwrap() > 0.0, "{name}");
                assert_eq!(f["message_bytes"], s["variants"]["raw"]["message_bytes"], "{name}");
                assert_eq!(f["join_refused_as_too_large"], false);
            }
        }
        assert_eq!(sizes[1]["variants"]["redb-file"]["group_size_after_last_add"], 6);
    }
}
