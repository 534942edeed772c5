//! HTTP/2 abuse from a hand-written client (frames built byte by byte, so the client can break
//! the rules a real HTTP/2 library enforces): rapid reset (CVE-2023-44487) and CONTINUATION
//! floods (CVE-2024-27316 class). The abusive connection must get GOAWAY and be closed, the
//! work it causes must stay bounded, and a well-behaved client on another connection keeps
//! getting answers throughout. Every test runs on both HTTP/2 servers (`http2=native`, then
//! `http2=hyper`) and checks the native path's stream counter.
//!
//! Each test prints what it measured (streams or frames sent, requests that reached the target,
//! CPU time and resident memory of the test process); run with `--nocapture` to see them.
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::target::{self, Reply};
use support::{ProxyBuilder, SAFETY, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const NO_ERROR: u32 = 0x0;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame: 24-bit length, type, flags, 31-bit stream id, payload (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK header block for `GET http://abuse.test{path}`: `:method GET`, `:scheme http`
/// (static table entries 2 and 6), `:path` and `:authority` as literals without indexing.
fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86];
    for (name_index, value) in [(4u8, path), (1, "abuse.test")] {
        b.push(name_index); // literal without indexing, indexed name (4-bit prefix)
        b.push(u8::try_from(value.len()).expect("short value"));
        b.extend_from_slice(value.as_bytes());
    }
    b
}

/// What the reading half saw from the proxy.
#[derive(Debug, Default)]
struct Seen {
    /// Error codes of the GOAWAY frames received.
    goaways: Vec<u32>,
    /// Bytes of frames other than GOAWAY (responses, RST_STREAM, SETTINGS…).
    other_frames: usize,
}

/// Reads frames until the proxy closes the connection (EOF or reset), answering nothing.
async fn read_until_closed(mut rd: OwnedReadHalf) -> Seen {
    let mut seen = Seen::default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == GOAWAY && len >= 8 {
                seen.goaways
                    .push(u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]));
            } else {
                seen.other_frames += 1;
            }
            buf.drain(..9 + len);
        }
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return seen,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Opens a prior-knowledge HTTP/2 connection by hand: preface, our SETTINGS, then waits for
/// the proxy's SETTINGS and acknowledges them. Returns the two halves.
async fn handshake(addr: SocketAddr) -> (OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf) {
    within(async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let (mut rd, mut wr) = tcp.into_split();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        wr.write_all(&hello).await.expect("preface");
        // The server's first frame is its SETTINGS.
        let mut head = [0u8; 9];
        rd.read_exact(&mut head).await.expect("server settings");
        assert_eq!(head[3], SETTINGS, "first frame from the server");
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        rd.read_exact(&mut payload).await.expect("settings payload");
        wr.write_all(&frame(SETTINGS, ACK, 0, &[]))
            .await
            .expect("settings ack");
        (rd, wr)
    })
    .await
}

