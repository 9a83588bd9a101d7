//! Groups over real openmls, with commits ordered by a sequencer the way a
//! group's first relay orders them: every member applies the first valid
//! commit of each epoch, a losing committer re-applies its intent, and no
//! schedule of concurrent commits and delays forks the group.

use openmls::prelude::MlsGroup;
use openmls_rust_crypto::OpenMlsRustCrypto;
use tidings_protocol::group::{GroupMeta, Intent, Role};
use tidings_protocol::identity::{AccountKey, DeviceCertificate, DeviceKey};
use tidings_protocol::mls::{MlsEngine, Sequenced, StagedIntent, signature_keys_from_seed};

const NOW: u64 = 1_800_000_000_000;

/// A small deterministic generator (splitmix64), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct Device {
    account: AccountKey,
    cert: DeviceCertificate,
    engine: MlsEngine,
    provider: OpenMlsRustCrypto,
    group: Option<MlsGroup>,
    /// Next sequence index to process.
    cursor: usize,
    /// Our commit waiting for its epoch, and the intent it carries.
    pending: Option<(StagedIntent, Intent)>,
    /// An intent whose commit lost; re-applied on the next chance.
    retry: Option<Intent>,
    removed: bool,
}

impl Device {
    fn new(n: u8) -> Self {
        let account = AccountKey::from_seed([n; 32]);
        let device = DeviceKey::from_seed([n.wrapping_add(100); 32]);
        let mls_seed = [n.wrapping_add(200); 32];
        let signer = signature_keys_from_seed(mls_seed);
        let cert = account.certify_device(&device.public(), signer.public(), NOW - 1000, NOW + 1_000_000_000);
        let engine = MlsEngine::new(mls_seed, &cert).unwrap();
        Self {
            account,
            cert,
            engine,
            provider: OpenMlsRustCrypto::default(),
            group: None,
            cursor: 0,
            pending: None,
            retry: None,
            removed: false,
        }
    }

    fn key_package(&self) -> Vec<u8> {
        self.engine.key_package(&self.provider, false).unwrap()
    }

    fn active(&self) -> bool {
        self.group.is_some() && !self.removed
    }

    fn epoch(&self) -> u64 {
        self.group.as_ref().map_or(0, |g| g.epoch().as_u64())
    }

    /// Commits `intent` on the current epoch; returns the commit for the sequencer.
    fn commit(&mut self, intent: Intent) -> Option<Vec<u8>> {
        let group = self.group.as_mut()?;
        match self.engine.commit_intent(&self.provider, group, &intent, NOW) {
            Ok(Some(staged)) => {
                let bytes = staged.commit.clone();
                self.pending = Some((staged, intent));
                Some(bytes)
            }
            Ok(None) => None,
            Err(e) => panic!("commit_intent failed: {e}"),
        }
    }
}

/// The sequence of one group, as its first relay keeps it.
#[derive(Default)]
struct World {
    devices: Vec<Device>,
    log: Vec<Vec<u8>>,
    /// Messages on their way to the sequencer: (due step, bytes).
    in_flight: Vec<(u64, Vec<u8>)>,
    /// Welcomes waiting for their commit to win: (commit bytes, welcome).
    welcomes: Vec<(Vec<u8>, Vec<u8>)>,
    step: u64,
    /// Commits refused by some member (must stay 0 for honest members).
    refused: usize,
    /// Commits of ours that won, and that lost, their epoch.
    won: usize,
    lost: usize,
}

impl World {
    fn with_devices(n: u8) -> Self {
        Self {
            devices: (1..=n).map(Device::new).collect(),
            ..Self::default()
        }
    }

    fn account(&self, d: usize) -> [u8; 32] {
        *self.devices[d].account.id().as_bytes()
    }

