//! Server-side CPU time of one full TLS 1.3 handshake (ECDSA P-256 certificate, X25519, AES-128-GCM,
//! two session tickets), in memory, with the ring provider and with the aws-lc-rs provider `lb`
//! uses: `cargo run --release -p lb-userspace --example tls_handshake_cpu`.
//!
//! Only the server's calls are timed, with the thread's CPU clock, so a busy machine changes
//! little; rounds alternate the two providers. A diagnostic for choosing the provider, not a
//! benchmark of `lb` (that is `cargo xtask bench l7 --only handshakes`).
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{ClientConnection, ServerConnection};

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn server_config(provider: CryptoProvider) -> Arc<rustls::ServerConfig> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .expect("key");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    Arc::new(cfg)
}

/// Server CPU nanoseconds for `n` full handshakes.
fn handshakes(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
    n: u32,
) -> u64 {
    let mut spent = 0;
    let mut buf = Vec::with_capacity(16 * 1024);
    for _ in 0..n {
        let mut c = ClientConnection::new(
            client.clone(),
            ServerName::try_from("localhost").expect("name"),
        )
        .expect("client");
        let t = thread_cpu_ns();
        let mut s = ServerConnection::new(server.clone()).expect("server");
        spent += thread_cpu_ns() - t;
        while c.is_handshaking() || s.is_handshaking() || s.wants_write() {
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("client write");
            }
            let t = thread_cpu_ns();
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("server read");
                s.process_new_packets().expect("server process");
            }
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).expect("server write");
            }
            spent += thread_cpu_ns() - t;
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("client read");
                c.process_new_packets().expect("client process");
            }
        }
        assert_eq!(
            s.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }
    spent
}

fn main() {
    // The client `lb` uses towards HTTPS targets (it accepts any certificate, as ALB does);
    // only the server's CPU is timed.
    let client = lb::proxy::client::tls::client_config(
        &lb::proxy::client::TargetTls {
            server_name: "localhost".into(),
            verify: false,
            ca_file: None,
        },
        b"http/1.1",
    )
    .expect("client config");
    let ring = server_config({
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        p
    });
    let aws = server_config(lb::proxy::server::tls::provider());
    let n = 500;
    handshakes(&ring, &client, 50);
    handshakes(&aws, &client, 50);
    let (mut r, mut a) = (Vec::new(), Vec::new());
    for round in 1..=7 {
        let x = handshakes(&ring, &client, n) as f64 / f64::from(n) / 1000.0;
        let y = handshakes(&aws, &client, n) as f64 / f64::from(n) / 1000.0;
        println!(
            "round {round}: ring {x:6.1} µs  aws-lc-rs {y:6.1} µs  (server CPU per handshake)"
        );
        r.push(x);
        a.push(y);
    }
    r.sort_by(f64::total_cmp);
    a.sort_by(f64::total_cmp);
    println!(
        "median: ring {:.1} µs, aws-lc-rs {:.1} µs",
        r[r.len() / 2],
        a[a.len() / 2]
    );
}
