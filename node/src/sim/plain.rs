//! The simulated world's connection set-up without encryption: each side
//! sends its public key, and the peer id is taken from it. Nothing else is
//! read or written, and nothing stays allocated once the connection is up
//! (libp2p's plaintext upgrade keeps its 8 KiB read buffer for the life of
//! every connection). Only simulated links use it; see [`super::Security`].

use std::io;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt};
use libp2p::PeerId;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::{Keypair, PublicKey};

/// Protocol name negotiated for it.
const PROTOCOL: &str = "/tidings/sim-plain/1";
/// Longest encoded public key accepted (an Ed25519 key is 36 bytes).
const MAX_KEY: usize = 256;

/// The upgrade: our public key, sent first on every new connection.
#[derive(Clone)]
pub struct PlainIds {
    key: Vec<u8>,
}

impl PlainIds {
    pub fn new(keypair: &Keypair) -> Self {
        Self {
            key: keypair.public().encode_protobuf(),
        }
    }

    async fn exchange<C: AsyncRead + AsyncWrite + Unpin>(self, mut io: C) -> io::Result<(PeerId, C)> {
        let len = u16::try_from(self.key.len()).map_err(|_| invalid("our key is too long"))?;
        io.write_all(&len.to_be_bytes()).await?;
        io.write_all(&self.key).await?;
        io.flush().await?;
        let mut len = [0u8; 2];
        io.read_exact(&mut len).await?;
        let len = usize::from(u16::from_be_bytes(len));
        if len > MAX_KEY {
            return Err(invalid("the peer's key is too long"));
        }
        let mut key = vec![0u8; len];
        io.read_exact(&mut key).await?;
        let key = PublicKey::try_decode_protobuf(&key).map_err(|_| invalid("the peer's key does not decode"))?;
        Ok((key.to_peer_id(), io))
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl UpgradeInfo for PlainIds {
    type Info = &'static str;
    type InfoIter = std::iter::Once<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once(PROTOCOL)
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin + Send + 'static> InboundConnectionUpgrade<C> for PlainIds {
    type Output = (PeerId, C);
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<(PeerId, C)>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        self.exchange(io).boxed()
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin + Send + 'static> OutboundConnectionUpgrade<C> for PlainIds {
    type Output = (PeerId, C);
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<(PeerId, C)>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        self.exchange(io).boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::sim::{FixedDelay, SimConn};

    fn link() -> (SimConn, SimConn) {
        let model = Arc::new(FixedDelay(Duration::from_millis(10)));
        SimConn::pair(model, Arc::default(), (1, Arc::default()), (2, Arc::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn both_sides_learn_the_other_peer_id_and_a_key_that_does_not_decode_is_refused() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (x, y) = link();
        let (ra, rb) = futures::join!(PlainIds::new(&a).exchange(x), PlainIds::new(&b).exchange(y));
        assert_eq!(ra.unwrap().0, b.public().to_peer_id());
        assert_eq!(rb.unwrap().0, a.public().to_peer_id());

        let (x, y) = link();
        let liar = PlainIds { key: vec![7; 40] };
        let (ra, _) = futures::join!(PlainIds::new(&a).exchange(x), liar.exchange(y));
        assert_eq!(ra.unwrap_err().kind(), io::ErrorKind::InvalidData);

        let (x, y) = link();
        let too_long = PlainIds {
            key: vec![7; MAX_KEY + 1],
        };
        let (ra, _) = futures::join!(PlainIds::new(&a).exchange(x), too_long.exchange(y));
        assert_eq!(ra.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
