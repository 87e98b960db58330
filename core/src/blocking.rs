//! Consul's rules for a client of blocking queries (its "Blocking Queries"
//! documentation), for an API line's watch:
//! - each answer's `X-Consul-Index` is sent back as `index`, so the next request
//!   waits for a change;
//! - an index lower than the one sent (a snapshot restore, another server)
//!   resets it to 0: the next request answers at once and the loop starts over;
//! - an index of 0 (a Consul bug, seen in older versions) is never blocked on:
//!   1 is used instead, or the loop would poll without pause;
//! - after a failed request the next one does not block: an agent back from an
//!   outage answers at once, so recovery (and `max_stale`'s confirmation) does
//!   not wait for the next change;
//! - `wait` as Consul's clients send it, less up to 1/16 at random (a fleet
//!   restarted at once does not keep asking in step), and at most half of
//!   `max_stale`, so that an unchanged service confirms its set in time;
//! - the request may take `wait` + `wait`/16 (Consul's own jitter) + `timeout`;
//! - answers that come back to back are paced: two in a row go at once, then
//!   one per `interval` (a token bucket with a burst of 2, as the documentation
//!   suggests): a churning service costs the servers what DNS polling would.

/// The smallest `wait` sent when `max_stale` is short.
const MIN_WAIT_MS: u64 = 100;
/// Requests a line may send back to back before the pacing starts.
const BURST: u64 = 2;

/// What an answer did to the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexStep {
    /// The index moved on (or this was the first answer).
    Moved,
    /// The same index: `wait` ran out, nothing changed.
    Same,
    /// The index went backwards, or the answer had none: start over from 0.
    Reset,
}

/// The index a line sends with its next request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockingIndex {
    index: u64,
}

impl BlockingIndex {
    /// What to send: 0 means "do not block" (the parameter is left out).
    pub fn get(&self) -> u64 {
        self.index
    }

    /// The request failed (no answer, an error status, a malformed body): the
    /// next one asks for the current state at once.
    pub fn failed(&mut self) {
        self.index = 0;
    }

    /// A successful answer came with `X-Consul-Index: got` (`None`: missing or
    /// not a number).
    pub fn answered(&mut self, got: Option<u64>) -> IndexStep {
        let sent = self.index;
        match got {
            None => {
                self.index = 0;
                IndexStep::Reset
            }
            Some(got) if got < sent => {
                self.index = 0;
                IndexStep::Reset
            }
            Some(got) => {
                self.index = got.max(1);
                if self.index == sent {
                    IndexStep::Same
                } else {
                    IndexStep::Moved
                }
            }
        }
    }
}

/// The `wait` to send: `wait_ms` (at most half of `max_stale`), less up to 1/16
/// at random (`random` is any random number).
pub fn wait_to_send(wait_ms: u64, max_stale_ms: Option<u64>, random: u64) -> u64 {
    let wait = match max_stale_ms {
        Some(stale) => wait_ms.min(stale / 2).max(MIN_WAIT_MS),
        None => wait_ms,
    };
    wait - random % (wait / 16 + 1)
}

/// How long a request may take: an answer at once for index 0; else the
/// `wait`, Consul's jitter of up to `wait`/16, and `timeout` for the answer.
pub fn request_time_ms(index: u64, wait_sent_ms: u64, timeout_ms: u64) -> u64 {
    if index == 0 {
        timeout_ms
    } else {
        wait_sent_ms + wait_sent_ms / 16 + timeout_ms
    }
}

/// Paces requests that follow answers: a token bucket of 2, one token per
/// `interval`.
#[derive(Clone, Debug)]
pub struct Pacer {
    interval_ms: u64,
    /// Credit in milliseconds (a request costs `interval_ms`), as of `at_ms`.
    credit_ms: u64,
    at_ms: u64,
}

impl Pacer {
    pub fn new(interval_ms: u64, now_ms: u64) -> Pacer {
        Pacer {
            interval_ms,
            credit_ms: BURST * interval_ms,
            at_ms: now_ms,
        }
    }

