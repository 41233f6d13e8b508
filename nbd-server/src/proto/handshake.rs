//! Fixed-newstyle negotiation: greeting, option requests and option replies.

use super::consts::*;
use super::wire::{put_string_u32, string, Reader};
use super::ProtoError;

/// The first 18 bytes a newstyle server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub handshake_flags: u16,
}

impl Greeting {
    pub const LEN: usize = 18;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[16..].copy_from_slice(&self.handshake_flags.to_be_bytes());
        out
    }

    /// Rejects oldstyle servers (second magic differs) as `BadMagic`.
    pub fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(buf);
        expect_magic64(r.u64()?, NBDMAGIC)?;
        expect_magic64(r.u64()?, IHAVEOPT)?;
        let handshake_flags = r.u16()?;
        r.finish()?;
        Ok(Self { handshake_flags })
    }
}

fn expect_magic64(found: u64, expected: u64) -> Result<(), ProtoError> {
    if found == expected {
        Ok(())
    } else {
        Err(ProtoError::BadMagic { expected, found })
    }
}

/// Header of an option sent by the client; `length` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    pub fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(buf);
        expect_magic64(r.u64()?, IHAVEOPT)?;
        let option = r.u32()?;
        let length = r.u32()?;
        r.finish()?;
        Ok(Self { option, length })
    }
}

/// Export name plus the `NBD_INFO_*` items a client asks for (OPT_INFO / OPT_GO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub name: String,
    pub info: Vec<u16>,
}

impl ExportRequest {
    pub fn parse(data: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(data);
        let name = r.string_u32()?;
        let count = r.u16()? as usize;
        let mut info = Vec::with_capacity(count.min(r.remaining() / 2));
        for _ in 0..count {
            info.push(r.u16()?);
        }
        r.finish()?;
        Ok(Self { name, info })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.name.len() + 2 * self.info.len());
        put_string_u32(&mut out, &self.name);
        out.extend_from_slice(&(self.info.len() as u16).to_be_bytes());
        for i in &self.info {
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }
}

/// Export name plus metadata context queries (OPT_LIST/SET_META_CONTEXT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn parse(data: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(data);
        let export = r.string_u32()?;
        let count = r.u32()? as usize;
        // Each query costs at least 4 bytes: cap the allocation by what's there.
        let mut queries = Vec::with_capacity(count.min(r.remaining() / 4));
        for _ in 0..count {
            queries.push(r.string_u32()?);
        }
        r.finish()?;
        Ok(Self { export, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string_u32(&mut out, &self.export);
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string_u32(&mut out, q);
        }
        out
    }
}

/// A client option with its data decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(ExportRequest),
    Go(ExportRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// Known to exist but not implemented here, or unknown: answered with
    /// `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

impl OptionRequest {
    /// Decode option `option` with its `data`. Errors mean "syntactically
    /// invalid" (`NBD_REP_ERR_INVALID`), except for EXPORT_NAME where the
    /// server can only drop the connection.
    pub fn parse(option: u32, data: &[u8]) -> Result<Self, ProtoError> {
        let no_data = |req: OptionRequest| {
            if data.is_empty() {
                Ok(req)
            } else {
                Err(ProtoError::TrailingBytes(data.len()))
            }
        };
        match option {
            OPT_EXPORT_NAME => Ok(Self::ExportName(string(data)?)),
            // ABORT data is ignored: the session ends either way.
            OPT_ABORT => Ok(Self::Abort),
            OPT_LIST => no_data(Self::List),
            OPT_STARTTLS => no_data(Self::StartTls),
            OPT_INFO => Ok(Self::Info(ExportRequest::parse(data)?)),
            OPT_GO => Ok(Self::Go(ExportRequest::parse(data)?)),
            OPT_STRUCTURED_REPLY => no_data(Self::StructuredReply),
            OPT_LIST_META_CONTEXT => Ok(Self::ListMetaContext(MetaContextRequest::parse(data)?)),
            OPT_SET_META_CONTEXT => Ok(Self::SetMetaContext(MetaContextRequest::parse(data)?)),
            other => Ok(Self::Unsupported(other)),
        }
    }

    /// Option number and encoded data, as a client sends them.
    pub fn encode(&self) -> (u32, Vec<u8>) {
        match self {
            Self::ExportName(n) => (OPT_EXPORT_NAME, n.as_bytes().to_vec()),
            Self::Abort => (OPT_ABORT, Vec::new()),
            Self::List => (OPT_LIST, Vec::new()),
            Self::StartTls => (OPT_STARTTLS, Vec::new()),
            Self::Info(r) => (OPT_INFO, r.encode()),
            Self::Go(r) => (OPT_GO, r.encode()),
            Self::StructuredReply => (OPT_STRUCTURED_REPLY, Vec::new()),
            Self::ListMetaContext(r) => (OPT_LIST_META_CONTEXT, r.encode()),
            Self::SetMetaContext(r) => (OPT_SET_META_CONTEXT, r.encode()),
            Self::Unsupported(o) => (*o, Vec::new()),
        }
    }

    /// Header plus data, ready to write.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (option, data) = self.encode();
        let mut out = OptionHeader {
            option,
            length: data.len() as u32,
        }
        .encode()
        .to_vec();
        out.extend_from_slice(&data);
        out
    }
}

/// Header of a server option reply; `length` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    pub fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(buf);
        expect_magic64(r.u64()?, OPTION_REPLY_MAGIC)?;
        let option = r.u32()?;
        let reply_type = r.u32()?;
        let length = r.u32()?;
        r.finish()?;
        Ok(Self {
            option,
            reply_type,
            length,
        })
    }

    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }
}

