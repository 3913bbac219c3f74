//! `imgbuild logs --follow`: Chroma's container log followed through SSM Run Command, no SSH.
//! Each poll is one short AWS-RunShellScript command, `docker logs --timestamps --since <the last
//! timestamp shown>`; [`Follower`] keeps what was shown so no line is lost or shown twice across
//! polls. A failed poll is reported and retried, a bounded number of times in a row. Ctrl-C or
//! the end of `--for` cancels a poll in flight (CancelCommand): no command outlives the follow.

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

use super::{runcommand, shell_quote};
use crate::aws::Clients;
use crate::error::{Error, Result};
use crate::render;

/// At most this much output a poll: GetCommandInvocation's StandardOutputContent keeps the first
/// 24,000 characters (SSM API Reference, GetCommandInvocation); a poll that stops short of it
/// loses nothing, the next one goes on from its last line.
pub const MAX_POLL_CHARS: usize = 20_000;
/// Failed polls in a row before the follow gives up.
pub const MAX_FAILED_POLLS: u32 = 5;

/// One log line: docker's timestamp (RFC 3339, nanoseconds, UTC) and the text after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub time: String,
    pub line: String,
}

/// What has been shown: the newest timestamp, and the lines shown with exactly that timestamp.
/// `--since` takes the RFC3339Nano stamp `--timestamps` prints (moby `api/types/time`
/// GetTimestamp: "layouts for use ... with --since and --until parameters for `docker logs`")
/// and keeps entries not before it, so those at the instant itself come again.
#[derive(Debug, Default, Clone)]
pub struct Follower {
    since: Option<String>,
    raw_since: Option<String>,
    shown_at_since: Vec<String>,
}

impl Follower {
    /// The shell command of the next poll: the last `tail` lines the first time, then everything
    /// since the last timestamp shown, cut to [`MAX_POLL_CHARS`] at a line's end.
    pub fn command(&self, tail: u32) -> Vec<String> {
        let container = render::compose::SERVICE;
        let window = match &self.raw_since {
            Some(t) => format!("--since {}", shell_quote(t)),
            None => format!("--tail {tail}"),
        };
        vec![format!(
            "if ! docker inspect --type container {c} >/dev/null 2>&1; then echo {missing} >&2; exit 3; fi; \
             docker logs --timestamps {window} {c} 2>&1 | awk -v max={MAX_POLL_CHARS} '{{ n += length($0) + 1; if (n > max && NR > 1) exit; print }}'",
            c = shell_quote(container),
            missing = shell_quote(&format!("imgbuild-follow: no container named {container} on this instance"))
        )]
    }

    /// The lines of a poll's output not shown before, in order; remembers them.
    pub fn take(&mut self, stdout: &str) -> Vec<LogLine> {
        let mut repeats = self.shown_at_since.clone();
        let mut out = Vec::new();
        for raw in stdout.lines() {
            let Some((time, key, text)) = split(raw) else {
                // docker stamps every entry; anything else (a message of the shell around it) is
                // shown as it is rather than lost.
                out.push(LogLine { time: String::new(), line: raw.to_string() });
                continue;
            };
            match self.since.as_deref().map(|s| key.as_str().cmp(s)) {
                Some(std::cmp::Ordering::Less) => continue,
                Some(std::cmp::Ordering::Equal) => {
                    if let Some(i) = repeats.iter().position(|r| r == raw) {
                        repeats.remove(i);
                        continue;
                    }
                    self.shown_at_since.push(raw.to_string());
                }
                _ => {
                    self.since = Some(key);
                    self.raw_since = Some(time.to_string());
                    self.shown_at_since = vec![raw.to_string()];
                    repeats.clear();
                }
            }
            out.push(LogLine { time: time.to_string(), line: text.to_string() });
        }
        out
    }
}