/// A well-behaved HTTP/2 client (hyper, prior knowledge) that sends `GET /ok` in a loop until
/// `stop`, then three more; returns how many succeeded. Every failure fails the test.
async fn well_behaved_client(addr: SocketAddr, stop: Arc<AtomicBool>) -> usize {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut ok = 0;
    let mut extra = 0;
    while extra < 3 {
        if stop.load(Ordering::Relaxed) {
            extra += 1;
        }
        let resp = within(
            send.send_request(
                Request::get("http://good.test/ok")
                    .body(Full::new(Bytes::new()))
                    .expect("request"),
            ),
        )
        .await
        .expect("the well-behaved client got an answer");
        assert_eq!(resp.status(), 200);
        let body = within(resp.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, "fine");
        ok += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ok
}

/// CPU time (user + system) of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &raw mut u);
        u
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The proxy, the attack's target (every request hangs) and, apart from it, the well-behaved
/// client's target (`/ok`), so the attack target's hits are the attack's requests only.
async fn proxy(native: bool) -> (target::Target, support::Proxy, target::Target) {
    let t = target::http1().route("/", Reply::Hang).run().await;
    let ok = target::http1().route("/", Reply::text("fine")).run().await;
    let p = ProxyBuilder::new()
        .group("attack", &[t.addr])
        .group("ok", &[ok.addr])
        .rules(&[
            "web,priority=1,path=/ok,forward=ok",
            "web,default,forward=attack",
        ])
        .listener(|l| l.http2_native = native)
        .start()
        .await;
    (t, p, ok)
}

/// Runs `attack` against the proxy while a well-behaved client keeps asking; checks that the
/// attack connection got GOAWAY and was closed and the good client never failed. Returns what
/// the attack connection saw and what the attack reported.
async fn under_attack<F, Fut>(
    p: &support::Proxy,
    native: bool,
    name: &str,
    attack: F,
) -> (Seen, usize)
where
    F: FnOnce(tokio::net::tcp::OwnedWriteHalf) -> Fut,
    Fut: std::future::Future<Output = usize> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let good = tokio::spawn(well_behaved_client(p.addr, stop.clone()));
    let (rd, wr) = handshake(p.addr).await;
    let cpu = cpu_time();
    let rss = rss_kib();
    let started = Instant::now();
    let reader = tokio::spawn(read_until_closed(rd));
    let sent = tokio::spawn(attack(wr));
    let seen = tokio::time::timeout(SAFETY, reader)
        .await
        .unwrap_or_else(|_| panic!("{name}: the proxy never closed the abusive connection"))
        .expect("reader");
    let sent = within(sent).await.expect("attack task");
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let answered = within(good).await.expect("good client");
    eprintln!(
        "{name}: {sent} sent in {elapsed:?}; GOAWAY codes {:?}; CPU {:?}; RSS {} -> {} KiB; \
         the good client got {answered} answers meanwhile",
        seen.goaways,
        cpu_time() - cpu,
        rss,
        rss_kib()
    );
    assert!(
        !seen.goaways.is_empty(),
        "{name}: the proxy closed without GOAWAY: {seen:?}"
    );
    assert!(answered > 3, "{name}: the good client kept being served");
    // Which HTTP/2 server served it: a silent fall-back to hyper cannot pass as native.
    let native_streams = p
        .running
        .as_ref()
        .expect("running")
        .counters()
        .http2_native_requests
        .get();
    assert_eq!(
        native_streams > 0,
        native,
        "{name}: {native_streams} native streams"
    );
    (seen, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_in_bursts_gets_goaway_and_stays_bounded() {
    for native in [true, false] {
        eprintln!("http2 native: {native}");
        rapid_reset_in_bursts_gets_goaway_and_stays_bounded_on(native).await;
    }
}

async fn rapid_reset_in_bursts_gets_goaway_and_stays_bounded_on(native: bool) {
    let (t, p, _ok) = proxy(native).await;
    // HEADERS + RST_STREAM(CANCEL) for 100 streams per write, as fast as the socket takes it,
    // for up to a million streams.
    let (seen, sent) = under_attack(&p, native, "rapid reset (bursts)", |mut wr| async move {
        let mut stream = 1u32;
        let mut sent = 0;
        while sent < 1_000_000 {
            let mut burst = Vec::new();
            for _ in 0..100 {
                burst.extend(frame(
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    stream,
                    &get_block("/"),
                ));
                burst.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
                stream += 2;
            }
            if wr.write_all(&burst).await.is_err() {
                break;
            }
            sent += 100;
        }
        sent
    })
    .await;
    assert!(sent < 1_000_000, "the proxy kept taking streams");
    assert!(
        seen.goaways
            .iter()
            .all(|code| [ENHANCE_YOUR_CALM, NO_ERROR].contains(code)),
        "h2's pending-accept limit or our tally, not a protocol error: {seen:?}"
    );
    let hits = t.hits();
    eprintln!("rapid reset (bursts): the target saw {hits} requests");
    assert!(
        hits <= 2 * 256 + 128,
        "requests that reached the target stay bounded: {hits} of {sent} streams ({seen:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_of_accepted_streams_is_detected_and_closed() {
    for native in [true, false] {
        eprintln!("http2 native: {native}");
        rapid_reset_of_accepted_streams_is_detected_and_closed_on(native).await;
    }
}

async fn rapid_reset_of_accepted_streams_is_detected_and_closed_on(native: bool) {
    let (t, p, _ok) = proxy(native).await;
    // Keep ten streams open, cancelling the oldest whenever a new one is opened, and cancel a
    // stream only once its request has reached the hanging target: the proxy has accepted
    // every stream before it is cancelled, so h2's pending-accept limit never applies, however
    // slowly the proxy runs.
    let forwarded = t.hits.clone();
    let (seen, sent) = under_attack(
        &p,
        native,
        "rapid reset (accepted streams)",
        |mut wr| async move {
            let mut opened = 0u32;
            while opened < 100_000 {
                let stream = 2 * opened + 1;
                let mut pair = frame(
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    stream,
                    &get_block("/slow"),
                );
                if opened >= 10 {
                    let oldest = usize::try_from(opened - 10).expect("small");
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while forwarded.load(Ordering::SeqCst) <= oldest {
                        if Instant::now() > deadline {
                            // The proxy no longer forwards this connection's streams: judged
                            // abusive (the assertions below say whether it was).
                            return usize::try_from(opened).expect("small");
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    pair.extend(frame(RST_STREAM, 0, stream - 20, &CANCEL.to_be_bytes()));
                }
                if wr.write_all(&pair).await.is_err() {
                    break;
                }
                opened += 1;
                if opened.is_multiple_of(10) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            usize::try_from(opened).expect("small")
        },
    )
    .await;
    let counters = p.running.as_ref().expect("running").counters();
    assert_eq!(
        counters.http2_abusive_connections.load(Ordering::Relaxed),
        1,
        "closed by the cancellation tally, not by h2's pending-accept limit: {seen:?}"
    );
    let hits = t.hits();
    eprintln!("rapid reset (accepted streams): the target saw {hits} requests of {sent} streams");
    assert!(
        hits <= 2 * 256 + 128,
        "requests that reached the target stay bounded: {hits} of {sent} streams"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_gets_goaway_before_it_costs_memory() {
    for native in [true, false] {
        eprintln!("http2 native: {native}");
        a_continuation_flood_gets_goaway_before_it_costs_memory_on(native).await;
    }
}

async fn a_continuation_flood_gets_goaway_before_it_costs_memory_on(native: bool) {
    let (_t, p, _ok) = proxy(native).await;
    // A HEADERS frame without END_HEADERS that starts a 16 MiB header value, then CONTINUATION
    // frames of 16 KiB carrying more of it, never ending the header block.
    let frames_sent = Arc::new(AtomicUsize::new(0));
    let counted = frames_sent.clone();
    let (seen, sent) = under_attack(&p, native, "CONTINUATION flood", |mut wr| async move {
        let mut block = vec![0x82, 0x86, 0x84, 0x01, 10];
        block.extend_from_slice(b"abuse.test");
        // Literal without indexing, new name "x-flood", value length 2^24 (HPACK integer:
        // 127 + 0x7fff81 in 7-bit groups, least significant first).
        block.extend_from_slice(&[0x00, 7]);
        block.extend_from_slice(b"x-flood");
        block.extend_from_slice(&[0x7f, 0x81, 0xff, 0xff, 0x07]);
        if wr.write_all(&frame(HEADERS, 0, 1, &block)).await.is_err() {
            return 0;
        }
        let fragment = vec![b'a'; 16 * 1024];
        let mut sent = 0;
        while sent < 65_536 {
            if wr
                .write_all(&frame(CONTINUATION, 0, 1, &fragment))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
            counted.store(sent, Ordering::Relaxed);
        }
        sent
    })
    .await;
    assert!(
        seen.goaways
            .iter()
            .all(|code| [ENHANCE_YOUR_CALM, COMPRESSION_ERROR].contains(code)),
        "went away for the flood, not for a protocol error of the test client: {seen:?}"
    );
    // The socket buffers hold a few MiB of what was written after the GOAWAY; the point is
    // that the flood was cut long before the 16 MiB value (1,024 frames) arrived.
    assert!(
        sent < 1024,
        "the proxy kept reading CONTINUATION frames: {sent} × 16 KiB ({} counted)",
        frames_sent.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_continuation_frames_are_counted_too() {
    for native in [true, false] {
        eprintln!("http2 native: {native}");
        tiny_continuation_frames_are_counted_too_on(native).await;
    }
}

async fn tiny_continuation_frames_are_counted_too_on(native: bool) {
    let (_t, p, _ok) = proxy(native).await;
    // Empty CONTINUATION frames cost nothing to send and no memory to hold, only work: their
    // number is what h2 limits.
    let (seen, sent) = under_attack(
        &p,
        native,
        "empty CONTINUATION frames",
        |mut wr| async move {
            if wr
                .write_all(&frame(HEADERS, 0, 1, &get_block("/")))
                .await
                .is_err()
            {
                return 0;
            }
            let mut sent = 0;
            while sent < 1_000_000 {
                let mut burst = Vec::new();
                for _ in 0..1000 {
                    burst.extend(frame(CONTINUATION, 0, 1, &[]));
                }
                if wr.write_all(&burst).await.is_err() {
                    break;
                }
                sent += 1000;
            }
            sent
        },
    )
    .await;
    assert!(
        sent < 1_000_000,
        "the proxy kept reading empty CONTINUATION frames"
    );
    assert_eq!(seen.goaways, vec![ENHANCE_YOUR_CALM], "{seen:?}");
}

/// Positive control for the tests above: the hand-written client speaks HTTP/2 correctly, so
/// a plain GET on it is answered (else a GOAWAY above could be a protocol error of ours).
#[tokio::test]
async fn the_hand_written_client_is_answered_when_it_behaves() {
    for native in [true, false] {
        eprintln!("http2 native: {native}");
        the_hand_written_client_is_answered_when_it_behaves_on(native).await;
    }
}

async fn the_hand_written_client_is_answered_when_it_behaves_on(native: bool) {
    let (_t, p, _ok) = proxy(native).await;
    let (mut rd, mut wr) = handshake(p.addr).await;
    wr.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &get_block("/ok"),
    ))
    .await
    .expect("request");
    let body = within(async move {
        let mut buf = Vec::new();
        let mut body = Vec::new();
        let mut chunk = [0u8; 4096];
        // DATA frames on stream 1 until END_STREAM.
        loop {
            let n = rd.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before the response: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                assert_ne!(buf[3], GOAWAY, "GOAWAY for a correct request");
                let end = buf[3] == DATA && buf[4] & END_STREAM != 0;
                if buf[3] == DATA {
                    body.extend_from_slice(&buf[9..9 + len]);
                }
                buf.drain(..9 + len);
                if end {
                    return body;
                }
            }
        }
    })
    .await;
    assert_eq!(body, b"fine");
    let native_streams = p
        .running
        .as_ref()
        .expect("running")
        .counters()
        .http2_native_requests
        .get();
    assert_eq!(native_streams, u64::from(native), "native={native}");
}
