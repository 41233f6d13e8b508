//! Transmission phase: requests, simple replies, structured reply chunks.

use super::consts::*;
use super::wire::{string, Reader};
use super::ProtoError;

/// Request types. Unknown values are kept so the server can answer EINVAL
/// instead of dropping the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl From<u16> for Command {
    fn from(v: u16) -> Self {
        match v {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disc,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::Cache,
            6 => Self::WriteZeroes,
            7 => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }
}

impl From<Command> for u16 {
    fn from(c: Command) -> u16 {
        match c {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(v) => v,
        }
    }
}

/// A request header (compact form; extended headers are not negotiated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    /// Opaque value echoed in the reply ("handle" in older texts).
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub const LEN: usize = 28;

    pub fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: REQUEST_MAGIC.into(),
                found: magic.into(),
            });
        }
        let flags = r.u16()?;
        let command = Command::from(r.u16()?);
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let length = r.u32()?;
        r.finish()?;
        Ok(Self {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&u16::from(self.command).to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A simple reply header; for a successful simple READ the data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }
}

/// Header of one structured reply chunk; `length` payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub reply_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.reply_type.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Either kind of reply header, as a client reads it off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReply),
    Structured(ChunkHeader),
}

impl ReplyHeader {
    /// Total header length implied by the leading 4-byte magic, so a reader
    /// can fetch the magic first and then the rest.
    pub fn len_for_magic(magic: [u8; 4]) -> Result<usize, ProtoError> {
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => Ok(SimpleReply::LEN),
            STRUCTURED_REPLY_MAGIC => Ok(ChunkHeader::LEN),
            found => Err(ProtoError::BadMagic {
                expected: STRUCTURED_REPLY_MAGIC.into(),
                found: found.into(),
            }),
        }
    }

    pub fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(buf);
        let header = match r.u32()? {
            SIMPLE_REPLY_MAGIC => Self::Simple(SimpleReply {
                error: r.u32()?,
                cookie: r.u64()?,
            }),
            STRUCTURED_REPLY_MAGIC => Self::Structured(ChunkHeader {
                flags: r.u16()?,
                reply_type: r.u16()?,
                cookie: r.u64()?,
                length: r.u32()?,
            }),
            found => {
                return Err(ProtoError::BadMagic {
                    expected: STRUCTURED_REPLY_MAGIC.into(),
                    found: found.into(),
                })
            }
        };
        r.finish()?;
        Ok(header)
    }

    pub fn cookie(&self) -> u64 {
        match self {
            Self::Simple(s) => s.cookie,
            Self::Structured(c) => c.cookie,
        }
    }
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// A decoded structured reply chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    None,
    OffsetData {
        offset: u64,
        data: &'a [u8],
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context_id: u32,
        descriptors: Vec<BlockDescriptor>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
    /// An unknown type with the error bit set: the request failed.
    UnknownError {
        reply_type: u16,
        error: u32,
        message: String,
    },
    /// An unknown non-error type: the client must hang up.
    Unknown(u16),
}

impl<'a> Chunk<'a> {
    /// Decode the payload of a chunk of type `reply_type`.
    pub fn parse(reply_type: u16, payload: &'a [u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(payload);
        let chunk = match reply_type {
            REPLY_TYPE_NONE => Self::None,
            REPLY_TYPE_OFFSET_DATA => {
                let offset = r.u64()?;
                let data = r.rest();
                if data.is_empty() {
                    return Err(ProtoError::Invalid {
                        what: "OFFSET_DATA length",
                        value: 0,
                    });
                }
                Self::OffsetData { offset, data }
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let offset = r.u64()?;
                let length = r.u32()?;
                if length == 0 {
                    return Err(ProtoError::Invalid {
                        what: "hole size",
                        value: 0,
                    });
                }
                Self::OffsetHole { offset, length }
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let context_id = r.u32()?;
                if r.remaining() == 0 || r.remaining() % 8 != 0 {
                    return Err(ProtoError::Invalid {
                        what: "BLOCK_STATUS payload length",
                        value: payload.len() as u64,
                    });
                }
                let mut descriptors = Vec::with_capacity(r.remaining() / 8);
                while r.remaining() > 0 {
                    let length = r.u32()?;
                    let flags = r.u32()?;
                    descriptors.push(BlockDescriptor { length, flags });
                }
                Self::BlockStatus {
                    context_id,
                    descriptors,
                }
            }
            t if t & REPLY_TYPE_FLAG_ERROR != 0 => {
                let error = r.u32()?;
                let msg_len = r.u16()? as usize;
                let message = String::from_utf8_lossy(r.bytes(msg_len)?).into_owned();
                match t {
                    REPLY_TYPE_ERROR => Self::Error { error, message },
                    REPLY_TYPE_ERROR_OFFSET => Self::ErrorOffset {
                        error,
                        message,
                        offset: r.u64()?,
                    },
                    // Unknown error types may carry more fields: skip them.
                    _ => {
                        r.rest();
                        Self::UnknownError {
                            reply_type: t,
                            error,
                            message,
                        }
                    }
                }
            }
            other => {
                r.rest();
                Self::Unknown(other)
            }
        };
        r.finish()?;
        Ok(chunk)
    }
}