/// A complete option reply (header plus payload).
pub fn encode_option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OptionReplyHeader::LEN + payload.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// `NBD_REP_SERVER` payload: export name, then free-form details.
pub fn encode_rep_server(name: &str, details: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_string_u32(&mut out, name);
    out.extend_from_slice(details.as_bytes());
    out
}

/// Parse an `NBD_REP_SERVER` payload into (name, details).
pub fn parse_rep_server(data: &[u8]) -> Result<(String, String), ProtoError> {
    let mut r = Reader::new(data);
    let name = r.string_u32()?;
    let details = string(r.rest())?;
    Ok((name, details))
}

/// `NBD_REP_INFO` payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    Export {
        size: u64,
        transmission_flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// An info type this side does not know; clients ignore these.
    Unknown(u16),
}

impl InfoReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Self::Export {
                size,
                transmission_flags,
            } => {
                out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&transmission_flags.to_be_bytes());
            }
            Self::Name(n) => {
                out.extend_from_slice(&INFO_NAME.to_be_bytes());
                out.extend_from_slice(n.as_bytes());
            }
            Self::Description(d) => {
                out.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                out.extend_from_slice(d.as_bytes());
            }
            Self::BlockSize {
                min,
                preferred,
                max,
            } => {
                out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                out.extend_from_slice(&min.to_be_bytes());
                out.extend_from_slice(&preferred.to_be_bytes());
                out.extend_from_slice(&max.to_be_bytes());
            }
            Self::Unknown(t) => out.extend_from_slice(&t.to_be_bytes()),
        }
        out
    }

    pub fn parse(data: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(data);
        let info = match r.u16()? {
            INFO_EXPORT => {
                let size = r.u64()?;
                let transmission_flags = r.u16()?;
                r.finish()?;
                Self::Export {
                    size,
                    transmission_flags,
                }
            }
            INFO_NAME => Self::Name(string(r.rest())?),
            INFO_DESCRIPTION => Self::Description(string(r.rest())?),
            INFO_BLOCK_SIZE => {
                let min = r.u32()?;
                let preferred = r.u32()?;
                let max = r.u32()?;
                r.finish()?;
                Self::BlockSize {
                    min,
                    preferred,
                    max,
                }
            }
            other => Self::Unknown(other),
        };
        Ok(info)
    }
}

/// `NBD_REP_META_CONTEXT` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextReply {
    pub id: u32,
    pub name: String,
}

impl MetaContextReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.name.len());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    pub fn parse(data: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(data);
        let id = r.u32()?;
        let name = string(r.rest())?;
        Ok(Self { id, name })
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124
/// zero bytes unless both sides agreed on NO_ZEROES.
pub fn encode_export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + 124);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// Parse the first 10 bytes of an EXPORT_NAME reply into (size, flags).
pub fn parse_export_name_reply(buf: &[u8]) -> Result<(u64, u16), ProtoError> {
    let mut r = Reader::new(buf);
    let size = r.u64()?;
    let flags = r.u16()?;
    r.finish()?;
    Ok((size, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_roundtrip() {
        let g = Greeting {
            handshake_flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        };
        assert_eq!(Greeting::parse(&g.encode()), Ok(g));
        let mut bad = g.encode();
        bad[0] ^= 1;
        assert!(matches!(
            Greeting::parse(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn option_roundtrips() {
        let reqs = [
            OptionRequest::Go(ExportRequest {
                name: "vda".into(),
                info: vec![INFO_BLOCK_SIZE, INFO_NAME],
            }),
            OptionRequest::SetMetaContext(MetaContextRequest {
                export: "vda".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:b".into()],
            }),
            OptionRequest::List,
            OptionRequest::ExportName("x".into()),
        ];
        for req in reqs {
            let bytes = req.to_bytes();
            let hdr = OptionHeader::parse(&bytes[..16]).unwrap();
            assert_eq!(hdr.length as usize, bytes.len() - 16);
            assert_eq!(OptionRequest::parse(hdr.option, &bytes[16..]), Ok(req));
        }
    }

    #[test]
    fn meta_context_count_lies_are_errors() {
        // Claims 2^32-1 queries with no data: must fail, not allocate.
        let mut data = Vec::new();
        put_string_u32(&mut data, "vda");
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            MetaContextRequest::parse(&data),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn info_roundtrip() {
        for i in [
            InfoReply::Export {
                size: 1 << 40,
                transmission_flags: 0x1ff,
            },
            InfoReply::Name("n".into()),
            InfoReply::Description("d".into()),
            InfoReply::BlockSize {
                min: 1,
                preferred: 4096,
                max: 1 << 25,
            },
        ] {
            assert_eq!(InfoReply::parse(&i.encode()), Ok(i));
        }
    }

    #[test]
    fn long_and_bad_strings_rejected() {
        assert_eq!(
            OptionRequest::parse(OPT_EXPORT_NAME, &[b'a'; 5000]),
            Err(ProtoError::StringTooLong(5000))
        );
        assert_eq!(
            OptionRequest::parse(OPT_EXPORT_NAME, b"a\0b"),
            Err(ProtoError::BadString)
        );
        assert_eq!(
            OptionRequest::parse(OPT_EXPORT_NAME, &[0xff, 0xfe]),
            Err(ProtoError::BadString)
        );
    }
}
