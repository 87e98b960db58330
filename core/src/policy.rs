//! What discovery does with each lookup outcome: publish, keep or drop the set,
//! when to ask next, and which line to log — once per streak, never per attempt.

use crate::key::UpstreamKey;
use crate::peer::Peer;
use crate::settings::{Policy, Settings};

/// Backoff after resolver failures doubles from `interval` up to this (or `interval`,
/// if larger): a Consul agent back from a restart is found within seconds, not 30 s.
pub const MAX_BACKOFF_MS: u64 = 10_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A non-empty peer set.
    Peers(Vec<Peer>),
    /// Consul's "no healthy instance": NXDOMAIN (`true`) or no records.
    Empty { nxdomain: bool },
    /// Timeout, refused, SERVFAIL, malformed answer.
    Failed(String),
    /// An answer with more peers than the zone holds (with the others' parts).
    Oversize {
        peers: usize,
        capacity: usize,
        zone_size: usize,
        needed_size: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write this set (the caller skips the write if it equals the current one).
    Publish(Vec<Peer>),
    Keep,
    /// Remove every discovered peer (fallback servers, if any, take over).
    Drop,
}

/// The level of a log line discovery writes (the policy's own lines are
/// errors, warnings and notices).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Notice,
    Info,
    /// nginx's debug log (a build `--with-debug`).
    Debug,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub log: Option<(Level, String)>,
    pub next_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Streak {
    None,
    Empty,
    Failed(u32),
    Oversize(u32),
}

/// The streak a line is in, for the status report: kind, length, since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreakStatus {
    pub kind: crate::zone::StreakKind,
    pub count: u32,
    pub since_ms: Option<u64>,
}

/// Per-upstream discovery state in the writing worker.
#[derive(Clone, Debug)]
pub struct Tracker {
    /// The upstream's log prefix (see [`UpstreamKey::log_prefix`]).
    prefix: String,
    query: String,
    interval_ms: u64,
    on_empty: Policy,
    on_error: Policy,
    max_stale_ms: Option<u64>,
    streak: Streak,
    streak_since_ms: Option<u64>,
    /// When the current set was last confirmed by a non-empty answer (or loaded).
    last_good_ms: Option<u64>,
    stale_dropped: bool,
    /// An `api=` line: an agent answers, not a resolver; an empty answer is JSON.
    api: bool,
}

/// "1 peer", "2 peers".
pub fn peers(n: usize) -> String {
    if n == 1 {
        "1 peer".into()
    } else {
        format!("{n} peers")
    }
}

/// What a failure streak does with the line's published part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Keep,
    Drop,
}

/// ", keeping 2 peers", ", dropping 1 peer"; ", no peers to keep" when the line
/// has none (a start with Consul down and no state file: the operator reads
/// there that this line serves nothing).
fn tail(verb: Verb, current: usize) -> String {
    match (verb, current) {
        (Verb::Keep, 0) => ", no peers to keep".into(),
        (Verb::Drop, 0) => ", no peers to drop".into(),
        (Verb::Keep, n) => format!(", keeping {}", peers(n)),
        (Verb::Drop, n) => format!(", dropping {}", peers(n)),
    }
}

impl Tracker {
    pub fn new(upstream: &UpstreamKey, settings: &Settings) -> Tracker {
        Tracker {
            prefix: upstream.log_prefix().to_string(),
            query: settings.query.clone(),
            interval_ms: settings.interval_ms,
            on_empty: settings.on_empty,
            on_error: settings.on_error,
            max_stale_ms: settings.max_stale_ms,
            streak: Streak::None,
            streak_since_ms: None,
            last_good_ms: None,
            stale_dropped: false,
            api: settings.api.is_some(),
        }
    }

    /// A set carried over (zone after a reload, state file after a restart) was
    /// last confirmed at `confirmed_ms`: `max_stale` counts from there.
    pub fn loaded(&mut self, confirmed_ms: u64) {
        self.last_good_ms = Some(confirmed_ms);
    }

