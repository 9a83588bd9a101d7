//! Hostile input over the network: each case is refused with a typed error or
//! status, changes no state, and the node keeps working.

mod common;

use std::io;
use std::time::Duration;

use common::*;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::kad::{self, Quorum, Record, RecordKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, tcp, yamux};
use prost::Message as _;
use tidings_node::net::{DELIVER_PROTOCOL, KAD_PROTOCOL};
use tidings_protocol::pb::{self, DeliverStatus, EnvelopeKind};
use tidings_protocol::record::{UserRecord, user_record_key};

/// Sends arbitrary bytes as a request, like a hostile peer would.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut b = Vec::new();
        io.take(16 << 20).read_to_end(&mut b).await?;
        Ok(b)
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut b = Vec::new();
        io.take(16 << 20).read_to_end(&mut b).await?;
        Ok(b)
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&r).await?;
        io.close().await
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&r).await?;
        io.close().await
    }
}

#[derive(NetworkBehaviour)]
struct Attacker {
    raw: request_response::Behaviour<RawCodec>,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

fn attacker() -> Swarm<Attacker> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .expect("tcp")
        .with_behaviour(|key| {
            let id = key.public().to_peer_id();
            let mut cfg = kad::Config::new(KAD_PROTOCOL);
            cfg.set_query_timeout(Duration::from_secs(10));
            let mut kad = kad::Behaviour::with_config(id, kad::store::MemoryStore::new(id), cfg);
            kad.set_mode(Some(kad::Mode::Server));
            Attacker {
                raw: request_response::Behaviour::with_codec(
                    RawCodec,
                    [(DELIVER_PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
                ),
                kad,
            }
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

fn peer_of(addr: &Multiaddr) -> PeerId {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => p,
        _ => panic!("address without peer id"),
    }
}

/// Sends raw bytes on `/tidings/deliver/1` and returns the raw response or the failure.
async fn raw_deliver(swarm: &mut Swarm<Attacker>, target: &Multiaddr, bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let peer = peer_of(target);
    swarm.add_peer_address(peer, target.clone());
    let id = swarm.behaviour_mut().raw.send_request(&peer, bytes);
    loop {
        match tokio::time::timeout(TIMEOUT, swarm.select_next_some())
            .await
            .expect("swarm event")
        {
            SwarmEvent::Behaviour(AttackerEvent::Raw(request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            })) if request_id == id => return Ok(response),
            SwarmEvent::Behaviour(AttackerEvent::Raw(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            })) if request_id == id => return Err(error.to_string()),
            _ => {}
        }
    }
}

/// Whether the node refused to answer: a stream error, or the stream closed without a response.
fn refused(r: Result<Vec<u8>, String>) -> bool {
    match r {
        Err(_) => true,
        Ok(bytes) => bytes.is_empty(),
    }
}

async fn deliver(swarm: &mut Swarm<Attacker>, target: &Multiaddr, req: pb::DeliverRequest) -> Vec<DeliverStatus> {
    let resp = raw_deliver(swarm, target, req.encode_to_vec())
        .await
        .expect("a response");
    pb::DeliverResponse::decode(resp.as_slice())
        .expect("decodable response")
        .statuses
        .into_iter()
        .map(|s| DeliverStatus::try_from(s).expect("known status"))
        .collect()
}

fn envelope(conversation: &[u8], mls: Vec<u8>) -> pb::Envelope {
    pb::Envelope {
        id: rand::random::<[u8; 16]>().to_vec(),
        conversation_id: conversation.to_vec(),
        kind: EnvelopeKind::Message as i32,
        mls_message: mls,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_and_oversized_delivery_frames_are_refused_without_state_change() {
    let net = Net::new().await;
    let (a_node, b_node) = (net.node("alice").await, net.node("bob").await);
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    a.send_text(&acct(&b), "legit").await.unwrap();
    eventually("bob got it", || b.history(&acct(&a)).unwrap().len() == 1).await;
    let count = b.store().message_count().unwrap();
    let target = b_node.listen_addrs()[0].clone();
    let mut evil = attacker();

    // Garbage: not a protobuf at all.
    let garbage: Vec<u8> = (0..4096).map(|i| (i * 7 + 3) as u8 | 0x80).collect();
    assert!(refused(raw_deliver(&mut evil, &target, garbage).await));
    // Truncated: a valid request cut inside a length-delimited field.
    let valid = pb::DeliverRequest {
        envelopes: vec![envelope(b"some conversation", vec![0xab; 1000])],
        ..Default::default()
    }
    .encode_to_vec();
    assert!(refused(
        raw_deliver(&mut evil, &target, valid[..valid.len() / 2].to_vec()).await
    ));
    // Oversized: more than the 4 MiB cap is refused before decoding.
    let huge = pb::DeliverRequest {
        envelopes: vec![envelope(b"c", vec![0; 5 << 20])],
        ..Default::default()
    }
    .encode_to_vec();
    assert!(refused(raw_deliver(&mut evil, &target, huge).await));
    // Well-formed but invalid: junk MLS bytes, a bad id, an unknown kind.
    let conv = b.store().list_contacts().unwrap()[0].conversations[0].clone();
    let mut bad_id = envelope(&conv, vec![1, 2, 3]);
    bad_id.id = vec![1; 3];
    let mut bad_kind = envelope(&conv, vec![1, 2, 3]);
    bad_kind.kind = 42;
    let statuses = deliver(
        &mut evil,
        &target,
        pb::DeliverRequest {
            envelopes: vec![envelope(&conv, vec![0x42; 200]), bad_id, bad_kind],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(statuses, vec![DeliverStatus::Rejected; 3]);
    // Too many envelopes in one batch.
    let many = pb::DeliverRequest {
        envelopes: (0..600).map(|_| envelope(&conv, vec![1])).collect(),
        ..Default::default()
    };
    assert_eq!(
        deliver(&mut evil, &target, many).await,
        vec![DeliverStatus::Rejected; 600]
    );

    assert_eq!(b.store().message_count().unwrap(), count, "no state change");
    // The node still works.
    a.send_text(&acct(&b), "still alive?").await.unwrap();
    eventually("bob still receives", || b.history(&acct(&a)).unwrap().len() == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_for_an_unknown_conversation_is_refused_and_changes_nothing() {
    let net = Net::new().await;
    let b_node = net.node("bob").await;
    let b = b_node.handle();
    let target = b_node.listen_addrs()[0].clone();
    let mut evil = attacker();
    let statuses = deliver(
        &mut evil,
        &target,
        pb::DeliverRequest {
            envelopes: vec![
                envelope(b"no such conversation", vec![0; 64]),
                envelope(b"x", vec![0; 8]),
            ],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        statuses,
        vec![DeliverStatus::UnknownConversation, DeliverStatus::NotProcessed],
        "refused; later envelopes wait for the first"
    );
    assert_eq!(b.store().message_count().unwrap(), 0);
    assert!(b.contacts().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_envelope_is_acknowledged_as_duplicate_and_displayed_once() {
    let net = Net::new().await;
    let bdir = net.dir.path().join("bob");
    let (a_node, b_node) = (net.node("alice").await, net.node("bob").await);
    let (a, b) = (a_node.handle(), b_node.handle());
    befriend(&a, &b).await;
    a.send_text(&acct(&b), "first").await.unwrap();
    eventually("bob got first", || b.history(&acct(&a)).unwrap().len() == 1).await;
    let a_acct = acct(&a);
    drop(b);
    b_node.shutdown().await;

    // Capture the ciphertext from alice's outbox while bob is away.
    a.send_text(&a.find_contact("bob").unwrap().account_text(), "only once")
        .await
        .unwrap();
    let entry = a.store().list_outbox().unwrap().pop().expect("queued");
    let captured = pb::Envelope::decode(entry.envelope.as_slice()).unwrap();

    let b_node = start_at(&bdir, "bob", net.boot_addrs.clone()).await;
    let b = b_node.handle();
    b.reconnect_contacts().await;
    eventually("bob got it once", || b.history(&a_acct).unwrap().len() == 2).await;
    let target = b_node.listen_addrs()[0].clone();
    let mut evil = attacker();
    // The same envelope again: acknowledged as a duplicate, not applied.
    let statuses = deliver(
        &mut evil,
        &target,
        pb::DeliverRequest {
            envelopes: vec![captured.clone()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(statuses, vec![DeliverStatus::Duplicate]);
    // The same ciphertext under a fresh envelope id: MLS refuses the reused key.
    let mut renamed = captured;
    renamed.id = rand::random::<[u8; 16]>().to_vec();
    let statuses = deliver(
        &mut evil,
        &target,
        pb::DeliverRequest {
            envelopes: vec![renamed],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(statuses, vec![DeliverStatus::Rejected]);
    let h = b.history(&a_acct).unwrap();
    assert_eq!(h.iter().filter(|m| m.text == "only once").count(), 1);
    assert_eq!(h.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_records_with_bad_signatures_or_older_sequence_numbers_are_refused() {
    let net = Net::new().await;
    let a_node = net.node("alice").await;
    let a = a_node.handle();
    let boot = net.boot.handle();
    let key = user_record_key(&a.account()).to_vec();
    let seq_at_boot = |bytes: Option<Vec<u8>>| {
        bytes.map(|b| {
            UserRecord::verify(&b, &key, u64::MAX / 2)
                .map(|r| r.seq)
                .expect("valid record")
        })
    };

    publish(&a).await;
    let v1 = boot
        .local_dht_record(key.clone())
        .await
        .unwrap()
        .expect("boot holds alice's record");
    let s1 = seq_at_boot(Some(v1.clone())).unwrap();
    publish(&a).await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let s2 = loop {
        let s = seq_at_boot(boot.local_dht_record(key.clone()).await.unwrap()).unwrap();
        if s > s1 {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "second record never reached boot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Mallory replays the old record and forges a newer one with a broken signature.
    let mut forged = pb::SignedUserRecord::decode(v1.as_slice()).unwrap();
    let mut body = pb::UserRecordBody::decode(forged.body.as_slice()).unwrap();
    body.seq = s2 + 1000;
    body.name = "mallory".into();
    forged.body = body.encode_to_vec();
    let mut evil = attacker();
    let boot_addr = net.boot_addrs[0].clone();
    evil.behaviour_mut()
        .kad
        .add_address(&peer_of(&boot_addr), boot_addr.clone());
    evil.dial(boot_addr).unwrap();
    for value in [v1, forged.encode_to_vec()] {
        let qid = evil
            .behaviour_mut()
            .kad
            .put_record(Record::new(RecordKey::new(&key), value), Quorum::One)
            .unwrap();
        loop {
            match tokio::time::timeout(TIMEOUT, evil.select_next_some())
                .await
                .expect("event")
            {
                SwarmEvent::Behaviour(AttackerEvent::Kad(kad::Event::OutboundQueryProgressed { id, step, .. }))
                    if id == qid && step.last =>
                {
                    break;
                }
                _ => {}
            }
        }
    }
    assert_eq!(seq_at_boot(boot.local_dht_record(key.clone()).await.unwrap()), Some(s2));
    let found = a.lookup_record(&a.account()).await.unwrap();
    assert_eq!(found.seq, s2);
    assert_eq!(found.name, "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_contact_cards_are_refused_with_typed_errors() {
    let net = Net::new().await;
    let (a_node, b_node) = (net.node("alice").await, net.node("bob").await);
    let (a, b) = (a_node.handle(), b_node.handle());
    let card = b.card().to_uri();
    for bad in [
        card[..card.len() - 3].to_owned(),
        card.replacen("tidings:", "tidngs:", 1),
        "tidings:".to_owned(),
        format!("{card}x"),
    ] {
        let err = a.add_contact(&bad, None).await.expect_err("refused");
        assert!(matches!(err, tidings_node::NodeError::Card(_)), "{bad}: {err}");
    }
    assert!(a.contacts().unwrap().is_empty());
}