    /// Device `owner` creates the group and adds `members` through the sequencer.
    fn create(&mut self, owner: usize, admins: &[usize], members: &[usize]) {
        let mut meta = GroupMeta::new(
            "group",
            &self.devices[owner].account.id(),
            vec!["relay".into()],
            [7; 32],
        );
        for a in admins {
            meta.roles.insert(self.account(*a), Role::Admin);
        }
        let d = &mut self.devices[owner];
        d.group = Some(
            d.engine
                .create_named_group(&d.provider, b"group-id-0000001", &meta)
                .unwrap(),
        );
        let kps: Vec<Vec<u8>> = members.iter().map(|m| self.devices[*m].key_package()).collect();
        let add = self.devices[owner].commit(Intent::Add(kps)).unwrap();
        self.sequence(add);
        for d in 0..self.devices.len() {
            self.process_all(d);
        }
    }

    fn sequence(&mut self, bytes: Vec<u8>) {
        self.log.push(bytes);
    }

    /// Device `d` processes everything the sequencer holds past its cursor.
    fn process_all(&mut self, d: usize) {
        while self.process_one(d) {}
    }

    /// Device `d` processes the next sequenced message, if any.
    fn process_one(&mut self, d: usize) -> bool {
        let dev = &mut self.devices[d];
        if !dev.active() || dev.cursor >= self.log.len() {
            return false;
        }
        let index = dev.cursor;
        let bytes = self.log[index].clone();
        dev.cursor += 1;
        let pending = dev.pending.as_ref().map(|(s, _)| s.commit.clone());
        let Some(group) = dev.group.as_mut() else { return false };
        let out = dev
            .engine
            .process_sequenced(&dev.provider, group, &bytes, pending.as_deref())
            .unwrap();
        match out {
            Sequenced::Commit {
                ours, lost, removed_us, ..
            } => {
                let mut welcome = None;
                self.won += usize::from(ours);
                self.lost += usize::from(lost);
                if ours {
                    let (staged, _) = dev.pending.take().unwrap();
                    welcome = staged.welcome;
                } else if lost {
                    let (_, intent) = dev.pending.take().unwrap();
                    dev.retry = Some(intent);
                }
                if removed_us {
                    dev.removed = true;
                    dev.pending = None;
                    dev.retry = None;
                }
                if let Some(w) = welcome {
                    self.welcomes.push((bytes, w));
                    self.deliver_welcomes(index);
                }
            }
            Sequenced::Refused(why) => {
                eprintln!("device {d} refused index {index}: {why}");
                self.refused += 1;
            }
            Sequenced::Stale | Sequenced::Own { .. } | Sequenced::Proposal | Sequenced::Application { .. } => {}
        }
        true
    }

    /// A Welcome goes out only once its commit won: the new devices join at
    /// the sequence position right after it.
    fn deliver_welcomes(&mut self, index: usize) {
        let ready: Vec<Vec<u8>> = self
            .welcomes
            .iter()
            .filter(|(c, _)| *c == self.log[index])
            .map(|(_, w)| w.clone())
            .collect();
        self.welcomes.retain(|(c, _)| *c != self.log[index]);
        for w in ready {
            for dev in self.devices.iter_mut().filter(|d| d.group.is_none()) {
                if let Ok(g) = dev.engine.join(&dev.provider, &w) {
                    dev.group = Some(g);
                    dev.cursor = index + 1;
                }
            }
        }
    }

    fn deliver_due(&mut self, rng: &mut Rng) {
        let mut due: Vec<Vec<u8>> = Vec::new();
        self.in_flight.retain(|(at, b)| {
            if *at <= self.step {
                due.push(b.clone());
                false
            } else {
                true
            }
        });
        // Messages due together reach the sequencer in any order.
        while !due.is_empty() {
            let i = rng.below(due.len());
            let b = due.swap_remove(i);
            self.sequence(b);
        }
    }

    /// The view every active member must share.
    fn views(&self) -> Vec<View> {
        self.devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.active())
            .map(|(i, d)| {
                let g = d.group.as_ref().unwrap();
                let mut members: Vec<[u8; 32]> = MlsEngine::members(g).iter().map(|c| c.device_key).collect();
                members.sort();
                (
                    i,
                    g.epoch().as_u64(),
                    g.epoch_authenticator().as_slice().to_vec(),
                    members,
                )
            })
            .collect()
    }
}

