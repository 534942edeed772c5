//! The open-files limit of the `lb run` process.
//!
//! Every client connection, target connection and listener is a file descriptor. Services are
//! often started with a soft `RLIMIT_NOFILE` of 1,024 (systemd's and most shells' default),
//! under which the L7 tier stalls near a thousand connections (accept fails with EMFILE). The
//! hard limit is usually far higher (systemd: 524,288), and raising the soft limit up to it
//! needs no privilege, so `lb run` does that at start and reports what it got.
use std::io;

/// The open-files limit before and after [`raise_open_files_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The soft limit the process started with.
    pub previous_soft: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit (the ceiling for the soft one).
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (no change when it already is).
pub fn raise_open_files_limit() -> io::Result<OpenFilesLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let previous_soft = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard
        // limit is always permitted.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(OpenFilesLimit {
        previous_soft,
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let got = raise_open_files_limit().expect("getrlimit/setrlimit");
        assert_eq!(got.soft, got.hard, "{got:?}");
        assert!(got.previous_soft <= got.soft, "{got:?}");
        // A second call finds nothing to raise.
        let again = raise_open_files_limit().expect("again");
        assert_eq!(again.previous_soft, again.soft);
    }
}
