//! Reply headers and structured chunks as the client parses them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_server::proto::transmission::{Chunk, ReplyHeader};

fuzz_target!(|data: &[u8]| {
    let _ = ReplyHeader::parse(data);
    if data.len() >= 2 {
        let ty = u16::from_be_bytes([data[0], data[1]]);
        let _ = Chunk::parse(ty, &data[2..]);
    }
});
