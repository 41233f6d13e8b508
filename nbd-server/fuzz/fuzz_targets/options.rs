//! Handshake surface: greeting, option header and every option payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_server::proto::handshake::*;

fuzz_target!(|data: &[u8]| {
    let _ = Greeting::parse(data);
    let _ = OptionHeader::parse(data);
    if data.len() >= 4 {
        let opt = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) % 16;
        if let Ok(req) = OptionRequest::parse(opt, &data[4..]) {
            let (o, bytes) = req.encode();
            if !matches!(req, OptionRequest::Unsupported(_) | OptionRequest::Abort) {
                assert_eq!(OptionRequest::parse(o, &bytes).ok(), Some(req));
            }
        }
    }
    // STARTTLS is valid only without data (else NBD_REP_ERR_INVALID).
    assert_eq!(
        OptionRequest::parse(nbd_server::proto::consts::OPT_STARTTLS, data).is_ok(),
        data.is_empty()
    );
    let _ = OptionReplyHeader::parse(data);
    let _ = InfoReply::parse(data);
    let _ = MetaContextReply::parse(data);
    let _ = parse_rep_server(data);
});
