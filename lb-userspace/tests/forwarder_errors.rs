//! Target failures map to ALB's statuses: 502 for refused, broken or malformed, 504 for slow.
mod support_client;

use std::time::Duration;

use lb::proxy::client::{ClientConfig, Forwarder, h1};
use lb::proxy::error::ProxyError;
use support_client::{
    RawBehaviour, RawTarget, SAFETY, answering_target, config, forward_collect, get, plain,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[tokio::test]
async fn a_refused_connection_is_a_502_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    drop(listener);
    let error = forward_collect(&Forwarder::new(config()), &plain(addr), get("/"))
        .await
        .expect_err("nobody listens");
    assert!(matches!(error, ProxyError::Connect { .. }), "{error:?}");
    assert_eq!(error.status(), 502);
}

#[tokio::test]
async fn a_target_that_never_answers_is_a_504_after_the_idle_timeout() {
    let (addr, _target) = answering_target(b"").await;
    let forwarder = Forwarder::new(ClientConfig {
        idle_timeout: Duration::from_millis(300),
        ..config()
    });
    let error = forward_collect(&forwarder, &plain(addr), get("/"))
        .await
        .expect_err("no answer");
    assert!(
        matches!(error, ProxyError::TargetTimeout { .. }),
        "{error:?}"
    );
    assert_eq!(error.status(), 504);
}

/// Our own client keeps one idle timer per connection and does not reset it per request
/// (`h1::send`): on a reused connection it is still due at the first request's deadline. The
/// second request's answer comes after that deadline but well within its own idle timeout,
/// so it must be answered, not a 504.
#[tokio::test]
async fn a_reused_connection_times_each_request_from_its_own_start() {
    const IDLE: Duration = Duration::from_secs(3);
    /// Between the requests, and how long the target takes with the second: together past the
    /// first request's deadline, alone a second inside the second's.
    const GAP: Duration = Duration::from_secs(2);
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let _target = tokio::spawn(async move {
        let mut answered = 0usize;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            loop {
                let mut chunk = [0u8; 4096];
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    buf.drain(..end + 4);
                    if answered > 0 {
                        tokio::time::sleep(GAP).await;
                    }
                    answered += 1;
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            }
        }
    });
    let forwarder = Forwarder::new(ClientConfig {
        idle_timeout: IDLE,
        ..config()
    });
    forward_collect(&forwarder, &plain(addr), get("/first"))
        .await
        .expect("answered at once");
    tokio::time::sleep(GAP).await;
    let (second, body) = forward_collect(&forwarder, &plain(addr), get("/second"))
        .await
        .expect("answered 2 s after it was sent, within its 3 s idle timeout");
    assert!(
        second.reused_connection,
        "the second request must go out on the first one's connection to test its timer"
    );
    assert_eq!(body, "ok");
}

#[tokio::test]
async fn a_target_answering_garbage_is_a_502() {
    let (addr, _target) = answering_target(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
    let error = forward_collect(&Forwarder::new(config()), &plain(addr), get("/"))
        .await
        .expect_err("garbage");
    assert!(
        matches!(error, ProxyError::TargetFailed { .. }),
        "{error:?}"
    );
    assert_eq!(error.status(), 502);
}

#[tokio::test]
async fn a_target_closing_without_answering_is_a_502() {
    let target = RawTarget::start(RawBehaviour {
        reset_after_reading_request: Some(1),
        ..RawBehaviour::default()
    })
    .await;
    let error = forward_collect(&Forwarder::new(config()), &plain(target.addr), get("/"))
        .await
        .expect_err("reset");
    assert!(
        matches!(error, ProxyError::TargetFailed { .. }),
        "{error:?}"
    );
    assert_eq!(error.status(), 502);
    assert_eq!(
        target.seen().len(),
        1,
        "a failure on a new connection is not retried"
    );
}

#[tokio::test]
async fn response_headers_over_32_kib_are_a_502() {
    let target = RawTarget::start(RawBehaviour {
        pad_response_headers_to: Some(33 * 1024),
        ..RawBehaviour::default()
    })
    .await;
    let error = forward_collect(&Forwarder::new(config()), &plain(target.addr), get("/"))
        .await
        .expect_err("too large");
    assert!(
        matches!(error, ProxyError::TargetFailed { .. }),
        "{error:?}"
    );
    assert_eq!(error.status(), 502);
    // Plain-TCP HTTP/1.1 targets go through our own client (`h1`), others through hyper's.
    let cause = std::error::Error::source(&error);
    let too_large = cause
        .and_then(|cause| cause.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_parse_too_large)
        || cause
            .and_then(|cause| cause.downcast_ref::<h1::H1Error>())
            .is_some_and(|e| matches!(e, h1::H1Error::HeadTooLarge(_)));
    assert!(too_large, "rejected for its size: {error:?}");
}

#[tokio::test]
async fn response_headers_just_under_32_kib_pass() {
    let target = RawTarget::start(RawBehaviour {
        pad_response_headers_to: Some(31 * 1024),
        ..RawBehaviour::default()
    })
    .await;
    let (forwarded, _) = forward_collect(&Forwarder::new(config()), &plain(target.addr), get("/"))
        .await
        .expect("within the limit");
    assert_eq!(forwarded.response.status(), 200);
    assert!(forwarded.response.headers()["x-pad"].len() > 30 * 1024);
}

/// A listener with backlog 0 whose accept queue is full drops new SYNs, so connecting hangs:
/// deterministic on Linux loopback as long as the queued connections are never accepted.
#[tokio::test]
async fn a_connection_not_established_within_the_connect_timeout_is_a_504() {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind loopback");
    let addr = socket.local_addr().expect("local address");
    let _listener = socket.listen(0).expect("listen");
    // Fill the accept queue until a connect no longer completes.
    let mut queued = Vec::new();
    loop {
        assert!(queued.len() < 16, "the accept queue never filled");
        // A loopback connect completes at once unless the queue is full; a whole second
        // keeps a slow scheduler from being mistaken for a full queue.
        match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => queued.push(stream),
            Ok(Err(error)) => panic!("connecting to the filling listener failed: {error}"),
            Err(_) => break,
        }
    }
    let forwarder = Forwarder::new(ClientConfig {
        connect_timeout: Duration::from_millis(300),
        ..config()
    });
    let error = tokio::time::timeout(SAFETY, forward_collect(&forwarder, &plain(addr), get("/")))
        .await
        .expect("within the safety net")
        .expect_err("cannot connect");
    assert!(
        matches!(error, ProxyError::ConnectTimeout { .. }),
        "{error:?}"
    );
    assert_eq!(error.status(), 504);
}
