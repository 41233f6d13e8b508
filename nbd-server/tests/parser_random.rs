//! Randomized parser robustness on stable Rust (the cargo-fuzz targets in
//! `fuzz/` do the same with coverage guidance): random bytes and mutated
//! valid messages must parse or fail cleanly, never panic, and whatever
//! parses must re-encode to an equivalent message.

use nbd_server::proto::consts::*;
use nbd_server::proto::handshake::*;
use nbd_server::proto::transmission::*;
use rand::{Rng, SeedableRng};

fn seeds() -> Vec<Vec<u8>> {
    let go = OptionRequest::Go(ExportRequest {
        name: "vda".into(),
        info: vec![INFO_BLOCK_SIZE, INFO_NAME],
    });
    let meta = OptionRequest::SetMetaContext(MetaContextRequest {
        export: "vda".into(),
        queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:b".into()],
    });
    let req = Request {
        flags: CMD_FLAG_DF,
        command: Command::Read,
        cookie: 9,
        offset: 4096,
        length: 512,
    };
    vec![
        go.to_bytes(),
        OptionRequest::StartTls.to_bytes(),
        // A TLS 1.2/1.3 ClientHello record header where an option may be.
        vec![0x16, 3, 1, 0, 0xc8, 1, 0, 0, 0xc4, 3, 3],
        meta.to_bytes(),
        req.encode().to_vec(),
        block_status_chunk(
            1,
            REPLY_FLAG_DONE,
            1,
            &[BlockDescriptor {
                length: 4096,
                flags: 3,
            }],
        ),
        error_chunk(1, EIO, "boom"),
        offset_hole_chunk(1, 0, 0, 512).to_vec(),
        InfoReply::BlockSize {
            min: 1,
            preferred: 4096,
            max: 1 << 25,
        }
        .encode(),
    ]
}

/// Feed one input to every parser.
fn feed(b: &[u8]) {
    let _ = Greeting::parse(b);
    let _ = OptionHeader::parse(b);
    let _ = OptionReplyHeader::parse(b);
    let _ = InfoReply::parse(b);
    let _ = MetaContextReply::parse(b);
    let _ = parse_rep_server(b);
    let _ = parse_export_name_reply(b);
    if b.len() >= 4 {
        let opt = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) % 16;
        if let Ok(req) = OptionRequest::parse(opt, &b[4..]) {
            let (o, data) = req.encode();
            // Unknown options keep only their number; the rest round-trip.
            if !matches!(req, OptionRequest::Unsupported(_) | OptionRequest::Abort) {
                assert_eq!(o, opt);
                assert_eq!(OptionRequest::parse(o, &data).unwrap(), req);
            }
        }
    }
    // STARTTLS carries no data: anything else is invalid, never a STARTTLS
    // the server would acknowledge (and then read TLS after it).
    assert_eq!(
        OptionRequest::parse(OPT_STARTTLS, b).is_ok(),
        b.is_empty(),
        "STARTTLS with {} bytes of data",
        b.len()
    );
    if let Ok(req) = Request::parse(b) {
        assert_eq!(req.encode()[..], b[..]);
    }
    let _ = ReplyHeader::parse(b);
    if b.len() >= 2 {
        let t = u16::from_be_bytes([b[0], b[1]]);
        for ty in [t, t & 7, t | REPLY_TYPE_FLAG_ERROR, REPLY_TYPE_ERROR_OFFSET] {
            let _ = Chunk::parse(ty, &b[2..]);
        }
    }
}

#[test]
fn parsers_survive_random_and_mutated_input() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e6264);
    let seeds = seeds();
    for _ in 0..100_000 {
        let input: Vec<u8> = if rng.gen_bool(0.3) {
            let n = rng.gen_range(0..64);
            (0..n).map(|_| rng.gen()).collect()
        } else {
            let mut s = seeds[rng.gen_range(0..seeds.len())].clone();
            for _ in 0..rng.gen_range(1..4) {
                match rng.gen_range(0..3) {
                    0 if !s.is_empty() => {
                        let i = rng.gen_range(0..s.len());
                        s[i] = rng.gen();
                    }
                    1 if !s.is_empty() => {
                        let n = rng.gen_range(0..s.len());
                        s.truncate(n);
                    }
                    _ => s.push(rng.gen()),
                }
            }
            s
        };
        feed(&input);
        // Also as payload after the 16/20-byte headers.
        for skip in [16, 20] {
            if input.len() > skip {
                feed(&input[skip..]);
            }
        }
    }
}