/// docker's `2026-11-29T15:31:03.123456789Z text`: the timestamp, its sortable form (the
/// fraction padded to nine digits), and the text.
fn split(raw: &str) -> Option<(&str, String, &str)> {
    let (time, text) = raw.split_once(' ').unwrap_or((raw, ""));
    let body = time.strip_suffix('Z')?;
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    let b = secs.as_bytes();
    let shape = b.len() == 19
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        });
    if !shape || frac.len() > 9 || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((time, format!("{secs}.{frac:0<9}Z"), text))
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Between the end of one poll and the start of the next.
    pub interval: Duration,
    /// Stop after this long (`--for`); `None`: until Ctrl-C.
    pub until: Option<Duration>,
    /// Lines shown from before the follow started.
    pub tail: u32,
    /// Longest one poll's command may take.
    pub command_timeout: Duration,
    /// Between GetCommandInvocation calls while a poll runs.
    pub invocation_poll: Duration,
}

/// What the follow reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Lines(Vec<LogLine>),
    /// A poll failed; the next comes after `retry_in`.
    PollFailed {
        attempt: u32,
        error: String,
        retry_in: Duration,
    },
}

/// Why the follow ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ended {
    /// "interrupted" (Ctrl-C), "duration" (`--for`) or "output closed".
    pub reason: &'static str,
    /// The poll in flight that was cancelled, if one was.
    pub cancelled: Option<String>,
    /// A cancellation AWS refused (the command then ends at its own timeout).
    pub cancel_error: Option<String>,
}

/// Follows the log on `instance` until `stop` resolves, `until` passes, or `on` says the reader
/// is gone (returns false: a closed pipe). The send of a poll is
/// never raced (a command AWS accepted but whose id was never read could not be cancelled);
/// its wait is, and a poll cut short is cancelled.
pub async fn follow(clients: &Clients, instance: &str, opts: &Options, stop: impl Future<Output = ()>, mut on: impl FnMut(Event) -> bool) -> Result<Ended> {
    tokio::pin!(stop);
    let deadline = async {
        match opts.until {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut follower = Follower::default();
    let mut failures = 0u32;
    let ended = |reason, cancelled: Option<String>, cancel_error: Option<String>| Ended { reason, cancelled, cancel_error };
    loop {
        let sent = runcommand::send(clients, instance, follower.command(opts.tail), "imgbuild logs --follow", opts.command_timeout).await;
        let result = match sent {
            Ok(id) => {
                let stopped = tokio::select! {
                    r = runcommand::wait(clients, instance, &id, opts.command_timeout, opts.invocation_poll) => Err(r),
                    _ = &mut stop => Ok("interrupted"),
                    _ = &mut deadline => Ok("duration"),
                };
                match stopped {
                    Err(Err(e @ Error::Timeout { .. })) => {
                        // Still running on the instance: it must not be left there.
                        let _ = runcommand::cancel(&clients.for_cleanup(), instance, &id).await;
                        Err(e)
                    }
                    Err(r) => r,
                    Ok(reason) => {
                        let err = runcommand::cancel(&clients.for_cleanup(), instance, &id).await.err().map(|e| e.to_string());
                        return Ok(ended(reason, Some(id), err));
                    }
                }
            }
            Err(e) => Err(e),
        };
        let wait = match result {
            Ok(inv) => {
                failures = 0;
                let lines = follower.take(&inv.stdout);
                if !lines.is_empty() && !on(Event::Lines(lines)) {
                    return Ok(ended("output closed", None, None));
                }
                opts.interval
            }
            Err(e) => {
                failures += 1;
                if failures >= MAX_FAILED_POLLS {
                    return Err(Error::Tool(format!("following the log on {instance}: {MAX_FAILED_POLLS} polls in a row failed, the last: {e}")));
                }
                // Backs off, never past a minute: a stopped agent or a throttle needs time.
                let retry_in = (opts.interval * failures).min(Duration::from_secs(60));
                if !on(Event::PollFailed { attempt: failures, error: e.to_string(), retry_in }) {
                    return Ok(ended("output closed", None, None));
                }
                retry_in
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => return Ok(ended("interrupted", None, None)),
            _ = &mut deadline => return Ok(ended("duration", None, None)),
        }
    }
}
