//! A request-response codec for prost messages with hard size caps.
//!
//! Each request and response is one prost message written to its own stream
//! and terminated by the writer closing its half. The reader takes at most
//! `max + 1` bytes: anything longer is refused before a byte is decoded.

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

/// Codec for request type `Req` and response type `Resp`, each capped at `max` bytes.
pub struct ProstCodec<Req, Resp> {
    max: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> ProstCodec<Req, Resp> {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for ProstCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.max)
    }
}

async fn read_capped<T, M>(io: &mut T, max: usize) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: prost::Message + Default,
{
    let mut buf = Vec::new();
    io.take(max as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame exceeds size cap"));
    }
    M::decode(buf.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_capped<T, M>(io: &mut T, msg: M, max: usize) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    M: prost::Message,
{
    let bytes = msg.encode_to_vec();
    if bytes.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "frame exceeds size cap"));
    }
    io.write_all(&bytes).await?;
    io.close().await
}

impl<Req, Resp> Codec for ProstCodec<Req, Resp>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T: AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req> {
        read_capped(io, self.max).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp> {
        read_capped(io, self.max).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Req,
    ) -> io::Result<()> {
        write_capped(io, req, self.max).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Resp,
    ) -> io::Result<()> {
        write_capped(io, resp, self.max).await
    }
}
