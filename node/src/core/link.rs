//! Answering a new device of our account (`/tidings/link/1`).
//!
//! `tidings device link` makes a one-time offer (a secret valid for a few
//! minutes, shown in the link code). A device that proves it read the code
//! gets a certificate for its keys, the account key, the contact list and,
//! page by page, the history. The first device key that uses an offer binds
//! it; nobody else can use it after that.

use libp2p::PeerId;
use tidings_protocol::AccountKey;
use tidings_protocol::link::verify_link_proof;
use tidings_protocol::pb;
use tracing::{info, warn};

use super::{Core, peer_id_of};

/// Most history rows in one link response.
const HISTORY_PAGE: usize = 500;

/// A link offer made by `tidings device link`.
#[derive(Debug, Clone)]
pub(crate) struct LinkOffer {
    pub secret: [u8; 16],
    pub expires_ms: u64,
    /// The device that used the offer first.
    pub bound: Option<[u8; 32]>,
}

/// The current offer, shared between the API side and the core.
pub(crate) type LinkOffers = std::sync::Arc<std::sync::Mutex<Option<LinkOffer>>>;

fn refuse(why: &str) -> pb::LinkResponse {
    pb::LinkResponse {
        error: why.to_owned(),
        ..Default::default()
    }
}

impl Core {
    pub(super) fn on_link(&mut self, peer: PeerId, req: pb::LinkRequest) -> pb::LinkResponse {
        let now = self.clock.now_ms();
        let Ok(device_key) = <[u8; 32]>::try_from(req.device_key.as_slice()) else {
            return refuse("bad device key");
        };
        if req.mls_signature_key.len() != 32 || peer_id_of(&device_key) != Some(peer) {
            return refuse("the keys do not match the connection");
        }
        {
            let mut offer = self.link.lock().unwrap_or_else(|p| p.into_inner());
            let Some(o) = offer.as_mut() else {
                return refuse("no link offer is open");
            };
            if now > o.expires_ms {
                return refuse("the link code has expired");
            }
            if !verify_link_proof(&o.secret, &req.device_key, &req.mls_signature_key, &req.proof) {
                warn!(%peer, "link request with a wrong proof");
                return refuse("wrong link code");
            }
            match o.bound {
                Some(d) if d != device_key => return refuse("the link code was used by another device"),
                _ => o.bound = Some(device_key),
            }
        }
        match self.link_answer(now, device_key, &req) {
            Ok(r) => r,
            Err(e) => {
                warn!("answering a link request failed: {e}");
                refuse("the existing device could not answer")
            }
        }
    }

    fn link_answer(
        &mut self,
        now: u64,
        device_key: [u8; 32],
        req: &pb::LinkRequest,
    ) -> Result<pb::LinkResponse, tidings_store::StoreError> {
        let identity = self.store.identity()?;
        if req.history {
            let (rows, more) = self.store.messages_page(req.history_after, HISTORY_PAGE)?;
            let history = rows.iter().filter_map(|m| serde_json::to_vec(m).ok()).collect();
            return Ok(pb::LinkResponse {
                history,
                more,
                ..Default::default()
            });
        }
        let account = AccountKey::from_seed(identity.account_seed);
        let cert = account.certify_device(
            &device_key,
            &req.mls_signature_key,
            now,
            now + crate::node::DEVICE_CERT_VALIDITY_MS,
        );
        let mut devices = self.store.own_devices()?;
        if devices.is_empty() {
            devices.push(identity.device_cert.clone());
        }
        if !devices.contains(&cert.to_bytes()) {
            devices.retain(|d| {
                tidings_protocol::DeviceCertificate::from_bytes(d).is_ok_and(|c| c.device_key != device_key)
            });
            devices.push(cert.to_bytes());
        }
        self.store.put_own_devices(&devices)?;
        self.mend_dirty = true;
        let contacts = self
            .store
            .list_contacts()?
            .iter()
            .filter_map(|c| serde_json::to_vec(c).ok())
            .collect();
        info!(device = %hex::encode(device_key), "linked a new device to this account");
        Ok(pb::LinkResponse {
            account_seed: identity.account_seed.to_vec(),
            device_certificate: cert.to_bytes(),
            name: identity.name,
            relays: self.grant.relays.clone(),
            contacts,
            devices,
            ..Default::default()
        })
    }

