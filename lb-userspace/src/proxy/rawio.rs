//! Reads and writes on a target's plain TCP socket through the system calls themselves.
//!
//! glibc's `recv` and `send` are POSIX cancellation points: in a process with more than one
//! thread each brackets its system call with `__pthread_enable_asynccancel` and
//! `__pthread_disable_asynccancel`, a `lock cmpxchg` each on the thread's descriptor (stop
//! 40's count: 8.3 locked instructions per HTTP/1.1 request over the client and target
//! sides). `lb` never cancels a thread, so the bracket protects nothing here; `syscall(2)` is
//! not a cancellation point. [`Raw`] reads and writes through it, waiting on tokio's readiness
//! as the socket's own `AsyncRead`/`AsyncWrite` do: `EINTR` is retried, `EAGAIN` clears the
//! readiness and waits for the next event, a short read or write clears it too (the next
//! call would find the socket empty or full: tokio saves that system call the same way), and
//! a short write returns what was written.
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd as _, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A plain TCP socket read and written with raw system calls (see the module docs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Raw<'a>(pub &'a TcpStream);

/// Makes the system call `call` until it is not interrupted (`EINTR`): its count, or the
/// error in `errno`.
fn retrying(mut call: impl FnMut() -> libc::c_long) -> io::Result<usize> {
    loop {
        match usize::try_from(call()).map_err(|_| io::Error::last_os_error()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// `recvfrom(fd, buf, len, 0, NULL, NULL)`: what glibc's `recv` calls, without its
/// cancellation point.
pub(crate) fn recv(fd: RawFd, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, the most the kernel writes; no
    // address is asked for.
    retrying(|| unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            libc::c_long::from(fd),
            buf.as_mut_ptr(),
            buf.len(),
            0 as libc::c_long,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    })
}

/// `sendto(fd, buf, len, MSG_NOSIGNAL, NULL, 0)`: what glibc's `send` calls (with the flag
/// std's `TcpStream` passes on Linux: a closed peer is `EPIPE`, not `SIGPIPE`), without its
/// cancellation point.
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes; no address is given.
    retrying(|| unsafe {
        libc::syscall(
            libc::SYS_sendto,
            libc::c_long::from(fd),
            buf.as_ptr(),
            buf.len(),
            libc::c_long::from(libc::MSG_NOSIGNAL),
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::c_long,
        )
    })
}

/// Runs `op` once the socket is ready for `interest`, as tokio's own reads and writes do:
/// `WouldBlock` (and a short count, which `op` reports as `WouldBlock` after saving it)
/// clears the readiness; a short count is still returned.
fn poll_op(
    s: &TcpStream,
    cx: &mut Context<'_>,
    interest: Interest,
    want: usize,
    mut op: impl FnMut(RawFd) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        if interest.is_readable() {
            ready!(s.poll_read_ready(cx))?;
        } else {
            ready!(s.poll_write_ready(cx))?;
        }
        let mut short = None;
        match s.try_io(interest, || match op(s.as_raw_fd()) {
            Ok(n) if n > 0 && n < want => {
                short = Some(n);
                Err(io::ErrorKind::WouldBlock.into())
            }
            other => other,
        }) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(n) = short {
                    return Poll::Ready(Ok(n));
                }
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for Raw<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining();
        // SAFETY: `recv` only writes the bytes it reports, and only those are marked filled.
        let unfilled = unsafe { buf.unfilled_mut() };
        let n = ready!(poll_op(self.0, cx, Interest::READABLE, want, |fd| recv(
            fd,
            &mut *unfilled
        )))?;
        // SAFETY: the kernel initialised the first `n` bytes of the unfilled part.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Raw<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_op(self.0, cx, Interest::WRITABLE, buf.len(), |fd| {
            send(fd, buf)
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TCP socket buffers nothing in user space.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown(2) on a descriptor the stream owns.
        let r = unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// Bytes written through [`Raw`] arrive whole and in order, also when they fill the
    /// socket buffers (short writes, `EAGAIN` and waits on readiness), and a read through it
    /// returns them, then 0 at the peer's close.
    #[tokio::test]
    async fn raw_reads_and_writes_carry_every_byte_and_the_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            Raw(&s).write_all(&data).await.unwrap();
            Raw(&s).shutdown().await.unwrap();
            let mut back = Vec::new();
            Raw(&s).read_to_end(&mut back).await.unwrap();
            back
        });
        let (t, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 65536];
        loop {
            let n = Raw(&t).read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            // Slow reader: the writer meets a full socket.
            if got.len() < 1 << 20 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the bytes read differ from those written");
        Raw(&t).write_all(b"bye").await.unwrap();
        drop(t);
        assert_eq!(writer.await.unwrap(), b"bye");
    }
}
