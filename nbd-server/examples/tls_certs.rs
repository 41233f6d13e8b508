//! Write a throw-away test PKI for NBD over TLS: `tls_certs DIR` creates
//! DIR/server (server-cert.pem, server-key.pem, ca-cert.pem), DIR/client
//! (ca-cert.pem, client-cert.pem, client-key.pem) and a few refusal cases,
//! the same PKI the tests use (QEMU's `tls-creds-x509` layout). For benches
//! and manual testing; real deployments use their own CA.

use testbed::nbd::certs;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: tls_certs DIR")?;
    let pki = certs::make_pki(std::path::Path::new(&dir));
    println!("server: {}", pki.server.display());
    println!("client: {}", pki.client.display());
    Ok(())
}