/// A device's view of the group: (device, epoch, epoch authenticator, member device keys).
type View = (usize, u64, Vec<u8>, Vec<[u8; 32]>);

fn assert_converged(w: &World, seed: u64) {
    let views = w.views();
    assert!(!views.is_empty());
    let (_, epoch, auth, members) = &views[0];
    for (i, e, a, m) in &views {
        assert_eq!(e, epoch, "seed {seed}: device {i} is at another epoch");
        assert_eq!(a, auth, "seed {seed}: device {i} forked (epoch authenticator differs)");
        assert_eq!(m, members, "seed {seed}: device {i} sees other members");
    }
    // Every device in the group's member list is an active member, and back.
    let active: Vec<[u8; 32]> = {
        let mut v: Vec<[u8; 32]> = views.iter().map(|(i, ..)| w.devices[*i].cert.device_key).collect();
        v.sort();
        v
    };
    assert_eq!(&active, members, "seed {seed}: member list and active devices differ");
}

#[test]
fn two_admins_adding_in_the_same_epoch_converge_and_the_loser_retries() {
    // 0 owner, 1 admin, 2 member; 3 and 4 are added concurrently.
    let mut w = World::with_devices(5);
    w.create(0, &[1], &[1, 2]);
    let epoch = w.devices[0].epoch();
    let kp3 = w.devices[3].key_package();
    let kp4 = w.devices[4].key_package();
    let c0 = w.devices[0].commit(Intent::Add(vec![kp3])).unwrap();
    let c1 = w.devices[1].commit(Intent::Add(vec![kp4])).unwrap();
    // Both commit on the same epoch; the sequencer sees device 1's first.
    w.sequence(c1);
    w.sequence(c0);
    for d in 0..3 {
        w.process_all(d);
    }
    assert_eq!(w.devices[0].epoch(), epoch + 1, "one commit won epoch {epoch}");
    assert!(w.devices[3].group.is_none(), "the losing add's Welcome was never sent");
    assert!(w.devices[4].group.is_some());
    // The loser re-applies its intent on the new epoch, and it lands.
    let intent = w.devices[0].retry.take().expect("device 0 knows its commit lost");
    let again = w.devices[0].commit(intent).unwrap();
    w.sequence(again);
    for d in 0..5 {
        w.process_all(d);
    }
    assert!(w.devices[3].active());
    assert_eq!(w.devices[0].epoch(), epoch + 2);
    assert_converged(&w, 0);
    assert_eq!(w.refused, 0);
}

#[test]
fn a_member_who_is_not_an_admin_cannot_add_or_remove_others() {
    let mut w = World::with_devices(4);
    w.create(0, &[], &[1, 2]);
    let kp = w.devices[3].key_package();
    let d1 = &mut w.devices[1];
    let g = d1.group.as_mut().unwrap();
    let add = d1.engine.commit_intent(&d1.provider, g, &Intent::Add(vec![kp]), NOW);
    assert!(add.is_err(), "refused before anything is sent");
    let other = w.devices[2].cert.device_key;
    let d1 = &mut w.devices[1];
    let g = d1.group.as_mut().unwrap();
    assert!(
        d1.engine
            .commit_intent(&d1.provider, g, &Intent::Remove(vec![other]), NOW)
            .is_err()
    );
}

