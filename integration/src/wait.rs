//! Waiting by polling: `eventually(what, within, attempt)`. Never a bare sleep for synchronisation.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

/// Environment variable holding how long (seconds, may be fractional) tests wait for something.
pub const PATIENCE_ENV: &str = "WEAVE_TEST_PATIENCE_SECS";

const DEFAULT_PATIENCE: Duration = Duration::from_secs(30);
const FIRST_PAUSE: Duration = Duration::from_millis(20);
const MAX_PAUSE: Duration = Duration::from_millis(500);

/// How long to wait for something that should happen soon: `$WEAVE_TEST_PATIENCE_SECS`, default 30 s.
pub fn patience() -> Duration {
    parse_patience(std::env::var(PATIENCE_ENV).ok().as_deref()).unwrap_or(DEFAULT_PATIENCE)
}

fn parse_patience(value: Option<&str>) -> Option<Duration> {
    let secs: f64 = value?.trim().parse().ok()?;
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

/// An error that ends [`eventually`] at once: waiting longer cannot help (say, the process that
/// should answer has exited).
#[derive(Debug)]
pub struct GiveUp(pub String);

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GiveUp {}

/// Calls `attempt` until it returns `Ok`, pausing a little longer each time (20 ms up to 0.5 s), for at
/// most `within`. On time-out the error is the last attempt's, with "waited N s for: `what`" added.
/// An attempt failing with [`GiveUp`] ends the wait at once.
pub fn eventually<T>(
    what: &str,
    within: Duration,
    mut attempt: impl FnMut() -> Result<T>,
) -> Result<T> {
    let start = Instant::now();
    let mut pause = FIRST_PAUSE;
    let mut tries = 0u32;
    loop {
        tries += 1;
        match attempt() {
            Ok(value) => return Ok(value),
            Err(err) => {
                let elapsed = start.elapsed();
                if elapsed >= within || err.is::<GiveUp>() {
                    return Err(err.context(format!(
                        "waited {:.1}s ({tries} tries) for: {what}",
                        elapsed.as_secs_f64()
                    )));
                }
                std::thread::sleep(pause.min(within - elapsed));
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}

/// [`eventually`] for a plain condition.
pub fn eventually_true(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    eventually(what, within, || {
        if cond() {
            Ok(())
        } else {
            Err(anyhow!("condition still false"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patience_parses_seconds() {
        assert_eq!(
            parse_patience(Some("2.5")),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(parse_patience(Some(" 7 ")), Some(Duration::from_secs(7)));
        assert_eq!(parse_patience(Some("0")), None);
        assert_eq!(parse_patience(Some("-1")), None);
        assert_eq!(parse_patience(Some("soon")), None);
        assert_eq!(parse_patience(None), None);
    }

    #[test]
    fn eventually_returns_the_first_success() {
        let mut calls = 0;
        let got = eventually("third call", Duration::from_secs(5), || {
            calls += 1;
            if calls >= 3 {
                Ok(calls)
            } else {
                Err(anyhow!("call {calls}"))
            }
        });
        assert_eq!(got.ok(), Some(3));
    }

    #[test]
    fn give_up_ends_the_wait_at_once() {
        let mut calls = 0;
        let err = eventually("nothing", Duration::from_secs(30), || -> Result<()> {
            calls += 1;
            Err(GiveUp("it exited".into()).into())
        })
        .expect_err("gives up");
        assert_eq!(calls, 1);
        assert!(format!("{err:#}").contains("it exited"));
    }

    #[test]
    fn eventually_says_what_it_waited_for() {
        let err = eventually_true("the moon to turn blue", Duration::from_millis(50), || false)
            .expect_err("never true");
        let text = format!("{err:#}");
        assert!(text.contains("for: the moon to turn blue"), "{text}");
        assert!(text.contains("condition still false"), "{text}");
    }
}
