//! Transmission requests as the server parses them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_server::proto::transmission::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::parse(data) {
        assert_eq!(&req.encode()[..], data);
    }
});