    /// An answer came at `now_ms`: how long to wait before the next request.
    pub fn pause_ms(&mut self, now_ms: u64) -> u64 {
        let iv = self.interval_ms;
        let credit = (self.credit_ms + now_ms.saturating_sub(self.at_ms)).min(BURST * iv);
        if credit >= iv {
            self.credit_ms = credit - iv;
            self.at_ms = now_ms.max(self.at_ms);
            0
        } else {
            let pause = iv - credit;
            self.credit_ms = 0;
            self.at_ms = now_ms + pause;
            pause
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_is_carried_reset_when_it_goes_back_and_never_zero() {
        let mut b = BlockingIndex::default();
        assert_eq!(b.get(), 0, "the first request does not block");
        assert_eq!(b.answered(Some(42)), IndexStep::Moved);
        assert_eq!(b.get(), 42);
        assert_eq!(b.answered(Some(42)), IndexStep::Same);
        assert_eq!(b.answered(Some(50)), IndexStep::Moved);
        assert_eq!(b.answered(Some(7)), IndexStep::Reset, "a snapshot restore");
        assert_eq!(b.get(), 0);
        assert_eq!(b.answered(Some(7)), IndexStep::Moved);
        assert_eq!(b.get(), 7);
        assert_eq!(b.answered(None), IndexStep::Reset, "no X-Consul-Index");
        assert_eq!(b.get(), 0);
        assert_eq!(b.answered(Some(0)), IndexStep::Moved);
        assert_eq!(b.get(), 1, "index 0 would not block: 1 does");
        assert_eq!(b.answered(Some(0)), IndexStep::Reset, "0 < 1: start over");
        assert_eq!(b.answered(Some(0)), IndexStep::Moved);
        assert_eq!(b.get(), 1);
        assert_eq!(b.answered(Some(u64::MAX)), IndexStep::Moved);
        assert_eq!(b.get(), u64::MAX);
        b.failed();
        assert_eq!(b.get(), 0, "after a failure: an answer at once");
        assert_eq!(b.answered(Some(9)), IndexStep::Moved);
    }

    #[test]
    fn wait_has_jitter_below_it_and_respects_max_stale() {
        assert_eq!(wait_to_send(300_000, None, 0), 300_000);
        let all: Vec<u64> = (0..10_000)
            .map(|r| wait_to_send(300_000, None, r * 7919))
            .collect();
        assert!(all.iter().all(|&w| (281_250..=300_000).contains(&w)));
        assert!(all.iter().any(|&w| w < 290_000) && all.iter().any(|&w| w > 299_000));
        assert_eq!(wait_to_send(300_000, Some(60_000), 0), 30_000);
        assert_eq!(wait_to_send(300_000, Some(10_000_000), 0), 300_000);
        assert_eq!(wait_to_send(300_000, Some(100), 0), MIN_WAIT_MS);
    }

    #[test]
    fn request_time_covers_wait_consul_jitter_and_timeout() {
        assert_eq!(request_time_ms(0, 300_000, 5_000), 5_000);
        assert_eq!(request_time_ms(9, 300_000, 5_000), 300_000 + 18_750 + 5_000);
    }

    #[test]
    fn two_answers_go_at_once_then_one_per_interval() {
        let mut p = Pacer::new(1000, 0);
        assert_eq!(p.pause_ms(0), 0);
        assert_eq!(p.pause_ms(10), 0);
        assert_eq!(p.pause_ms(20), 980);
        // the request went at 1000; its answer came at once
        assert_eq!(p.pause_ms(1000), 1000);
        assert_eq!(p.pause_ms(2000), 1000);
        // a quiet spell refills the bucket, at most to two
        assert_eq!(p.pause_ms(60_000), 0);
        assert_eq!(p.pause_ms(60_001), 0);
        assert_eq!(p.pause_ms(60_002), 998);
    }

    #[test]
    fn requests_per_idle_minute() {
        // Nothing changes: every answer comes after `wait`; no pause is added.
        let mut p = Pacer::new(1000, 0);
        let mut now = 0;
        let mut requests = 0;
        while now < 3_600_000 {
            let pause = p.pause_ms(now);
            assert_eq!(pause, 0);
            now += pause + wait_to_send(300_000, None, now);
            requests += 1;
        }
        assert!((12..=13).contains(&requests), "{requests} in an hour");
    }
}