#[test]
fn a_removed_member_cannot_decrypt_what_is_sent_after_removal() {
    let mut w = World::with_devices(3);
    w.create(0, &[], &[1, 2]);
    let victim = w.devices[2].cert.device_key;
    let seed_before = MlsEngine::group_meta(w.devices[0].group.as_ref().unwrap())
        .unwrap()
        .inbox_seed;
    let rm = w.devices[0].commit(Intent::Remove(vec![victim])).unwrap();
    w.sequence(rm);
    // The removed device keeps its old group state (it never processes the
    // removal), which is the strongest position it can be in.
    w.process_all(0);
    w.process_all(1);
    let seed_after = MlsEngine::group_meta(w.devices[1].group.as_ref().unwrap())
        .unwrap()
        .inbox_seed;
    assert_ne!(
        seed_before, seed_after,
        "the group moved to an inbox the removed device cannot derive"
    );
    let d0 = &mut w.devices[0];
    let g0 = d0.group.as_mut().unwrap();
    let secret = d0.engine.encrypt(&d0.provider, g0, b"after the removal").unwrap();
    let d1 = &mut w.devices[1];
    let g1 = d1.group.as_mut().unwrap();
    match d1.engine.process_sequenced(&d1.provider, g1, &secret, None).unwrap() {
        Sequenced::Application { plaintext, .. } => assert_eq!(plaintext, b"after the removal"),
        other => panic!("a member reads it: {other:?}"),
    }
    let d2 = &mut w.devices[2];
    let g2 = d2.group.as_mut().unwrap();
    assert!(matches!(
        d2.engine.process_sequenced(&d2.provider, g2, &secret, None).unwrap(),
        Sequenced::Refused(_)
    ));
    // And once it processes the removal, it knows it is out.
    w.process_all(2);
    assert!(w.devices[2].removed);
}

#[test]
fn a_member_offline_across_ten_epochs_catches_up_and_reads_everything() {
    let mut w = World::with_devices(3);
    w.create(0, &[1], &[1, 2]);
    let mut sent = Vec::new();
    for i in 0..10 {
        let who = i % 2;
        let c = w.devices[who].commit(Intent::SelfUpdate).unwrap();
        w.sequence(c);
        w.process_all(0);
        w.process_all(1);
        let d = &mut w.devices[who];
        let g = d.group.as_mut().unwrap();
        let text = format!("message in epoch {}", g.epoch().as_u64());
        w.log.push(d.engine.encrypt(&d.provider, g, text.as_bytes()).unwrap());
        sent.push(text);
        w.process_all(0);
        w.process_all(1);
    }
    // Device 2 was away for all of it; it processes the sequence in order.
    let start = w.devices[2].epoch();
    let mut read = Vec::new();
    let d = &mut w.devices[2];
    while d.cursor < w.log.len() {
        let bytes = w.log[d.cursor].clone();
        d.cursor += 1;
        let g = d.group.as_mut().unwrap();
        if let Sequenced::Application { plaintext, .. } =
            d.engine.process_sequenced(&d.provider, g, &bytes, None).unwrap()
        {
            read.push(String::from_utf8(plaintext).unwrap());
        }
    }
    assert_eq!(w.devices[2].epoch(), start + 10);
    assert_eq!(read, sent);
    assert_converged(&w, 0);
}

#[test]
fn concurrent_commits_with_random_timings_never_fork_the_group() {
    let (mut won, mut lost, mut removed, mut joined) = (0, 0, 0, 0);
    for seed in 0..60 {
        let w = run_random_schedule(seed);
        won += w.won;
        lost += w.lost;
        removed += w.devices.iter().filter(|d| d.removed).count();
        joined += w.devices[7..].iter().filter(|d| d.group.is_some()).count();
    }
    eprintln!(
        "60 schedules: {won} commits won their epoch, {lost} lost and were retried, {joined} joins, {removed} removals"
    );
    // The schedules really raced: commits lost their epoch and were re-applied.
    assert!(lost > 60, "too few races to mean anything: {lost}");
    assert!(joined > 0 && removed > 0);
}