    /// Goes on with the streak a line's record holds (kind, count, start):
    /// another process began it and logged its first line — the master's lookup
    /// before the workers started, or the previous worker 0 before a reload or
    /// a respawn. This one logs only its end (`resolver recovered after ...`).
    pub fn resume(&mut self, record: &crate::zone::LineStatus, now_ms: u64, now_unix: u64) {
        use crate::zone::StreakKind;
        let count = record.streak_count.max(1);
        self.streak = match record.streak_kind {
            k if k == StreakKind::Empty as u32 => Streak::Empty,
            k if k == StreakKind::Failed as u32 => Streak::Failed(count),
            k if k == StreakKind::Oversize as u32 => Streak::Oversize(count),
            _ => return,
        };
        let age_ms = now_unix
            .saturating_sub(record.streak_since_unix)
            .saturating_mul(1000);
        self.streak_since_ms = Some(now_ms.saturating_sub(age_ms));
    }

    /// When the set was last confirmed by a non-empty answer (or loaded).
    pub fn last_good_ms(&self) -> Option<u64> {
        self.last_good_ms
    }

    pub fn streak(&self) -> StreakStatus {
        use crate::zone::StreakKind;
        let (kind, count) = match self.streak {
            Streak::None => (StreakKind::None, 0),
            Streak::Empty => (StreakKind::Empty, 1),
            Streak::Failed(n) => (StreakKind::Failed, n),
            Streak::Oversize(n) => (StreakKind::Oversize, n),
        };
        StreakStatus {
            kind,
            count,
            since_ms: self.streak_since_ms,
        }
    }

    fn prefix(&self) -> String {
        self.prefix.clone()
    }

    /// The delay before the next query: `interval` normally, doubling while the
    /// resolver fails, moved by up to ±interval/20 so that a fleet of nginx hosts
    /// does not query in lock-step. `jitter_ms` is random in 0..=interval/10; its
    /// mean keeps the mean delay at `interval`.
    fn next_ms(&self, jitter_ms: u64) -> u64 {
        let base = match self.streak {
            Streak::Failed(n) | Streak::Oversize(n) if n > 1 => {
                let cap = MAX_BACKOFF_MS.max(self.interval_ms);
                let shift = (n - 1).min(20);
                self.interval_ms.saturating_mul(1 << shift).min(cap)
            }
            _ => self.interval_ms,
        };
        let spread = self.interval_ms / 10;
        base - spread / 2 + jitter_ms.min(spread)
    }

    /// `current` is how many discovered peers are published now.
    pub fn on_outcome(
        &mut self,
        outcome: Outcome,
        current: usize,
        now_ms: u64,
        jitter_ms: u64,
    ) -> Decision {
        let p = self.prefix();
        let before = std::mem::discriminant(&self.streak);
        let (action, log) = match outcome {
            Outcome::Peers(set) => {
                let log = match self.streak {
                    Streak::Failed(n) => Some((
                        Level::Notice,
                        format!(
                            "{p}{} recovered after {n} failed attempts",
                            if self.api { "agent" } else { "resolver" }
                        ),
                    )),
                    _ => None,
                };
                self.streak = Streak::None;
                self.last_good_ms = Some(now_ms);
                self.stale_dropped = false;
                (Action::Publish(set), log)
            }
            Outcome::Empty { nxdomain } => {
                let first = self.streak != Streak::Empty;
                self.streak = Streak::Empty;
                let why = match (nxdomain, self.api) {
                    (_, true) => "empty answer",
                    (true, false) => "NXDOMAIN",
                    (false, false) => "no records",
                };
                let (action, verb) = self.apply(self.on_empty, current);
                let log = first.then(|| {
                    (
                        Level::Warn,
                        format!(
                            "{p}{} has no healthy instances ({why}){}",
                            self.query,
                            tail(verb, current)
                        ),
                    )
                });
                (action, log)
            }
            Outcome::Failed(reason) => {
                let n = match self.streak {
                    Streak::Failed(n) => n + 1,
                    _ => 1,
                };
                self.streak = Streak::Failed(n);
                let (action, verb) = self.apply(self.on_error, current);
                let log = (n == 1).then(|| {
                    (
                        Level::Warn,
                        format!(
                            "{p}resolving {} failed: {reason}{}",
                            self.query,
                            tail(verb, current)
                        ),
                    )
                });
                (action, log)
            }
            Outcome::Oversize {
                peers: total,
                capacity,
                zone_size,
                needed_size,
            } => {
                let n = match self.streak {
                    Streak::Oversize(n) => n + 1,
                    _ => 1,
                };
                self.streak = Streak::Oversize(n);
                let (action, verb) = self.apply(self.on_error, current);
                let log = (n == 1).then(|| {
                    (
                        Level::Error,
                        format!(
                            "{p}{} do not fit in zone={}k (max {}), zone={}k needed{}",
                            peers(total),
                            zone_size / 1024,
                            peers(capacity),
                            needed_size / 1024,
                            tail(verb, current)
                        ),
                    )
                });
                (action, log)
            }
        };
        if std::mem::discriminant(&self.streak) != before {
            self.streak_since_ms = match self.streak {
                Streak::None => None,
                _ => Some(now_ms),
            };
        }
        let (action, log) = self.check_stale(action, log, current, now_ms);
        let next_ms = match self.stale_left_ms(&action, current, now_ms) {
            Some(left) => self.next_ms(jitter_ms).min(left.max(1)),
            None => self.next_ms(jitter_ms),
        };
        Decision {
            action,
            log,
            next_ms,
        }
    }

