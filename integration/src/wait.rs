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

/// How long a negative check watches for something that must not happen: a sixth of the
/// patience (5 s by default), at least 2 s. Scales with `WEAVE_TEST_PATIENCE_SECS` like every
/// wait, so a slow machine watches longer instead of passing by looking too early.
pub fn quiet_period() -> Duration {
    (patience() / 6).max(Duration::from_secs(2))
}

/// Watches for `within` that something does not happen. `look` is called again and again
/// (at least once, with [`eventually`]'s pauses) and says what it saw: `Ok(None)`, it looked
/// and the thing did not happen; `Ok(Some(evidence))`, it happened; `Err`, it could not look,
/// which proves nothing and fails the check too. Prints how many looks it took, so a run's
/// output shows the probe ran; returns that number.
pub fn never(
    what: &str,
    within: Duration,
    mut look: impl FnMut() -> Result<Option<String>>,
) -> Result<u32> {
    let start = Instant::now();
    let mut pause = FIRST_PAUSE;
    let mut looks = 0u32;
    loop {
        looks += 1;
        let seen = look().map_err(|e| {
            e.context(format!(
                "look {looks} failed; cannot tell whether never: {what}"
            ))
        })?;
        if let Some(evidence) = seen {
            return Err(anyhow!(
                "it happened after {:.1}s (look {looks}), but never: {what}\n{evidence}",
                start.elapsed().as_secs_f64()
            ));
        }
        let elapsed = start.elapsed();
        if elapsed >= within {
            eprintln!(
                "never: {what}: not seen in {looks} looks over {:.1}s",
                elapsed.as_secs_f64()
            );
            return Ok(looks);
        }
        std::thread::sleep(pause.min(within - elapsed));
        pause = (pause * 2).min(MAX_PAUSE);
    }
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

    #[test]
    fn never_looks_until_the_period_ends() {
        let mut calls = 0;
        let looks = never("rain", Duration::from_millis(100), || {
            calls += 1;
            Ok(None)
        });
        assert_eq!(looks.ok(), Some(calls));
        assert!(calls >= 2, "{calls}");
    }

    #[test]
    fn never_fails_when_it_happens_or_cannot_look() {
        let mut calls = 0;
        let err = never("rain", Duration::from_secs(30), || {
            calls += 1;
            Ok((calls == 2).then(|| "wet".to_string()))
        })
        .expect_err("it rained");
        assert_eq!(calls, 2);
        assert!(format!("{err:#}").contains("wet"), "{err:#}");
        let err = never("rain", Duration::from_secs(30), || {
            Err(anyhow!("no window"))
        })
        .expect_err("could not look");
        let text = format!("{err:#}");
        assert!(
            text.contains("no window") && text.contains("cannot tell"),
            "{text}"
        );
    }
}