fn run_random_schedule(seed: u64) -> World {
    let mut rng = Rng(seed);
    // 0 owner, 1 and 2 admins, 3..6 members, 7..9 join later.
    let mut w = World::with_devices(10);
    w.create(0, &[1, 2], &[1, 2, 3, 4, 5, 6]);
    let mut joiners: Vec<usize> = vec![7, 8, 9];
    for _ in 0..120 {
        w.step += 1;
        match rng.below(4) {
            0 => {
                // Someone with nothing pending starts a change.
                let d = rng.below(w.devices.len());
                if !w.devices[d].active() || w.devices[d].pending.is_some() {
                    continue;
                }
                let role = {
                    let g = w.devices[d].group.as_ref().unwrap();
                    MlsEngine::group_meta(g).unwrap().role(&w.account(d))
                };
                let intent = match (w.devices[d].retry.take(), rng.below(4)) {
                    (Some(i), _) => i,
                    (None, 0) if role >= Role::Admin && !joiners.is_empty() => {
                        let j = joiners.remove(rng.below(joiners.len()));
                        Intent::Add(vec![w.devices[j].key_package()])
                    }
                    (None, 1) if role >= Role::Admin => {
                        // Remove a plain member (never the last few).
                        let candidates: Vec<usize> = (3..w.devices.len())
                            .filter(|i| w.devices[*i].active() && *i != d)
                            .collect();
                        if candidates.len() < 3 {
                            continue;
                        }
                        Intent::Remove(vec![w.devices[candidates[rng.below(candidates.len())]].cert.device_key])
                    }
                    (None, 2) if role >= Role::Admin => {
                        let mut meta = MlsEngine::group_meta(w.devices[d].group.as_ref().unwrap()).unwrap();
                        meta.name = format!("renamed by {d} at {}", w.step);
                        Intent::SetMeta(meta)
                    }
                    _ => Intent::SelfUpdate,
                };
                if let Some(c) = w.devices[d].commit(intent) {
                    let delay = rng.below(6) as u64;
                    w.in_flight.push((w.step + delay, c));
                }
            }
            1 => w.deliver_due(&mut rng),
            _ => {
                let d = rng.below(w.devices.len());
                for _ in 0..1 + rng.below(4) {
                    w.process_one(d);
                }
            }
        }
    }
    // Quiesce: deliver everything, let everyone catch up, re-apply lost
    // intents, until nothing is left in flight or pending.
    for _ in 0..200 {
        w.step += 100;
        w.deliver_due(&mut rng);
        for d in 0..w.devices.len() {
            w.process_all(d);
        }
        let mut busy = !w.in_flight.is_empty();
        for d in 0..w.devices.len() {
            if !w.devices[d].active() {
                continue;
            }
            if w.devices[d].pending.is_some() {
                busy = true;
            }
            if let Some(intent) = w.devices[d].retry.take()
                && let Some(c) = w.devices[d].commit(intent)
            {
                w.in_flight.push((w.step, c));
                busy = true;
            }
        }
        if !busy {
            break;
        }
    }
    assert!(w.in_flight.is_empty(), "seed {seed}: did not quiesce");
    assert_converged(&w, seed);
    assert_eq!(w.refused, 0, "seed {seed}: an honest commit was refused");
    w
}

#[test]
fn commits_from_a_removed_member_or_for_a_past_epoch_change_nothing() {
    let mut w = World::with_devices(4);
    w.create(0, &[1], &[1, 2, 3]);
    // Device 3 is removed; it never processes that, and commits on its old state.
    let victim = w.devices[3].cert.device_key;
    let rm = w.devices[0].commit(Intent::Remove(vec![victim])).unwrap();
    w.sequence(rm);
    for d in 0..3 {
        w.process_all(d);
    }
    let late = w.devices[3].commit(Intent::SelfUpdate).unwrap();
    w.sequence(late);
    // (It is out; only the remaining members' views must agree.)
    w.devices[3].removed = true;
    let before = w.views();
    // And a commit from device 1 made before it saw the removal (a past epoch).
    let d1 = &mut w.devices[1];
    let g1 = d1.group.as_mut().unwrap();
    let epoch = g1.epoch().as_u64();
    let stale_bytes = w.log[w.log.len() - 2].clone();
    assert!(matches!(
        d1.engine
            .process_sequenced(&d1.provider, g1, &stale_bytes, None)
            .unwrap(),
        Sequenced::Stale
    ));
    assert_eq!(g1.epoch().as_u64(), epoch);
    for d in 0..3 {
        w.process_all(d);
    }
    assert_eq!(w.views(), before, "the removed member's commit changed nothing");
    assert_converged(&w, 0);
}