    /// Revokes one of our other devices: it leaves our device list and is
    /// removed from every group (a commit per group; one waiting behind a
    /// pending commit of ours is queued as that group's next change).
    pub(super) fn revoke_device(&mut self, device: [u8; 32]) -> Result<usize, super::NodeError> {
        if device == self.my_device {
            return Err(super::NodeError::InvalidContact(
                "this device cannot revoke itself".into(),
            ));
        }
        let mut devices = self.store.own_devices()?;
        devices.retain(|d| tidings_protocol::DeviceCertificate::from_bytes(d).is_ok_and(|c| c.device_key != device));
        self.store.put_own_devices(&devices)?;
        self.mend_dirty = true;
        let mut groups = 0;
        for mut c in self.store.list_groups()? {
            let Some(row) = c.group.as_mut() else { continue };
            if row.left || !self.member_devices(&c.group_id).is_ok_and(|m| m.contains(&device)) {
                continue;
            }
            let intent = tidings_store::IntentRow::Remove { devices: vec![device] };
            if row.pending.is_some() {
                row.retry = Some(intent);
                self.store.put_conversation(&c)?;
            } else {
                self.group_intent(&c.group_id, intent)?;
            }
            groups += 1;
        }
        // One-to-one conversations holding the device are replaced by the
        // node's upkeep (`conversations_to_mend`).
        info!(device = %hex::encode(device), groups, "revoked a device of this account");
        Ok(groups)
    }

    /// Adds one of our own devices (by its key package) to a group, through
    /// a sequenced commit. (One-to-one conversations are replaced instead, see
    /// [`Core::conversations_to_mend`].)
    pub(super) fn add_own_device(&mut self, gid: &[u8], key_package: Vec<u8>) -> Result<(), super::NodeError> {
        self.group_intent(
            gid,
            tidings_store::IntentRow::Add {
                key_packages: vec![key_package],
            },
        )?;
        Ok(())
    }

    pub(super) fn own_device_keys(&self) -> Vec<[u8; 32]> {
        self.store
            .own_devices()
            .unwrap_or_default()
            .iter()
            .filter_map(|b| tidings_protocol::DeviceCertificate::from_trusted_bytes(b).ok())
            .map(|c| c.device_key)
            .collect()
    }

    /// Groups that lack one of our own devices: (group id, certificate).
    pub(super) fn missing_own_devices(&mut self) -> Vec<(Vec<u8>, tidings_protocol::DeviceCertificate)> {
        let Ok(own) = self.store.own_devices() else {
            return Vec::new();
        };
        // Our own certificate is skipped before any signature check: with one device (the
        // common case) this check, which runs whenever the store changed, verifies nothing.
        let own: Vec<_> = own
            .iter()
            .filter_map(|b| tidings_protocol::DeviceCertificate::from_trusted_bytes(b).ok())
            .filter(|c| c.device_key != self.my_device)
            .filter_map(|c| tidings_protocol::DeviceCertificate::verify_signature(c.wire()).ok())
            .collect();
        if own.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let Ok(groups) = self.store.list_groups() else {
            return out;
        };
        for c in groups {
            let Some(row) = c.group else { continue };
            if row.left || row.pending.is_some() || row.retry.is_some() {
                continue;
            }
            let Ok(members) = self.member_devices(&c.group_id) else {
                continue;
            };
            for d in &own {
                if !members.contains(&d.device_key) {
                    out.push((c.group_id.clone(), d.clone()));
                }
            }
        }
        out
    }

    /// Contacts whose conversation for sending does not hold exactly our
    /// current devices: one we linked is missing, or one we revoked is still
    /// in it. One-to-one conversations never change members by commits (two
    /// devices committing in the same epoch would split the conversation);
    /// the node replaces such a conversation by a new one with every current
    /// device of both accounts instead.
    pub(super) fn conversations_to_mend(&mut self) -> Vec<[u8; 32]> {
        if !self.mend_dirty {
            return Vec::new();
        }
        let mut ours: Vec<[u8; 32]> = self.own_device_keys();
        if !ours.contains(&self.my_device) {
            ours.push(self.my_device);
        }
        ours.sort();
        let Ok(contacts) = self.store.list_contacts() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for contact in contacts {
            let Ok(Some(gid)) = self.send_conversation(&contact) else {
                continue;
            };
            let Ok(Some(group)) = super::load_group(&mut self.groups, &self.provider, &gid) else {
                continue;
            };
            let mut in_it: Vec<[u8; 32]> = tidings_protocol::MlsEngine::members(group)
                .into_iter()
                .filter(|c| c.account == self.me)
                .map(|c| c.device_key)
                .collect();
            in_it.sort();
            if in_it != ours {
                out.push(contact.account);
            }
        }
        // Looked at again only after the next change, unless something is left to mend.
        self.mend_dirty = !out.is_empty();
        out
    }
}
