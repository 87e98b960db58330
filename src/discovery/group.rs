//! The nginx side of an upstream's group ([`consul_core::group`]): the zone's
//! write lock, nginx's clocks, pid and log, the state file on disk; and the
//! group of one upstream as discovery and the master's fill
//! ([`crate::prefill`]) use it.

use std::ops::{Deref, DerefMut};
use std::path::Path;

use ngx::ffi::ngx_random;

use consul_core::group::{self, GroupConf, GroupEnv, LineConf};
use consul_core::key::UpstreamKey;
use consul_core::lookup::Resolved;
use consul_core::policy::Level;
use consul_core::state::{self, Exclusive, Saved};

use super::Said;
use crate::upstream::Upstream;
use crate::zone::{self, SharedZone, WriteGuard};
use crate::{ffi, log};

/// What an upstream's group does in an nginx process, beside its zone.
pub(crate) struct Nginx {
    zone: SharedZone,
}

impl GroupEnv for Nginx {
    type Lock = WriteGuard;

    fn pid(&self) -> i64 {
        ffi::pid()
    }

    fn now_unix(&self) -> u64 {
        ffi::unix_now()
    }

    fn now_ms(&self) -> u64 {
        ffi::current_msec()
    }

    fn random(&self) -> u64 {
        ngx_random() as u64
    }

    fn log(&self, level: Level, msg: std::fmt::Arguments<'_>) {
        match level {
            Level::Debug => log::debug!("{msg}"),
            level => log::at!(log::level_of(level), "{msg}"),
        }
    }

    fn lock(&self) -> WriteGuard {
        self.zone.lock()
    }

    fn zone_size_for(&self, peers: usize) -> usize {
        zone::size_for(peers)
    }

    fn load_state(
        &self,
        path: &str,
        upstream: &UpstreamKey,
        max_peers: usize,
    ) -> Result<Option<Saved>, String> {
        state::load(Path::new(path), upstream, max_peers)
    }

    fn save_state(
        &self,
        path: &str,
        saved: &Saved,
        pid: i64,
        now_unix: u64,
    ) -> std::io::Result<Exclusive> {
        state::save_exclusive(
            Path::new(path),
            saved,
            (instance(), pid),
            now_unix,
            state::process_exists,
        )
    }

    fn release_state(&self, path: &str, pid: i64) {
        let _ = state::release(Path::new(path), pid);
    }
}

/// The nginx instance this process belongs to, which names a state file's
/// writer across instances (see `consul_core::state::save_exclusive`): the
/// master's pid, or the single process's under `master_process off`.
fn instance() -> i64 {
    // SAFETY: plain read of a process global.
    if unsafe { ngx::ffi::ngx_process } == ngx::ffi::NGX_PROCESS_WORKER as usize {
        // SAFETY: getppid cannot fail.
        i64::from(unsafe { libc::getppid() })
    } else {
        ffi::pid()
    }
}

/// The upstream's lines, as its group sees them.
fn conf_of(up: &'static Upstream) -> GroupConf<'static> {
    GroupConf {
        key: up.key.clone(),
        lines: up
            .lines
            .iter()
            .map(|l| LineConf {
                tag: l.tag,
                settings: &l.settings,
            })
            .collect(),
        state_path: up.state_path.as_deref(),
    }
}

/// One upstream in the discovery process (or in the master, filling the zone
/// before it forks workers: see [`crate::prefill`]): core's group of its lines
/// over its zone, and the upstream the loops read their lines' settings from.
pub(crate) struct Group {
    up: &'static Upstream,
    lines: group::Group<'static, Nginx>,
}

impl Deref for Group {
    type Target = group::Group<'static, Nginx>;

    fn deref(&self) -> &Self::Target {
        &self.lines
    }
}

impl DerefMut for Group {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.lines
    }
}

impl Group {
    /// Takes over the upstream's zone (see [`group::Group::start`]), going on
    /// from what the master said about each line's answer.
    pub(crate) fn start(up: &'static Upstream) -> Option<Group> {
        let Some(zone) = up.zone() else {
            log::alert!("{}shared zone missing", up.prefix());
            return None;
        };
        let mut lines = group::Group::start(conf_of(up), *zone.zone(), Nginx { zone });
        for (i, l) in up.lines.iter().enumerate() {
            if let Some(said) = crate::prefill::said(up, l.tag, lines.lookups(i)) {
                lines.resume_said(i, said.ignored, said.truncated);
            }
        }
        Some(Group { up, lines })
    }

    /// The master's group of the upstream and the lines the zone holds nothing
    /// for (see [`group::Group::prefill`]).
    pub(crate) fn prefill(up: &'static Upstream) -> Option<(Group, Vec<usize>)> {
        let zone = up.zone()?;
        let (lines, empty) = group::Group::prefill(conf_of(up), *zone.zone(), Nginx { zone })?;
        Some((Group { up, lines }, empty))
    }

    /// The master's lookup for line `line` (see [`Group::prefill`]), decided and
    /// logged as worker 0 decides an answer, and recorded in the zone, where
    /// worker 0 goes on from.
    /// Returns when worker 0 should ask next (ms), as for any answer.
    pub(crate) fn prefill_apply(&mut self, line: usize, result: Resolved) -> u64 {
        let mut tracker = self.tracker(line);
        self.apply(line, &mut tracker, result)
    }

    pub(crate) fn upstream(&self) -> &'static Upstream {
        self.up
    }

    /// What was said about line `line`'s last answer (see [`Said`]).
    pub(crate) fn said(&self, line: usize) -> Said {
        let (ignored, truncated) = self.lines.said_about(line);
        Said {
            ignored,
            truncated,
            api: None,
        }
    }
}