    /// While a kept set waits for `max_stale`: the time left (0 once it is
    /// due). The next query comes no later than that moment: a backoff of up to
    /// 10 s would otherwise drop the set up to 10 s late.
    fn stale_left_ms(&self, action: &Action, current: usize, now_ms: u64) -> Option<u64> {
        let (Action::Keep, Some(max), Some(good)) = (action, self.max_stale_ms, self.last_good_ms)
        else {
            return None;
        };
        if current == 0 || self.stale_dropped {
            return None;
        }
        Some((good + max).saturating_sub(now_ms))
    }

    /// When `max_stale` drops the line's `current` peers if no successful answer
    /// comes first (monotonic ms); `None` without `max_stale`, peers, or once
    /// dropped. An API line waits for a blocking answer no longer than this.
    pub fn stale_due_ms(&self, current: usize) -> Option<u64> {
        let (Some(max), Some(good)) = (self.max_stale_ms, self.last_good_ms) else {
            return None;
        };
        (current > 0 && !self.stale_dropped).then_some(good + max)
    }

    /// No answer came before [`Tracker::stale_due_ms`] (a blocking request still
    /// waits): the drop `max_stale` asks for, if it is due at `now_ms`.
    pub fn expire(&mut self, current: usize, now_ms: u64) -> Option<Decision> {
        if self.stale_due_ms(current).is_none_or(|due| due > now_ms) {
            return None;
        }
        let (action, log) = self.check_stale(Action::Keep, None, current, now_ms);
        Some(Decision {
            action,
            log,
            next_ms: 0,
        })
    }

    fn apply(&self, policy: Policy, current: usize) -> (Action, Verb) {
        match policy {
            Policy::Keep => (Action::Keep, Verb::Keep),
            Policy::Fail if current > 0 => (Action::Drop, Verb::Drop),
            Policy::Fail => (Action::Keep, Verb::Drop),
        }
    }

