//! Joining an account as a new device (`tidings init --link <code>`).
//!
//! The new device makes its own device and MLS keys, connects to the device
//! that showed the code, proves it read the code, and receives a certificate
//! for its keys, the account key, the contacts and the history. The existing
//! device then adds it to every group of the account.

use std::path::Path;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use tidings_protocol::link::{LinkCode, link_proof};
use tidings_protocol::mls::signature_keys_from_seed;
use tidings_protocol::{AccountKey, DeviceCertificate, DeviceKey, pb};
use tidings_store::{Contact, Identity, StoredMessage};

use crate::clock::Clock;
use crate::net::{self, NetConfig, Network};
use crate::node::{open_store, random_seed};

/// Why joining an account failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkJoinError {
    #[error("{0}")]
    Code(#[from] tidings_protocol::link::LinkError),
    #[error("this data directory already holds an identity")]
    AlreadyInitialised,
    #[error("cannot reach the existing device: {0}")]
    Unreachable(String),
    #[error("the existing device refused: {0}")]
    Refused(String),
    #[error("the existing device answered with an invalid certificate")]
    BadCertificate,
    #[error("storage: {0}")]
    Store(#[from] tidings_store::StoreError),
    #[error("{0}")]
    Node(#[from] crate::NodeError),
}

/// What joining brought over.
#[derive(Debug, Clone)]
pub struct Joined {
    pub identity: Identity,
    pub relays: Vec<String>,
    pub contacts: usize,
    pub history: usize,
}

/// Joins the account of the device that showed `code`, creating this
/// device's identity in `data_dir`, sealed under `passphrase` if one is given.
pub async fn join_account(
    data_dir: &Path,
    code: &str,
    clock: &Clock,
    passphrase: Option<&str>,
) -> Result<Joined, LinkJoinError> {
    let code = LinkCode::parse(code, clock.now_ms())?;
    let peer = PeerId::from_bytes(&code.peer_id)
        .map_err(|_| LinkJoinError::Code(tidings_protocol::link::LinkError::Malformed))?;
    std::fs::create_dir_all(data_dir).map_err(|e| LinkJoinError::Unreachable(e.to_string()))?;
    let store = open_store(data_dir)?;
    if store.has_identity()? {
        return Err(LinkJoinError::AlreadyInitialised);
    }
    if let Some(p) = passphrase {
        store.set_passphrase(None, Some(p))?;
    }
    let (device_seed, mls_seed) = (random_seed()?, random_seed()?);
    let device = DeviceKey::from_seed(device_seed);
    let mls = signature_keys_from_seed(mls_seed);
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(device_seed)
        .map_err(|e| LinkJoinError::Unreachable(e.to_string()))?;
    let config = NetConfig {
        listen: Vec::new(),
        bootstrap: Vec::new(),
        dht_server: false,
        ..NetConfig::default()
    };
    let (net, mut events, _, task) = net::spawn(keypair, config, clock.clone(), None)
        .await
        .map_err(|e| LinkJoinError::Unreachable(e.to_string()))?;
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    for a in &code.addrs {
        if let Ok(addr) = a.parse::<Multiaddr>() {
            net.add_address(peer, addr).await;
        }
    }
    let proof = link_proof(&code.secret, &device.public(), mls.public()).to_vec();
    let request = |history: bool, after: u64| pb::LinkRequest {
        device_key: device.public().to_vec(),
        mls_signature_key: mls.public().to_vec(),
        proof: proof.clone(),
        history,
        history_after: after,
    };
    let result = run_join(&net, peer, &store, request, device_seed, mls_seed, clock).await;
    task.abort();
    result
}

async fn run_join(
    net: &Network,
    peer: PeerId,
    store: &tidings_store::Store,
    request: impl Fn(bool, u64) -> pb::LinkRequest,
    device_seed: [u8; 32],
    mls_seed: [u8; 32],
    clock: &Clock,
) -> Result<Joined, LinkJoinError> {
    let resp = call(net, peer, request(false, 0)).await?;
    let account_seed: [u8; 32] = resp
        .account_seed
        .as_slice()
        .try_into()
        .map_err(|_| LinkJoinError::BadCertificate)?;
    let now = clock.now_ms();
    let cert = DeviceCertificate::from_bytes(&resp.device_certificate).map_err(|_| LinkJoinError::BadCertificate)?;
    let account = AccountKey::from_seed(account_seed);
    if DeviceCertificate::verify(cert.wire(), now).is_err()
        || cert.account != account.id()
        || cert.device_key != DeviceKey::from_seed(device_seed).public()
        || cert.mls_signature_key != signature_keys_from_seed(mls_seed).public()
    {
        return Err(LinkJoinError::BadCertificate);
    }
    let identity = Identity {
        account_seed,
        device_seed,
        mls_seed,
        device_cert: cert.to_bytes(),
        name: resp.name.clone(),
        created_ms: now,
    };
    let mut contacts = 0;
    let mut history = 0;
    store.unit(|| -> Result<(), tidings_store::StoreError> {
        store.put_identity(&identity)?;
        store.put_own_devices(&resp.devices)?;
        for c in &resp.contacts {
            if let Ok(mut contact) = serde_json::from_slice::<Contact>(c) {
                // Conversations are the existing device's; ours come with Welcomes.
                contact.conversations.clear();
                store.put_contact(&contact)?;
                contacts += 1;
            }
        }
        Ok(())
    })?;
    // The history, page by page, over the same direct connection.
    let mut after = 0u64;
    loop {
        let page = call(net, peer, request(true, after)).await?;
        let rows: Vec<StoredMessage> = page
            .history
            .iter()
            .filter_map(|b| serde_json::from_slice(b).ok())
            .collect();
        after += page.history.len() as u64;
        store.unit(|| -> Result<(), tidings_store::StoreError> {
            for m in &rows {
                if store.insert_message(m)? {
                    history += 1;
                }
            }
            Ok(())
        })?;
        if !page.more || page.history.is_empty() {
            break;
        }
    }
    Ok(Joined {
        identity,
        relays: resp.relays,
        contacts,
        history,
    })
}

async fn call(net: &Network, peer: PeerId, request: pb::LinkRequest) -> Result<pb::LinkResponse, LinkJoinError> {
    let mut last = String::new();
    // The first dial can race the listener: a few quick tries.
    for _ in 0..5 {
        match net.link(peer, request.clone()).await {
            Ok(r) if r.error.is_empty() => return Ok(r),
            Ok(r) => return Err(LinkJoinError::Refused(r.error)),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(LinkJoinError::Unreachable(last))
}
