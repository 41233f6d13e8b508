//! The test bed's S3 fault proxy as a process, for benchmark scripts:
//! `fault_proxy UPSTREAM_PORT DELAY_MS` forwards loopback S3 requests to
//! `UPSTREAM_PORT`, each after DELAY_MS, prints its endpoint and runs until
//! killed. With `BULWARK_PROXY_TRACE` set it writes each request's arrival
//! (Unix seconds) and request line to stderr: a benchmark's timeline.

use std::time::Duration;

use testbed::s3::{FaultProxy, Faults};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(port), Some(delay)) = (
        args.get(1).and_then(|a| a.parse::<u16>().ok()),
        args.get(2).and_then(|a| a.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: fault_proxy UPSTREAM_PORT DELAY_MS");
        std::process::exit(2);
    };
    let faults = Faults {
        delay: Duration::from_millis(delay),
        ..Faults::default()
    };
    let proxy = match FaultProxy::start(port, faults) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fault_proxy: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", proxy.endpoint());
    loop {
        std::thread::park();
    }
}