    fn check_stale(
        &mut self,
        action: Action,
        log: Option<(Level, String)>,
        current: usize,
        now_ms: u64,
    ) -> (Action, Option<(Level, String)>) {
        if self.stale_left_ms(&action, current, now_ms) != Some(0) {
            return (action, log);
        }
        let good = self.last_good_ms.unwrap_or(now_ms);
        self.stale_dropped = true;
        let secs = now_ms.saturating_sub(good) / 1000;
        let line = format!(
            "{}no successful answer for {secs}s (max_stale), dropping {}",
            self.prefix(),
            peers(current)
        );
        (Action::Drop, Some((Level::Warn, line)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(extra: &str) -> Tracker {
        let line = format!("redis.service.yunlu_office.consul {extra}");
        let args: Vec<&str> = line.split_whitespace().collect();
        Tracker::new(
            &UpstreamKey::stream("redis"),
            &Settings::parse(&args).unwrap(),
        )
    }

    fn peers(n: usize) -> Vec<Peer> {
        (0..n)
            .map(|i| Peer::new(format!("127.0.0.1:{}", 6380 + i).parse().unwrap(), 1, 1))
            .collect()
    }

    fn failed() -> Outcome {
        Outcome::Failed("connection refused".into())
    }

    #[test]
    fn a_failure_with_nothing_published_says_so() {
        // A start with Consul down and no state file: the first line an
        // operator sees must say that the line has no peers.
        let mut t = tracker("");
        let d = t.on_outcome(failed(), 0, 0, 0);
        assert_eq!(d.action, Action::Keep);
        assert_eq!(
            d.log,
            Some((
                Level::Warn,
                "consul upstream \"redis\": resolving redis.service.yunlu_office.consul failed: connection refused, no peers to keep".into()
            ))
        );
        let mut t = tracker("");
        let d = t.on_outcome(Outcome::Empty { nxdomain: false }, 0, 0, 0);
        assert!(d
            .log
            .unwrap()
            .1
            .ends_with("has no healthy instances (no records), no peers to keep"));
    }

    #[test]
    fn resolver_failures_keep_the_set_and_warn_once_then_recover() {
        let mut t = tracker("");
        assert_eq!(
            t.on_outcome(Outcome::Peers(peers(2)), 0, 0, 0).action,
            Action::Publish(peers(2))
        );
        let d = t.on_outcome(failed(), 2, 1000, 0);
        assert_eq!(d.action, Action::Keep);
        assert_eq!(
            d.log,
            Some((
                Level::Warn,
                "consul upstream \"redis\": resolving redis.service.yunlu_office.consul failed: connection refused, keeping 2 peers".into()
            ))
        );
        assert_eq!(t.on_outcome(failed(), 2, 2000, 0).log, None);
        assert_eq!(t.on_outcome(failed(), 2, 3000, 0).log, None);
        let d = t.on_outcome(Outcome::Peers(peers(2)), 2, 4000, 0);
        assert_eq!(
            d.log,
            Some((
                Level::Notice,
                "consul upstream \"redis\": resolver recovered after 3 failed attempts".into()
            ))
        );
        assert_eq!(d.next_ms, 1000 - 50);
    }

    fn api_tracker(extra: &str) -> Tracker {
        let line = format!("service=redis api=http://127.0.0.1:8500 {extra}");
        let args: Vec<&str> = line.split_whitespace().collect();
        Tracker::new(
            &UpstreamKey::stream("redis"),
            &Settings::parse(&args).unwrap(),
        )
    }

    #[test]
    fn api_lines_speak_of_the_agent_and_of_empty_answers() {
        let mut t = api_tracker("");
        t.on_outcome(Outcome::Peers(peers(2)), 0, 0, 0);
        let d = t.on_outcome(failed(), 2, 1, 0);
        assert_eq!(
            d.log.unwrap().1,
            "consul upstream \"redis\": resolving http://127.0.0.1:8500/v1/health/service/redis failed: connection refused, keeping 2 peers"
        );
        let d = t.on_outcome(Outcome::Peers(peers(2)), 2, 2, 0);
        assert_eq!(
            d.log.unwrap().1,
            "consul upstream \"redis\": agent recovered after 1 failed attempts"
        );
        let d = t.on_outcome(Outcome::Empty { nxdomain: false }, 2, 3, 0);
        assert_eq!(
            d.log.unwrap().1,
            "consul upstream \"redis\": http://127.0.0.1:8500/v1/health/service/redis has no healthy instances (empty answer), keeping 2 peers"
        );
    }

    #[test]
    fn a_stale_set_expires_while_a_request_waits() {
        let mut t = api_tracker("max_stale=30s");
        assert_eq!(t.stale_due_ms(0), None);
        t.on_outcome(Outcome::Peers(peers(2)), 0, 1000, 0);
        assert_eq!(t.stale_due_ms(2), Some(31_000));
        assert_eq!(t.stale_due_ms(0), None, "nothing to drop");
        assert_eq!(t.expire(2, 30_999), None);
        let d = t.expire(2, 31_000).unwrap();
        assert_eq!(d.action, Action::Drop);
        assert_eq!(
            d.log.unwrap().1,
            "consul upstream \"redis\": no successful answer for 30s (max_stale), dropping 2 peers"
        );
        assert_eq!(t.stale_due_ms(2), None, "dropped once");
        assert_eq!(t.expire(2, 40_000), None);
        t.on_outcome(Outcome::Peers(peers(1)), 0, 50_000, 0);
        assert_eq!(t.stale_due_ms(1), Some(80_000), "a new answer starts over");
        assert_eq!(api_tracker("").stale_due_ms(2), None, "no max_stale");
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_jitter_is_bounded() {
        let mut t = tracker("interval=1s");
        let delays: Vec<u64> = (0..7)
            .map(|i| t.on_outcome(failed(), 1, i, 50).next_ms)
            .collect();
        assert_eq!(delays, [1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]);
        assert_eq!(
            t.on_outcome(Outcome::Peers(peers(1)), 1, 9, 5000).next_ms,
            1050
        );
        let mut slow = tracker("interval=1m");
        assert_eq!(slow.on_outcome(failed(), 1, 0, 3000).next_ms, 60_000);
        assert_eq!(slow.on_outcome(failed(), 1, 0, 3000).next_ms, 60_000);
    }

    #[test]
    fn empty_answers_keep_by_default_and_warn_once() {
        let mut t = tracker("");
        t.on_outcome(Outcome::Peers(peers(2)), 0, 0, 0);
        let d = t.on_outcome(Outcome::Empty { nxdomain: true }, 2, 1, 0);
        assert_eq!(d.action, Action::Keep);
        assert_eq!(
            d.log.unwrap().1,
            "consul upstream \"redis\": redis.service.yunlu_office.consul has no healthy instances (NXDOMAIN), keeping 2 peers"
        );
        assert_eq!(
            t.on_outcome(Outcome::Empty { nxdomain: true }, 2, 2, 0).log,
            None
        );
        assert_eq!(d.next_ms, 950, "an empty answer is an answer: no backoff");
    }

    #[test]
    fn fail_policies_drop() {
        let mut t = tracker("on_empty=fail on_error=fail");
        t.on_outcome(Outcome::Peers(peers(2)), 0, 0, 0);
        let d = t.on_outcome(Outcome::Empty { nxdomain: false }, 2, 1, 0);
        assert_eq!(d.action, Action::Drop);
        assert!(d
            .log
            .unwrap()
            .1
            .ends_with("has no healthy instances (no records), dropping 2 peers"));
        t.on_outcome(Outcome::Peers(peers(1)), 0, 2, 0);
        let d = t.on_outcome(failed(), 1, 3, 0);
        assert_eq!(d.action, Action::Drop);
        assert!(d
            .log
            .unwrap()
            .1
            .ends_with("failed: connection refused, dropping 1 peer"));
        // Nothing left to drop: said so.
        let d = t.on_outcome(Outcome::Empty { nxdomain: true }, 0, 4, 0);
        assert_eq!(d.action, Action::Keep);
        assert!(d
            .log
            .unwrap()
            .1
            .ends_with("has no healthy instances (NXDOMAIN), no peers to drop"));
    }

    #[test]
    fn max_stale_drops_a_kept_set_once() {
        let mut t = tracker("max_stale=3s");
        t.on_outcome(Outcome::Peers(peers(2)), 0, 0, 0);
        assert_eq!(t.on_outcome(failed(), 2, 1000, 0).action, Action::Keep);
        assert_eq!(t.on_outcome(failed(), 2, 2999, 0).action, Action::Keep);
        let d = t.on_outcome(failed(), 2, 3000, 0);
        assert_eq!(d.action, Action::Drop);
        assert_eq!(
            d.log.unwrap().1,
            "consul upstream \"redis\": no successful answer for 3s (max_stale), dropping 2 peers"
        );
        let d = t.on_outcome(failed(), 0, 4000, 0);
        assert_eq!((d.action, d.log), (Action::Keep, None));
        assert_eq!(
            t.on_outcome(Outcome::Peers(peers(1)), 0, 5000, 0).action,
            Action::Publish(peers(1))
        );
    }

    #[test]
    fn max_stale_counts_from_a_loaded_state() {
        let mut t = tracker("max_stale=2s");
        t.loaded(100);
        assert_eq!(t.on_outcome(failed(), 3, 1000, 0).action, Action::Keep);
        assert_eq!(t.on_outcome(failed(), 3, 2100, 0).action, Action::Drop);
    }

    #[test]
    fn an_oversize_answer_is_a_failure_streak_with_backoff_and_max_stale() {
        let mut t = tracker("interval=1s max_stale=5s");
        t.on_outcome(Outcome::Peers(peers(2)), 0, 0, 0);
        let big = || Outcome::Oversize {
            peers: 2000,
            capacity: 1790,
            zone_size: 64 * 1024,
            needed_size: 80 * 1024,
        };
        let d = t.on_outcome(big(), 2, 1000, 50);
        assert_eq!(d.action, Action::Keep);
        assert_eq!(
            d.log,
            Some((
                Level::Error,
                "consul upstream \"redis\": 2000 peers do not fit in zone=64k (max 1790 peers), zone=80k needed, keeping 2 peers".into()
            ))
        );
        let d = t.on_outcome(big(), 2, 2000, 50);
        assert_eq!((d.log, d.next_ms), (None, 2000), "logged once, backing off");
        assert_eq!(t.streak().count, 2);
        assert_eq!(t.streak().since_ms, Some(1000));
        let d = t.on_outcome(big(), 2, 5000, 50);
        assert_eq!(d.action, Action::Drop, "max_stale applies");
        assert!(d
            .log
            .unwrap()
            .1
            .contains("no successful answer for 5s (max_stale)"));
        let mut strict = tracker("on_error=fail");
        strict.on_outcome(Outcome::Peers(peers(2)), 0, 0, 0);
        assert_eq!(strict.on_outcome(big(), 2, 1, 0).action, Action::Drop);
    }

    #[test]
    fn the_streak_is_reported_with_its_start() {
        let mut t = tracker("");
        assert_eq!(t.streak().kind, crate::zone::StreakKind::None);
        t.on_outcome(failed(), 0, 100, 0);
        t.on_outcome(failed(), 0, 200, 0);
        let s = t.streak();
        assert_eq!(
            (s.kind, s.count, s.since_ms),
            (crate::zone::StreakKind::Failed, 2, Some(100))
        );
        t.on_outcome(Outcome::Empty { nxdomain: true }, 0, 300, 0);
        assert_eq!(t.streak().since_ms, Some(300));
        t.on_outcome(Outcome::Peers(peers(1)), 0, 400, 0);
        assert_eq!(t.streak().since_ms, None);
        assert_eq!(t.last_good_ms(), Some(400));
    }

    #[test]
    fn backoff_never_runs_past_max_stale() {
        let mut t = tracker("max_stale=8s");
        t.on_outcome(Outcome::Peers(peers(1)), 0, 0, 0);
        // Failures from 1 s on: the backoff alone would query at about 1, 2, 4,
        // 8, 16 s and drop the set at 16 s; max_stale ends it at 8 s.
        let mut now = 1_000;
        let mut d = t.on_outcome(failed(), 1, now, 0);
        while d.action == Action::Keep {
            assert!(
                now + d.next_ms <= 8_000,
                "next query at {} ms",
                now + d.next_ms
            );
            now += d.next_ms;
            d = t.on_outcome(failed(), 1, now, 0);
        }
        assert_eq!((d.action, now), (Action::Drop, 8_000));
        assert!(d
            .log
            .unwrap()
            .1
            .contains("no successful answer for 8s (max_stale)"));
        // Once dropped, the backoff is the backoff again.
        assert!(d.next_ms > 1_000);
    }
    #[test]
    fn a_streak_begun_elsewhere_is_not_logged_again() {
        use crate::zone::{LineStatus, StreakKind};
        let mut t = tracker("");
        let record = LineStatus {
            streak_kind: StreakKind::Failed as u32,
            streak_count: 1,
            streak_since_unix: 1_000,
            ..LineStatus::default()
        };
        t.resume(&record, 50_000, 1_003);
        let d = t.on_outcome(Outcome::Failed("timed out".into()), 2, 51_000, 0);
        assert_eq!(d.log, None, "the master said it already");
        assert_eq!(t.streak().count, 2);
        assert_eq!(t.streak().since_ms, Some(47_000));
        let d = t.on_outcome(Outcome::Peers(peers(2)), 2, 52_000, 0);
        assert_eq!(
            d.log,
            Some((
                Level::Notice,
                "consul upstream \"redis\": resolver recovered after 2 failed attempts".into()
            ))
        );
        // An empty streak, and none at all.
        let mut t = tracker("");
        t.resume(
            &LineStatus {
                streak_kind: StreakKind::Empty as u32,
                ..LineStatus::default()
            },
            9,
            9,
        );
        assert_eq!(
            t.on_outcome(Outcome::Empty { nxdomain: true }, 1, 10, 0)
                .log,
            None
        );
        let mut t = tracker("");
        t.resume(&LineStatus::default(), 9, 9);
        assert!(t
            .on_outcome(Outcome::Empty { nxdomain: true }, 1, 10, 0)
            .log
            .is_some());
    }
}
