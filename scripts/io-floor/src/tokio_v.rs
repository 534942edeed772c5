//! (a) `epoll-tokio`: tokio's multi-thread runtime with 2 workers, one task per client
//! connection (lb's model).
use crate::frame::{BACKEND_BUF, CLIENT_BUF, Resp, request_len, response_len};
use crate::stats::*;
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering::Relaxed;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub fn run(listen: SocketAddrV4, backend: SocketAddrV4, workers: usize) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let l = TcpListener::bind(listen).await?;
        loop {
            let (c, _) = l.accept().await?;
            tokio::spawn(async move {
                PAIRS_OPENED.fetch_add(1, Relaxed);
                let _ = pair(c, backend).await;
                PAIRS_CLOSED.fetch_add(1, Relaxed);
            });
        }
    })
}

async fn pair(mut c: TcpStream, backend: SocketAddrV4) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    let mut b = TcpStream::connect(backend).await?;
    b.set_nodelay(true)?;
    let (mut cbuf, mut clen) = (vec![0u8; CLIENT_BUF], 0);
    let (mut bbuf, mut blen) = (vec![0u8; BACKEND_BUF], 0);
    let mut done = Done(0);
    loop {
        let h = loop {
            if let Some(h) = request_len(&cbuf[..clen]) {
                break h;
            }
            if clen == cbuf.len() {
                BAD.fetch_add(1, Relaxed);
                return Ok(());
            }
            let n = c.read(&mut cbuf[clen..]).await?;
            if n == 0 {
                return Ok(());
            }
            clen += n;
        };
        burn();
        b.write_all(&cbuf[..h]).await?;
        cbuf.copy_within(h..clen, 0);
        clen -= h;
        let t = loop {
            match response_len(&bbuf[..blen]) {
                Resp::Complete(t) => break t,
                Resp::Bad => {
                    BAD.fetch_add(1, Relaxed);
                    return Ok(());
                }
                Resp::Incomplete if blen == bbuf.len() => {
                    BAD.fetch_add(1, Relaxed);
                    return Ok(());
                }
                Resp::Incomplete => {}
            }
            let n = b.read(&mut bbuf[blen..]).await?;
            if n == 0 {
                return Ok(());
            }
            blen += n;
        };
        c.write_all(&bbuf[..t]).await?;
        done.0 += 1;
        bbuf.copy_within(t..blen, 0);
        blen -= t;
    }
}

/// Responses of one pair, added to the shared counter once, when the pair ends.
struct Done(u64);

impl Drop for Done {
    fn drop(&mut self) {
        RESPONSES.fetch_add(self.0, Relaxed);
    }
}