#[test]
fn garbage_and_malformed_key_packages_are_refused_and_the_group_is_unchanged() {
    let mut w = World::with_devices(3);
    w.create(0, &[], &[1, 2]);
    let before = w.views();
    let d0 = &mut w.devices[0];
    let g0 = d0.group.as_mut().unwrap();
    for bad in [vec![], vec![0xff; 300], b"not a key package".to_vec()] {
        assert!(
            d0.engine
                .commit_intent(&d0.provider, g0, &Intent::Add(vec![bad]), NOW)
                .is_err()
        );
    }
    // A key package cut short.
    let kp = w.devices[2].key_package();
    let d0 = &mut w.devices[0];
    let g0 = d0.group.as_mut().unwrap();
    assert!(
        d0.engine
            .commit_intent(&d0.provider, g0, &Intent::Add(vec![kp[..kp.len() / 2].to_vec()]), NOW)
            .is_err()
    );
    assert!(g0.pending_commit().is_none());
    // Garbage in the sequence is ignored by every member.
    w.sequence(vec![0x00, 0x01, 0x02]);
    w.sequence(vec![0xff; 5000]);
    for d in 0..3 {
        w.process_all(d);
    }
    assert_eq!(w.refused, 6, "two garbage entries, refused by each of three members");
    assert_eq!(w.views(), before);
}

#[test]
fn a_withheld_commit_sent_again_later_still_lands_or_is_stale() {
    let mut w = World::with_devices(3);
    w.create(0, &[1], &[1, 2]);
    // Device 1's commit is withheld by the relay; device 0 commits meanwhile.
    let withheld = w.devices[1].commit(Intent::SelfUpdate).unwrap();
    let c0 = w.devices[0].commit(Intent::SelfUpdate).unwrap();
    w.sequence(c0);
    for d in 0..3 {
        w.process_all(d);
    }
    // Device 1 learnt its commit lost; the relay now releases the old copy.
    assert!(w.devices[1].retry.is_some());
    w.sequence(withheld);
    for d in 0..3 {
        w.process_all(d);
    }
    let intent = w.devices[1].retry.take().unwrap();
    let again = w.devices[1].commit(intent).unwrap();
    w.sequence(again);
    for d in 0..3 {
        w.process_all(d);
    }
    assert_eq!(w.refused, 0);
    assert_converged(&w, 0);
    assert_eq!(w.devices[0].epoch(), w.devices[2].epoch());
}

#[test]
fn a_replayed_application_message_is_refused_the_second_time() {
    let mut w = World::with_devices(2);
    w.create(0, &[], &[1]);
    let d0 = &mut w.devices[0];
    let g0 = d0.group.as_mut().unwrap();
    let msg = d0.engine.encrypt(&d0.provider, g0, b"once").unwrap();
    let d1 = &mut w.devices[1];
    let g1 = d1.group.as_mut().unwrap();
    assert!(matches!(
        d1.engine.process_sequenced(&d1.provider, g1, &msg, None).unwrap(),
        Sequenced::Application { .. }
    ));
    assert!(matches!(
        d1.engine.process_sequenced(&d1.provider, g1, &msg, None).unwrap(),
        Sequenced::Refused(_)
    ));
}

