//! Waiting for a condition with a deadline, without asserting how long it takes.
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How often [`wait_until`] looks again.
pub const POLL: Duration = Duration::from_millis(50);

/// Calls `check` every [`POLL`] until it returns `Break(value)` (then returns the value) or
/// `timeout` passes (then fails with `what` and the last `Continue(why)`, which should say
/// what was seen instead). An `Err` from `check` ends the wait at once: a failing probe is a
/// broken test, not a condition not yet met.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<ControlFlow<T, String>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let why = match check()? {
            ControlFlow::Break(value) => return Ok(value),
            ControlFlow::Continue(why) => why,
        };
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}; last seen: {why}");
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_or_fails_with_the_last_observation() {
        let mut n = 0;
        let v = wait_until(Duration::from_secs(5), "n reaches 3", || {
            n += 1;
            Ok(if n >= 3 {
                ControlFlow::Break(n)
            } else {
                ControlFlow::Continue(format!("n = {n}"))
            })
        })
        .unwrap();
        assert_eq!(v, 3);
        let e = wait_until(Duration::from_millis(120), "never", || {
            Ok(ControlFlow::<(), _>::Continue("still no".to_owned()))
        })
        .unwrap_err();
        assert!(e.to_string().contains("never") && e.to_string().contains("still no"));
    }
}
