//! Connected byte streams of every kind the server and client use (Unix,
//! TCP, and TLS over either), with a way to split each into halves owned by
//! different tasks: the transmission phase reads requests while request
//! tasks write replies.
//!
//! Plain sockets split for free (`into_split`); a TLS session is one state
//! machine, so its halves share it through `tokio::io::split`'s lock.

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};

pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type R: AsyncRead + Unpin + Send + 'static;
    type W: AsyncWrite + Unpin + Send + 'static;
    fn into_halves(self) -> (Self::R, Self::W);
}

impl Stream for UnixStream {
    type R = tokio::net::unix::OwnedReadHalf;
    type W = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

impl Stream for TcpStream {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

impl<S: Stream> Stream for tokio_rustls::server::TlsStream<S> {
    type R = ReadHalf<Self>;
    type W = WriteHalf<Self>;
    fn into_halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
}

impl<S: Stream> Stream for tokio_rustls::client::TlsStream<S> {
    type R = ReadHalf<Self>;
    type W = WriteHalf<Self>;
    fn into_halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
}