/// Header plus 8-byte offset of an OFFSET_DATA chunk; `data_len` bytes follow.
pub fn offset_data_prefix(cookie: u64, flags: u16, offset: u64, data_len: u32) -> [u8; 28] {
    let mut out = [0u8; 28];
    let hdr = ChunkHeader {
        flags,
        reply_type: REPLY_TYPE_OFFSET_DATA,
        cookie,
        length: data_len.saturating_add(8),
    };
    out[..20].copy_from_slice(&hdr.encode());
    out[20..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// A complete OFFSET_HOLE chunk.
pub fn offset_hole_chunk(cookie: u64, flags: u16, offset: u64, length: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    let hdr = ChunkHeader {
        flags,
        reply_type: REPLY_TYPE_OFFSET_HOLE,
        cookie,
        length: 12,
    };
    out[..20].copy_from_slice(&hdr.encode());
    out[20..28].copy_from_slice(&offset.to_be_bytes());
    out[28..].copy_from_slice(&length.to_be_bytes());
    out
}

/// A complete BLOCK_STATUS chunk.
pub fn block_status_chunk(
    cookie: u64,
    flags: u16,
    context_id: u32,
    descriptors: &[BlockDescriptor],
) -> Vec<u8> {
    let len = 4 + 8 * descriptors.len();
    let mut out = Vec::with_capacity(ChunkHeader::LEN + len);
    let hdr = ChunkHeader {
        flags,
        reply_type: REPLY_TYPE_BLOCK_STATUS,
        cookie,
        length: len as u32,
    };
    out.extend_from_slice(&hdr.encode());
    out.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.length.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
    out
}

/// A complete ERROR chunk (always final here) with a human-readable message.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    // Messages are capped (u16 length field, 4096-byte string rule); cut on
    // a char boundary so the message stays valid UTF-8.
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let len = 6 + msg.len();
    let mut out = Vec::with_capacity(ChunkHeader::LEN + len);
    let hdr = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        reply_type: REPLY_TYPE_ERROR,
        cookie,
        length: len as u32,
    };
    out.extend_from_slice(&hdr.encode());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A final NONE chunk: "success, nothing more".
pub fn none_chunk(cookie: u64) -> [u8; ChunkHeader::LEN] {
    ChunkHeader {
        flags: REPLY_FLAG_DONE,
        reply_type: REPLY_TYPE_NONE,
        cookie,
        length: 0,
    }
    .encode()
}

/// Validate a string field the way parsers do (exposed for the client).
pub fn parse_string(bytes: &[u8]) -> Result<String, ProtoError> {
    string(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let req = Request {
            flags: CMD_FLAG_DF,
            command: Command::Read,
            cookie: 0xdead_beef_0000_0001,
            offset: 1 << 33,
            length: 65536,
        };
        assert_eq!(Request::parse(&req.encode()), Ok(req));
        assert!(matches!(
            Request::parse(&req.encode()[..27]),
            Err(ProtoError::Truncated { .. })
        ));
        let mut bad = req.encode();
        bad[3] = 0;
        assert!(matches!(
            Request::parse(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
        let unk = Request {
            command: Command::Unknown(99),
            ..req
        };
        assert_eq!(Request::parse(&unk.encode()), Ok(unk));
    }

    #[test]
    fn chunks_roundtrip() {
        let hole = offset_hole_chunk(7, REPLY_FLAG_DONE, 4096, 512);
        let ReplyHeader::Structured(h) = ReplyHeader::parse(&hole[..20]).unwrap() else {
            panic!("not structured")
        };
        assert!(h.is_done());
        assert_eq!(
            Chunk::parse(h.reply_type, &hole[20..]),
            Ok(Chunk::OffsetHole {
                offset: 4096,
                length: 512
            })
        );

        let descs = [
            BlockDescriptor {
                length: 4096,
                flags: 0,
            },
            BlockDescriptor {
                length: 8192,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ];
        let bs = block_status_chunk(9, 0, 1, &descs);
        assert_eq!(
            Chunk::parse(REPLY_TYPE_BLOCK_STATUS, &bs[20..]),
            Ok(Chunk::BlockStatus {
                context_id: 1,
                descriptors: descs.to_vec()
            })
        );

        let err = error_chunk(3, EIO, "damaged chunk");
        assert_eq!(
            Chunk::parse(REPLY_TYPE_ERROR, &err[20..]),
            Ok(Chunk::Error {
                error: EIO,
                message: "damaged chunk".into()
            })
        );

        let mut data = offset_data_prefix(1, 0, 512, 3).to_vec();
        data.extend_from_slice(b"abc");
        assert_eq!(
            Chunk::parse(REPLY_TYPE_OFFSET_DATA, &data[20..]),
            Ok(Chunk::OffsetData {
                offset: 512,
                data: b"abc"
            })
        );
    }

    #[test]
    fn error_message_length_must_fit() {
        let mut p = EIO.to_be_bytes().to_vec();
        p.extend_from_slice(&100u16.to_be_bytes());
        p.extend_from_slice(b"short");
        assert!(matches!(
            Chunk::parse(REPLY_TYPE_ERROR, &p),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn long_error_message_is_cut_on_char_boundary() {
        let msg = "é".repeat(3000);
        let chunk = error_chunk(1, EIO, &msg);
        match Chunk::parse(REPLY_TYPE_ERROR, &chunk[20..]) {
            Ok(Chunk::Error { message, .. }) => assert!(message.len() <= MAX_STRING_LEN),
            other => panic!("{other:?}"),
        }
    }
}