#[test]
fn a_member_leaves_by_proposal_that_any_member_commits_and_proposes_again_if_it_lapses() {
    // 0 owner, 1 and 2 plain members; 2 leaves.
    let mut w = World::with_devices(3);
    w.create(0, &[], &[1, 2]);
    let d0 = &mut w.devices[0];
    assert!(
        d0.engine
            .propose_leave(&d0.provider, d0.group.as_mut().unwrap())
            .is_err(),
        "the owner hands the group over before leaving"
    );
    let seed_before = MlsEngine::group_meta(w.devices[0].group.as_ref().unwrap())
        .unwrap()
        .inbox_seed;

    // First try: the owner's self-update, made before it saw the proposal,
    // wins the epoch without it; the proposal lapses.
    let d2 = &mut w.devices[2];
    let leave = d2
        .engine
        .propose_leave(&d2.provider, d2.group.as_mut().unwrap())
        .unwrap();
    assert_eq!(leave.len(), 1, "one device, one proposal");
    let update = w.devices[0].commit(Intent::SelfUpdate).unwrap();
    for p in leave {
        w.sequence(p);
    }
    w.sequence(update);
    let refused_before = w.refused;
    for d in 0..3 {
        w.process_all(d);
    }
    assert!(w.devices[2].active(), "the proposal lapsed with the epoch");
    assert!(!MlsEngine::has_pending_proposals(w.devices[1].group.as_ref().unwrap()));

    // Second try: proposed again on the new epoch; the staying member with
    // the lowest leaf is first to commit, but any member may (here the plain
    // member 1, as if the owner were away).
    let d2 = &mut w.devices[2];
    for p in d2
        .engine
        .propose_leave(&d2.provider, d2.group.as_mut().unwrap())
        .unwrap()
    {
        w.sequence(p);
    }
    w.process_all(0);
    w.process_all(1);
    assert!(MlsEngine::first_to_commit_proposals(
        w.devices[0].group.as_ref().unwrap()
    ));
    assert!(!MlsEngine::first_to_commit_proposals(
        w.devices[1].group.as_ref().unwrap()
    ));
    let commit = w.devices[1].commit(Intent::CommitProposals).unwrap();
    w.sequence(commit);
    for d in 0..3 {
        w.process_all(d);
    }
    assert!(w.devices[2].removed, "the leaver learns it is out");
    assert_converged(&w, 0);
    let seed_after = MlsEngine::group_meta(w.devices[0].group.as_ref().unwrap())
        .unwrap()
        .inbox_seed;
    assert_ne!(seed_before, seed_after, "the leaver loses the group inbox too");
    assert_eq!(w.refused, refused_before, "nobody refused anything");
    // With nothing pending, committing proposals is nothing.
    let d1 = &mut w.devices[1];
    let none = d1
        .engine
        .commit_intent(&d1.provider, d1.group.as_mut().unwrap(), &Intent::CommitProposals, NOW)
        .unwrap();
    assert!(none.is_none());
}

#[test]
fn a_proposal_to_remove_someone_else_is_refused_and_never_committed() {
    let mut w = World::with_devices(3);
    w.create(0, &[1], &[1, 2]);
    // Device 1 (an admin) proposes removing device 2 instead of committing it.
    let leaf = MlsEngine::members(w.devices[1].group.as_ref().unwrap())
        .iter()
        .position(|c| c.device_key == w.devices[2].cert.device_key)
        .unwrap();
    let d1 = &mut w.devices[1];
    let signer = signature_keys_from_seed([201; 32]);
    let (msg, _) = d1
        .group
        .as_mut()
        .unwrap()
        .propose_remove_member(&d1.provider, &signer, openmls::prelude::LeafNodeIndex::new(leaf as u32))
        .unwrap();
    let bytes = openmls::prelude::tls_codec::Serialize::tls_serialize_detached(&msg).unwrap();
    let d0 = &mut w.devices[0];
    let out = d0
        .engine
        .process_sequenced(&d0.provider, d0.group.as_mut().unwrap(), &bytes, None)
        .unwrap();
    assert!(matches!(out, Sequenced::Refused(_)), "got {out:?}");
    assert!(!MlsEngine::has_pending_proposals(w.devices[0].group.as_ref().unwrap()));
}
