//! Our client against our server: reads and block status agree with the
//! export, with and without structured replies, and damage surfaces as EIO
//! without killing the connection.

use std::sync::Arc;

use nbd_server::proto::consts::{EIO, STATE_HOLE, STATE_ZERO};
use nbd_server::{Client, ClientError, ClientOptions, MemExport};
use rand::{Rng, SeedableRng};
use testbed::nbd::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_block_status_match_export() {
    let (data, holes) = test_image();
    let served = serve(vec![("vda", mem_export())]);
    let opts = ClientOptions::new("vda").meta_context("base:allocation");
    let mut c = Client::connect_unix(&served.socket, &opts).await.unwrap();
    assert_eq!(c.size(), data.len() as u64);
    assert_eq!(c.context_id("base:allocation"), Some(1));

    let map = c
        .block_status(0, c.size(), "base:allocation")
        .await
        .unwrap();
    let got: Vec<(u64, u64, bool)> = map
        .iter()
        .map(|e| (e.offset, e.length, e.flags == STATE_HOLE | STATE_ZERO))
        .collect();
    assert_eq!(got, expected_map(data.len() as u64, &holes));

    // Whole image (one request crosses several holes), then random ranges.
    assert!(c.read(0, data.len()).await.unwrap() == data);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..200 {
        let off = rng.gen_range(0..data.len());
        let len = rng.gen_range(0..=(data.len() - off).min(3 << 20));
        let got = c.read(off as u64, len).await.unwrap();
        assert!(got[..] == data[off..off + len], "read {off}+{len}");
    }
    c.disconnect().await.unwrap();

    // The kernel's way: no structured replies, simple READ replies.
    let plain = ClientOptions {
        structured_replies: false,
        ..ClientOptions::new("vda")
    };
    let mut c = Client::connect_unix(&served.socket, &plain).await.unwrap();
    assert!(!c.structured_replies());
    assert!(c.read(4 << 20, 5 << 20).await.unwrap()[..] == data[4 << 20..9 << 20]);
    assert!(matches!(
        c.block_status(0, 4096, "base:allocation").await,
        Err(ClientError::UnknownContext(_))
    ));
    c.disconnect().await.unwrap();
    served.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_data_is_eio_and_connection_survives() {
    let (data, holes) = test_image();
    let export = Arc::new(MemExport::new(data.clone(), holes).with_damage(1 << 20, 4096));
    let served = serve(vec![("vda", export)]);
    for structured in [true, false] {
        let opts = ClientOptions {
            structured_replies: structured,
            ..ClientOptions::new("vda")
        };
        let mut c = Client::connect_unix(&served.socket, &opts).await.unwrap();
        match c.read((1 << 20) - 100, 8192).await {
            Err(ClientError::Request { errno, .. }) => assert_eq!(errno, EIO),
            other => panic!("expected EIO, got {other:?}"),
        }
        assert!(c.read(0, 65536).await.unwrap()[..] == data[..65536]);
        c.disconnect().await.unwrap();
    }
    served.shutdown().await;
}
