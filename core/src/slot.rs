//! One peer's slot in the shared zone: what every worker knows about the peer
//! (open connections, passive health, counters, least_conn's weight, band and
//! pass), updated with atomics on each connection. The zone gives a peer a slot
//! while it stays in the set; [`crate::least`] and [`crate::view`] read and
//! update slots, the zone hands them out.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// What every worker knows about one peer, updated with atomics on each connection.
#[repr(C)]
#[derive(Debug, Default)]
pub struct PeerSlot {
    /// Changes when the slot is given to another peer.
    pub epoch: AtomicU32,
    /// Connections open to the peer now, from all workers.
    pub conns: AtomicU32,
    /// Failed attempts in the current `fail_timeout` window (nginx's `fails`).
    pub fails: AtomicU32,
    _pad: AtomicU32,
    /// Start of the current `fail_timeout` window (nginx's `checked`), in
    /// nginx's monotonic milliseconds, which all processes share.
    pub checked_ms: AtomicU64,
    /// Last failure (nginx's `accessed`).
    pub accessed_ms: AtomicU64,
    /// Connections made to the peer since it appeared.
    pub connections: AtomicU64,
    /// Failed attempts since it appeared.
    pub failures: AtomicU64,
    /// When the peer appeared (Unix seconds).
    pub since_unix: AtomicU64,
    /// When the peer last became usable: it joined a set that had peers, or came
    /// back after being down (monotonic milliseconds; `slow_start` ramps from
    /// here; 0: no ramp).
    pub usable_since_ms: AtomicU64,
    /// Generation that freed the slot (the writer reuses the oldest free slot first).
    pub(crate) freed_gen: AtomicU64,
    /// The weight of the peer's share in its band, at least 1 (0: the slot is free).
    pub weight: AtomicU32,
    /// The peer's band (`Peer::band`): least_conn asks lower bands first.
    pub band: AtomicU32,
    /// least_conn's turn among equals (see `crate::least`).
    pub pass: AtomicU64,
}

impl PeerSlot {
    /// Gives the slot to a new peer: a fresh epoch and nothing counted yet; its
    /// ramp starts at `ramp_ms` (0: none), its least_conn pass at `pass`.
    pub(crate) fn reset(&self, now_unix: u64, ramp_ms: u64, pass: u64) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
        for a in [&self.conns, &self.fails] {
            a.store(0, Ordering::Relaxed);
        }
        for a in [
            &self.checked_ms,
            &self.accessed_ms,
            &self.connections,
            &self.failures,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.since_unix.store(now_unix, Ordering::Relaxed);
        self.usable_since_ms.store(ramp_ms, Ordering::Relaxed);
        self.freed_gen.store(0, Ordering::Relaxed);
        self.pass.store(pass, Ordering::Relaxed);
        fence(Ordering::Release);
    }
}
