//! The shared-memory zone of one upstream: its layout and every operation on it,
//! written with plain atomics so that the module only maps the memory (and takes
//! nginx's lock around a write) while the logic is tested here.
//!
//! - Two **record buffers**. The writer (the discovery process) fills the one that
//!   is not active, then flips `active`: a writer killed in the middle leaves a
//!   half-written *inactive* buffer, never a torn published set, and readers never
//!   wait for it. Each buffer has a sequence number, odd while it is written, so a
//!   reader that was overtaken by two publishes notices and reads again.
//! - One **slot** per peer with the state every worker shares: active connections,
//!   passive health (nginx's `fails`/`checked`/`accessed`), counters. A peer keeps
//!   its slot while it stays in the set; a slot given to another peer changes its
//!   epoch, so a late release for the old peer is dropped.
//! - A **tournament tree** over the slots for `least_conn` (see `crate::least`).
//! - One **line record** per `consul_upstream` line (by query tag): when its last
//!   successful answer came, its failure streak, lookup counters. They outlive a
//!   reload, like the set.
//!
//! Writers are serialized by the caller (nginx's shared mutex, which the master
//! frees when its holder dies); readers take no lock.

use std::collections::HashMap;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{fence, AtomicI64, AtomicU32, AtomicU64, Ordering};

use crate::least::{nodes_for, Tree};
use crate::peer::Peer;
use crate::slot::PeerSlot;

/// "ngx_cons": marks memory this module laid out.
pub const MAGIC: u64 = 0x6e67_785f_636f_6e73;
/// Bumped whenever the layout changes; it is also part of the zone's name, so a
/// reload into a module with another layout gets a fresh zone instead of a misread.
pub const LAYOUT: u32 = 5;
/// `consul_upstream` lines one upstream may have (each keeps a line record).
pub const MAX_LINES: usize = 32;
/// Text kept of a line's last failure reason.
pub const REASON_MAX: usize = 8 * REASON_WORDS;
const REASON_WORDS: usize = 16;
/// Reads that find the buffer being rewritten twice in a row give up (the caller
/// keeps its copy and asks again on its next connection).
const READ_TRIES: usize = 64;

/// Shared memory one peer takes: a record in each buffer and its slot (the
/// least_conn tree adds up to two nodes per peer).
pub const BYTES_PER_PEER: usize = 2 * size_of::<Record>() + size_of::<PeerSlot>();

/// Bytes of the zone's own structures for `capacity` peers.
pub fn bytes_for(capacity: usize) -> usize {
    size_of::<Header>() + capacity * BYTES_PER_PEER + nodes_for(capacity) * size_of::<AtomicU32>()
}

/// Peers that fit in `bytes` of usable memory (the inverse of [`bytes_for`]).
pub fn capacity_for(bytes: usize) -> usize {
    let (mut lo, mut hi) = (0, bytes / BYTES_PER_PEER + 1);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if bytes_for(mid) <= bytes {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if bytes_for(lo) <= bytes {
        lo
    } else {
        0
    }
}

#[repr(C)]
#[derive(Default)]
pub struct Header {
    pub magic: AtomicU64,
    pub layout: AtomicU32,
    /// Records per buffer, and slots.
    pub capacity: AtomicU32,
    /// The process allowed to write; a newer discovery process takes it over.
    pub writer: AtomicI64,
    /// Generation of the active buffer: a worker compares it on every connection.
    pub generation: AtomicU64,
    pub active: AtomicU32,
    /// Slots `0..slots_used` have been given to a peer at least once; the
    /// slots, and the least_conn tree's nodes, beyond were never touched (a
    /// `zone=` of 1024m costs what its peers use, as nginx's own zones do).
    pub slots_used: AtomicU32,
    /// The pass of the latest least_conn pick: newcomers start there.
    pub vtime: AtomicU64,
    pub bufs: [BufHeader; 2],
    pub lines: [LineCell; MAX_LINES],
}

impl Header {
    /// Peers the zone holds (records per buffer, and slots).
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed) as usize
    }

    /// Lays a fresh zone of `capacity` peers out (a zeroed header nobody reads
    /// yet; the records, slots and tree nodes need no zeroing: each is written
    /// before it is first read).
    pub fn format(&self, capacity: usize) {
        self.capacity.store(capacity as u32, Ordering::Relaxed);
        self.slots_used.store(0, Ordering::Relaxed);
        self.layout.store(LAYOUT, Ordering::Relaxed);
        self.magic.store(MAGIC, Ordering::Release);
    }
}

#[repr(C)]
#[derive(Default)]
pub struct BufHeader {
    /// Odd while the buffer is being written.
    pub seq: AtomicU64,
    pub generation: AtomicU64,
    pub count: AtomicU32,
    _pad: AtomicU32,
}

/// One published peer: address, port, weight, priority, family, its slot and the
/// tag of the query it came from, in four words.
#[repr(C)]
#[derive(Default)]
pub struct Record([AtomicU64; 4]);

/// How a line's part of the set came to be what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum SetKind {
    /// Nothing yet.
    None = 0,
    /// The last answer.
    Live = 1,
    /// Kept after an empty or failed answer (`on_empty`/`on_error=keep`).
    Kept = 2,
    /// Loaded from the state file, no answer yet.
    StateFile = 3,
    /// Dropped (`on_empty`/`on_error=fail`, `max_stale`).
    Dropped = 4,
}

impl SetKind {
    pub fn from_u32(v: u32) -> SetKind {
        match v {
            1 => SetKind::Live,
            2 => SetKind::Kept,
            3 => SetKind::StateFile,
            4 => SetKind::Dropped,
            _ => SetKind::None,
        }
    }
}

/// The failure streak a line is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum StreakKind {
    None = 0,
    Empty = 1,
    Failed = 2,
    Oversize = 3,
}

/// Lookup outcomes, as counted per line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Ok = 0,
    Empty = 1,
    Error = 2,
    Oversize = 3,
}

/// One line's record. Written by the writer only; `seq` is odd meanwhile.
#[repr(C)]
#[derive(Default)]
pub struct LineCell {
    seq: AtomicU64,
    /// `source_tag` of the query; 0 for a free record.
    tag: AtomicU32,
    kind: AtomicU32,
    /// Last successful answer (Unix seconds; 0: none yet).
    confirmed_unix: AtomicU64,
    /// Last change of this line's part.
    changed_unix: AtomicU64,
    streak_kind: AtomicU32,
    streak_count: AtomicU32,
    streak_since_unix: AtomicU64,
    lookups: [AtomicU64; 4],
    peers: AtomicU32,
    reason_len: AtomicU32,
    reason: [AtomicU64; REASON_WORDS],
    /// An API line's last `X-Consul-Index` (0: none yet, or a DNS line).
    index: AtomicU64,
}

/// A copy of one line's record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LineStatus {
    pub tag: u32,
    pub kind: u32,
    pub confirmed_unix: u64,
    pub changed_unix: u64,
    pub streak_kind: u32,
    pub streak_count: u32,
    pub streak_since_unix: u64,
    /// ok, empty, error, oversize.
    pub lookups: [u64; 4],
    pub peers: u32,
    pub reason: String,
    /// An API line's last `X-Consul-Index`.
    pub index: u64,
}

/// A published peer as a reader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedPeer {
    pub peer: Peer,
    /// `source_tag` of the query it came from.
    pub tag: u32,
    pub slot: u32,
    /// The slot's epoch when the set was read.
    pub epoch: u32,
}

/// A consistent copy of the published set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub generation: u64,
    pub peers: Vec<SharedPeer>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub capacity: usize,
}

/// A view of one zone's memory.
#[derive(Clone, Copy)]
pub struct Zone<'a> {
    header: &'a Header,
    records: [&'a [Record]; 2],
    slots: &'a [PeerSlot],
    tree: &'a [AtomicU32],
}

impl Record {
    /// Never inlined: the fault tests stop a writer here with gdb, in release
    /// builds too (one call per record of a publish costs nothing that matters).
    #[inline(never)]
    fn store(&self, p: &Peer, slot: u32, tag: u32) {
        let (family, bytes) = match p.addr.ip() {
            IpAddr::V4(ip) => {
                let mut b = [0; 16];
                b[..4].copy_from_slice(&ip.octets());
                (4u64, b)
            }
            IpAddr::V6(ip) => (6u64, ip.octets()),
        };
        let w0 = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
        let w1 = u64::from_le_bytes(bytes[8..].try_into().unwrap_or_default());
        let w2 = u64::from(p.addr.port())
            | u64::from(p.weight) << 16
            | u64::from(p.priority) << 32
            | family << 48;
        let w3 = u64::from(slot) | u64::from(tag) << 32;
        for (cell, w) in self.0.iter().zip([w0, w1, w2, w3]) {
            cell.store(w, Ordering::Relaxed);
        }
    }

    /// (peer, slot, tag); `None` for a record that is not a peer (torn, or zero).
    fn load(&self) -> Option<(Peer, u32, u32)> {
        let [w0, w1, w2, w3] = [0, 1, 2, 3].map(|i| self.0[i].load(Ordering::Relaxed));
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&w0.to_le_bytes());
        bytes[8..].copy_from_slice(&w1.to_le_bytes());
        let port = w2 as u16;
        let ip = match (w2 >> 48) as u8 {
            4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
            6 => IpAddr::V6(Ipv6Addr::from(bytes)),
            _ => return None,
        };
        let peer = Peer::new(
            SocketAddr::new(ip, port),
            (w2 >> 16) as u16,
            (w2 >> 32) as u16,
        );
        Some((peer, w3 as u32, (w3 >> 32) as u32))
    }
}

impl LineCell {
    fn begin(&self) -> u64 {
        let s = self.seq.load(Ordering::Relaxed) | 1;
        self.seq.store(s, Ordering::Relaxed);
        fence(Ordering::Release);
        s
    }

    fn end(&self, s: u64) {
        self.seq.store(s + 1, Ordering::Release);
    }

    fn clear(&self) {
        let s = self.begin();
        for a in [&self.tag, &self.kind, &self.streak_kind, &self.streak_count] {
            a.store(0, Ordering::Relaxed);
        }
        for a in [
            &self.confirmed_unix,
            &self.changed_unix,
            &self.streak_since_unix,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        for a in &self.lookups {
            a.store(0, Ordering::Relaxed);
        }
        self.peers.store(0, Ordering::Relaxed);
        self.reason_len.store(0, Ordering::Relaxed);
        self.index.store(0, Ordering::Relaxed);
        self.end(s);
    }

    fn load(&self) -> LineStatus {
        let len = (self.reason_len.load(Ordering::Relaxed) as usize).min(REASON_MAX);
        let mut bytes: Vec<u8> = self
            .reason
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .collect();
        bytes.truncate(len);
        LineStatus {
            tag: self.tag.load(Ordering::Relaxed),
            kind: self.kind.load(Ordering::Relaxed),
            confirmed_unix: self.confirmed_unix.load(Ordering::Relaxed),
            changed_unix: self.changed_unix.load(Ordering::Relaxed),
            streak_kind: self.streak_kind.load(Ordering::Relaxed),
            streak_count: self.streak_count.load(Ordering::Relaxed),
            streak_since_unix: self.streak_since_unix.load(Ordering::Relaxed),
            lookups: [0, 1, 2, 3].map(|i| self.lookups[i].load(Ordering::Relaxed)),
            peers: self.peers.load(Ordering::Relaxed),
            reason: String::from_utf8_lossy(&bytes).into_owned(),
            index: self.index.load(Ordering::Relaxed),
        }
    }

    fn store(&self, st: &LineStatus) {
        let s = self.begin();
        self.tag.store(st.tag, Ordering::Relaxed);
        self.kind.store(st.kind, Ordering::Relaxed);
        self.confirmed_unix
            .store(st.confirmed_unix, Ordering::Relaxed);
        self.changed_unix.store(st.changed_unix, Ordering::Relaxed);
        self.streak_kind.store(st.streak_kind, Ordering::Relaxed);
        self.streak_count.store(st.streak_count, Ordering::Relaxed);
        self.streak_since_unix
            .store(st.streak_since_unix, Ordering::Relaxed);
        for (a, v) in self.lookups.iter().zip(st.lookups) {
            a.store(v, Ordering::Relaxed);
        }
        self.peers.store(st.peers, Ordering::Relaxed);
        let text = truncate_utf8(&st.reason, REASON_MAX).as_bytes();
        let mut padded = [0u8; REASON_MAX];
        padded[..text.len()].copy_from_slice(text);
        for (a, chunk) in self.reason.iter().zip(padded.chunks(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            a.store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        self.reason_len.store(text.len() as u32, Ordering::Relaxed);
        self.index.store(st.index, Ordering::Relaxed);
        self.end(s);
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl<'a> Zone<'a> {
    /// A zone over its parts: the header, the two record buffers and the slots,
    /// each `capacity` long, and the least_conn tree's nodes.
    pub fn from_parts(
        header: &'a Header,
        records: [&'a [Record]; 2],
        slots: &'a [PeerSlot],
        tree: &'a [AtomicU32],
    ) -> Zone<'a> {
        Zone {
            header,
            records,
            slots,
            tree,
        }
    }

    /// The least_conn tree over the slots.
    pub fn tree(&self) -> Tree<'a> {
        Tree::new(self.tree, self.slots).in_use(self.slots_used())
    }

    /// Slots given to a peer at least once: `0..slots_used()`.
    fn slots_used(&self) -> usize {
        (self.header.slots_used.load(Ordering::Acquire) as usize).min(self.slots.len())
    }

    /// Where least_conn newcomers start (the latest pick's pass).
    pub fn vtime(&self) -> &'a AtomicU64 {
        &self.header.vtime
    }

    /// Whether the memory holds a zone of this layout (a reused zone after a reload).
    pub fn is_formatted(header: &Header) -> bool {
        header.magic.load(Ordering::Acquire) == MAGIC
            && header.layout.load(Ordering::Relaxed) == LAYOUT
    }

    pub fn capacity(&self) -> usize {
        self.slots
            .len()
            .min(self.records[0].len())
            .min(self.records[1].len())
    }

    /// One atomic load: what a worker compares on every connection.
    pub fn generation(&self) -> u64 {
        self.header.generation.load(Ordering::Acquire)
    }

    pub fn writer(&self) -> i64 {
        self.header.writer.load(Ordering::SeqCst)
    }

    /// Makes `pid` the writer (the caller holds the write lock), and repairs what
    /// a writer killed between flipping the buffer and announcing it left behind.
    pub fn claim(&self, pid: i64) {
        let h = self.header;
        h.writer.store(pid, Ordering::SeqCst);
        let active = h.active.load(Ordering::Relaxed) as usize & 1;
        let generation = h.bufs[active].generation.load(Ordering::Relaxed);
        if h.generation.load(Ordering::Relaxed) != generation {
            h.generation.store(generation, Ordering::Release);
        }
    }

    pub fn slot(&self, index: u32) -> Option<&'a PeerSlot> {
        self.slots.get(index as usize)
    }

    /// A consistent copy of the published set; `None` if it kept changing under
    /// the reader (the caller keeps its copy and asks again later).
    pub fn read(&self) -> Option<Snapshot> {
        let h = self.header;
        let mut peers = Vec::new();
        for _ in 0..READ_TRIES {
            let b = h.active.load(Ordering::Acquire) as usize & 1;
            let buf = &h.bufs[b];
            let s1 = buf.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let generation = buf.generation.load(Ordering::Relaxed);
            let count = (buf.count.load(Ordering::Relaxed) as usize).min(self.capacity());
            peers.clear();
            peers.reserve(count);
            for r in &self.records[b][..count] {
                let Some((peer, slot, tag)) = r.load() else {
                    continue;
                };
                let epoch = self
                    .slots
                    .get(slot as usize)
                    .map_or(0, |s| s.epoch.load(Ordering::Relaxed));
                peers.push(SharedPeer {
                    peer,
                    tag,
                    slot,
                    epoch,
                });
            }
            fence(Ordering::Acquire);
            if buf.seq.load(Ordering::Relaxed) == s1 {
                return Some(Snapshot { generation, peers });
            }
        }
        None
    }

    /// Publishes `peers` (canonical order, each with its query tag) as the next
    /// generation. Peers already published keep their slot; new ones get the slot
    /// freed longest ago. The caller holds the write lock and is the writer.
    pub fn publish(
        &self,
        peers: &[(Peer, u32)],
        now_unix: u64,
        now_ms: u64,
    ) -> Result<u64, TooLarge> {
        let capacity = self.capacity();
        if peers.len() > capacity {
            return Err(TooLarge { capacity });
        }
        let h = self.header;
        let current = h.active.load(Ordering::Relaxed) as usize & 1;
        let next = 1 - current;
        let generation = h.bufs[current].generation.load(Ordering::Relaxed) + 1;

        // Slots: kept by address, freed for peers that left, taken for newcomers.
        let old: HashMap<SocketAddr, u32> = self
            .published(current)
            .into_iter()
            .map(|(p, slot, _)| (p.addr, slot))
            .collect();
        // Only slots below the high-water mark were ever given out: those are
        // read, and reused first; the mark grows only when they are all taken.
        let slots_used = self.slots_used();
        let mut used = vec![false; slots_used];
        let mut assigned: Vec<Option<u32>> = peers
            .iter()
            .map(|(p, _)| old.get(&p.addr).copied())
            .collect();
        for &slot in assigned.iter().flatten() {
            if let Some(u) = used.get_mut(slot as usize) {
                *u = true;
            }
        }
        for (addr, &slot) in &old {
            if !peers.iter().any(|(p, _)| p.addr == *addr) {
                if let Some(s) = self.slots.get(slot as usize) {
                    s.freed_gen.store(generation, Ordering::Relaxed);
                    s.epoch.fetch_add(1, Ordering::Relaxed);
                    s.weight.store(0, Ordering::Relaxed);
                }
            }
        }
        // Free slots: those freed by an earlier set, longest ago first; then
        // never-used ones; those freed just now last (a worker whose copy is
        // older than this set may still pick the peer that left).
        let freed_at = |i: usize| self.slots[i].freed_gen.load(Ordering::Relaxed);
        let (mut earlier, now): (Vec<usize>, Vec<usize>) = (0..slots_used)
            .filter(|&i| !used[i])
            .partition(|&i| freed_at(i) < generation);
        earlier.sort_by_key(|&i| freed_at(i));
        let mut free = earlier.into_iter().chain(slots_used..capacity).chain(now);
        // Peers joining a set that has peers ramp up (slow_start); the first set does not.
        let ramp_ms = if old.is_empty() { 0 } else { now_ms.max(1) };
        let vtime = self.header.vtime.load(Ordering::Relaxed);
        for a in assigned.iter_mut().filter(|a| a.is_none()) {
            // More free slots than newcomers: peers.len() <= capacity.
            let slot = free.next().unwrap_or_default();
            self.slots[slot].reset(now_unix, ramp_ms, vtime);
            *a = Some(slot as u32);
        }
        for ((p, _), slot) in peers.iter().zip(&assigned) {
            if let Some(s) = slot.and_then(|i| self.slots.get(i as usize)) {
                s.weight.store(u32::from(p.share()), Ordering::Relaxed);
                s.band.store(p.band(), Ordering::Relaxed);
            }
        }
        let highest = assigned.iter().flatten().map(|&i| i as usize + 1).max();
        if let Some(mark) = highest.filter(|&m| m > slots_used) {
            // Before the set is published: a reader of the new set sees it.
            self.header.slots_used.store(mark as u32, Ordering::Release);
        }
        self.tree().rebuild();

        let buf = &h.bufs[next];
        let s = buf.seq.load(Ordering::Relaxed) | 1;
        buf.seq.store(s, Ordering::Relaxed);
        fence(Ordering::Release);
        for (i, ((p, tag), slot)) in peers.iter().zip(&assigned).enumerate() {
            self.records[next][i].store(p, slot.unwrap_or_default(), *tag);
        }
        buf.count.store(peers.len() as u32, Ordering::Relaxed);
        buf.generation.store(generation, Ordering::Relaxed);
        buf.seq.store(s + 1, Ordering::Release);
        h.active.store(next as u32, Ordering::Release);
        h.generation.store(generation, Ordering::Release);
        Ok(generation)
    }

    /// The active buffer as the writer sees it (no concurrent writer).
    fn published(&self, b: usize) -> Vec<(Peer, u32, u32)> {
        let count =
            (self.header.bufs[b].count.load(Ordering::Relaxed) as usize).min(self.capacity());
        self.records[b][..count]
            .iter()
            .filter_map(Record::load)
            .collect()
    }

    /// The record of line `tag`, if there is one.
    pub fn line(&self, tag: u32) -> Option<LineStatus> {
        let tag = line_tag(tag);
        self.header
            .lines
            .iter()
            .find(|l| l.tag.load(Ordering::Relaxed) == tag)
            .map(read_line)
    }

    /// Every line record in use.
    pub fn lines(&self) -> Vec<LineStatus> {
        self.header
            .lines
            .iter()
            .filter(|l| l.tag.load(Ordering::Relaxed) != 0)
            .map(read_line)
            .collect()
    }

    /// Updates (or creates) line `tag`'s record; `false` when all records are taken.
    /// Writer only.
    pub fn update_line(&self, tag: u32, f: impl FnOnce(&mut LineStatus)) -> bool {
        let tag = line_tag(tag);
        let lines = &self.header.lines;
        let cell = lines
            .iter()
            .find(|l| l.tag.load(Ordering::Relaxed) == tag)
            .or_else(|| lines.iter().find(|l| l.tag.load(Ordering::Relaxed) == 0));
        let Some(cell) = cell else { return false };
        let mut st = cell.load();
        if st.tag != tag {
            st = LineStatus {
                tag,
                ..LineStatus::default()
            };
        }
        f(&mut st);
        st.tag = tag;
        cell.store(&st);
        true
    }

    /// Frees the records of lines not in `keep` (lines removed by a reload: a line
    /// added again later starts its counters afresh). Writer only.
    pub fn retain_lines(&self, keep: &[u32]) {
        let keep: Vec<u32> = keep.iter().map(|&t| line_tag(t)).collect();
        for l in &self.header.lines {
            let tag = l.tag.load(Ordering::Relaxed);
            if tag != 0 && !keep.contains(&tag) {
                l.clear();
            }
        }
    }

    /// Carries another zone's set, peer state and line records over into this
    /// fresh one (a reload that changed the zone's size). Counters stay monotonic;
    /// open connections stay counted where they were opened.
    pub fn copy_from(&self, old: &Zone<'_>, now_unix: u64, now_ms: u64) -> Result<(), TooLarge> {
        if let Some(snap) = old.read() {
            let set: Vec<(Peer, u32)> = snap.peers.iter().map(|p| (p.peer, p.tag)).collect();
            let h = self.header;
            // Continue the old numbering: logs and workers see the generation grow.
            let base = snap.generation.saturating_sub(1);
            h.vtime
                .store(old.header.vtime.load(Ordering::Relaxed), Ordering::Relaxed);
            let b = h.active.load(Ordering::Relaxed) as usize & 1;
            h.bufs[b].generation.store(base, Ordering::Relaxed);
            self.publish(&set, now_unix, now_ms)?;
            if let Some(new) = self.read() {
                for (n, o) in new.peers.iter().zip(&snap.peers) {
                    let (Some(to), Some(from)) = (self.slot(n.slot), old.slot(o.slot)) else {
                        continue;
                    };
                    to.fails
                        .store(from.fails.load(Ordering::Relaxed), Ordering::Relaxed);
                    for (t, f) in [
                        (&to.checked_ms, &from.checked_ms),
                        (&to.accessed_ms, &from.accessed_ms),
                        (&to.connections, &from.connections),
                        (&to.failures, &from.failures),
                        (&to.since_unix, &from.since_unix),
                        (&to.usable_since_ms, &from.usable_since_ms),
                        (&to.pass, &from.pass),
                    ] {
                        t.store(f.load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                }
            }
        }
        for (to, from) in self.header.lines.iter().zip(&old.header.lines) {
            let st = read_line(from);
            if st.tag != 0 {
                to.store(&st);
            }
        }
        Ok(())
    }
}

/// Tag 0 marks a free line record.
fn line_tag(tag: u32) -> u32 {
    tag.max(1)
}

/// A line record, consistent unless its writer died in the middle (then as it is).
fn read_line(cell: &LineCell) -> LineStatus {
    let mut st = cell.load();
    for _ in 0..READ_TRIES {
        let s1 = cell.seq.load(Ordering::Acquire);
        if s1 & 1 == 0 {
            st = cell.load();
            fence(Ordering::Acquire);
            if cell.seq.load(Ordering::Relaxed) == s1 {
                break;
            }
        }
        std::hint::spin_loop();
    }
    st
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A zone in ordinary memory, as the module lays one out in shared memory.
    pub struct Owned {
        pub header: Box<Header>,
        pub records: [Vec<Record>; 2],
        pub slots: Vec<PeerSlot>,
        pub tree: Vec<AtomicU32>,
    }

    impl Owned {
        pub fn new(capacity: usize) -> Owned {
            let header: Box<Header> = Box::default();
            let o = Owned {
                header,
                records: [
                    (0..capacity).map(|_| Record::default()).collect(),
                    (0..capacity).map(|_| Record::default()).collect(),
                ],
                slots: (0..capacity).map(|_| PeerSlot::default()).collect(),
                tree: (0..nodes_for(capacity))
                    .map(|_| AtomicU32::new(crate::least::NONE))
                    .collect(),
            };
            o.header.format(capacity);
            o
        }

        pub fn zone(&self) -> Zone<'_> {
            Zone::from_parts(
                &self.header,
                [&self.records[0], &self.records[1]],
                &self.slots,
                &self.tree,
            )
        }
    }

    fn p(s: &str, w: u16, prio: u16) -> Peer {
        Peer::new(s.parse().unwrap(), w, prio)
    }

    fn set(peers: &[Peer]) -> Vec<(Peer, u32)> {
        peers.iter().map(|p| (*p, 7)).collect()
    }

    #[test]
    fn publish_and_read_round_trip() {
        let o = Owned::new(8);
        let z = o.zone();
        assert_eq!(z.generation(), 0);
        assert_eq!(z.read().unwrap().peers, vec![]);
        let peers = [p("127.0.0.1:6380", 3, 1), p("[::1]:6381", 1, 2)];
        assert_eq!(z.publish(&set(&peers), 100, 5), Ok(1));
        let snap = z.read().unwrap();
        assert_eq!(snap.generation, 1);
        let got: Vec<Peer> = snap.peers.iter().map(|p| p.peer).collect();
        assert_eq!(got, peers);
        assert!(snap.peers.iter().all(|p| p.tag == 7));
        assert_eq!(z.generation(), 1);
    }

    #[test]
    fn too_large_is_refused_and_nothing_changes() {
        let o = Owned::new(1);
        let z = o.zone();
        let peers = [p("127.0.0.1:1", 1, 1), p("127.0.0.1:2", 1, 1)];
        assert_eq!(z.publish(&set(&peers), 0, 0), Err(TooLarge { capacity: 1 }));
        assert_eq!(z.generation(), 0);
    }

    #[test]
    fn a_big_zone_is_touched_only_where_peers_are() {
        // Memory the zone never wrote, marked: it must stay as it is.
        const MARK: u64 = 0x5eed;
        let o = Owned::new(4096);
        for s in &o.slots {
            s.since_unix.store(MARK, Ordering::Relaxed);
        }
        for r in o.records.iter().flatten() {
            r.0[0].store(MARK, Ordering::Relaxed);
        }
        for n in &o.tree {
            n.store(MARK as u32, Ordering::Relaxed);
        }
        let z = o.zone();
        // Sets of 3 to 10 peers, each replacing every peer of the one before.
        let mut largest = 0;
        for round in 0..50u16 {
            let n = 3 + usize::from(round % 8);
            largest = largest.max(n);
            let peers: Vec<Peer> = (0..n)
                .map(|i| p(&format!("127.0.0.{}:{}", 1 + round % 200, 1000 + i), 1, 1))
                .collect();
            z.publish(&set(&peers), 100, 0).unwrap();
            let snap = z.read().unwrap();
            assert_eq!(snap.peers.len(), n);
            assert!(snap
                .peers
                .iter()
                .all(|sp| (sp.slot as usize) < z.slots_used()));
        }
        let used = z.slots_used();
        assert!(
            (largest..=2 * largest).contains(&used),
            "{used} slots used for sets of at most {largest}"
        );
        assert!(o.slots[used..]
            .iter()
            .all(|s| s.since_unix.load(Ordering::Relaxed) == MARK));
        for buf in &o.records {
            assert!(buf[largest..]
                .iter()
                .all(|r| r.0[0].load(Ordering::Relaxed) == MARK));
        }
        let nodes = o
            .tree
            .iter()
            .filter(|n| n.load(Ordering::Relaxed) != MARK as u32)
            .count();
        assert!(nodes < 2 * used + 2 * 13, "{nodes} tree nodes written");
        // least_conn over it picks among the set only.
        let tree = z.tree();
        let snap = z.read().unwrap();
        let slot = tree.best(|_| true).unwrap();
        assert!(snap.peers.iter().any(|sp| sp.slot == slot));
    }

    #[test]
    fn slots_follow_addresses_and_reuse_the_oldest_free() {
        let o = Owned::new(4);
        let z = o.zone();
        let a = p("127.0.0.1:1", 1, 1);
        let b = p("127.0.0.1:2", 1, 1);
        let c = p("127.0.0.1:3", 1, 1);
        z.publish(&set(&[a, b]), 10, 0).unwrap();
        let first = z.read().unwrap();
        let slot_b = first.peers[1].slot;
        z.slot(slot_b).unwrap().conns.store(5, Ordering::Relaxed);
        // b stays (weight change), a leaves, c comes.
        let b2 = p("127.0.0.1:2", 9, 1);
        z.publish(&set(&[b2, c]), 20, 0).unwrap();
        let second = z.read().unwrap();
        assert_eq!(second.peers[0].slot, slot_b, "b keeps its slot and state");
        assert_eq!(second.peers[0].peer.weight, 9);
        assert_eq!(z.slot(slot_b).unwrap().conns.load(Ordering::Relaxed), 5);
        let slot_a = first.peers[0].slot;
        assert_ne!(
            second.peers[1].slot, slot_a,
            "a's slot rests while never-used ones exist"
        );
        assert_eq!(
            z.slot(second.peers[1].slot)
                .unwrap()
                .since_unix
                .load(Ordering::Relaxed),
            20
        );
        assert_ne!(
            z.slot(slot_a).unwrap().epoch.load(Ordering::Relaxed),
            first.peers[0].epoch,
            "a late release for a is recognized"
        );
    }

    #[test]
    fn a_writer_killed_mid_publish_leaves_the_set_readable() {
        let o = Owned::new(4);
        let z = o.zone();
        let a = p("127.0.0.1:1", 1, 1);
        z.publish(&set(&[a]), 0, 0).unwrap();
        // A publish that died while writing the other buffer: its seq is odd.
        let idle = 1 - o.header.active.load(Ordering::Relaxed) as usize;
        o.header.bufs[idle].seq.store(7, Ordering::Relaxed);
        o.records[idle][0].store(&p("127.0.0.9:9", 1, 1), 3, 1);
        let snap = z.read().expect("no waiting on a dead writer");
        assert_eq!(snap.peers.len(), 1);
        assert_eq!(snap.peers[0].peer, a);
        // The next writer goes on from there.
        let b = p("127.0.0.1:2", 1, 1);
        assert_eq!(z.publish(&set(&[a, b]), 0, 0), Ok(2));
        assert_eq!(o.header.bufs[idle].seq.load(Ordering::Relaxed) & 1, 0);
        assert_eq!(z.read().unwrap().peers.len(), 2);
    }

    #[test]
    fn a_writer_killed_before_announcing_is_repaired_by_the_next_claim() {
        let o = Owned::new(4);
        let z = o.zone();
        z.publish(&set(&[p("127.0.0.1:1", 1, 1)]), 0, 0).unwrap();
        z.publish(&set(&[p("127.0.0.1:2", 1, 1)]), 0, 0).unwrap();
        // Flipped, but the header still says generation 1.
        o.header.generation.store(1, Ordering::Relaxed);
        z.claim(42);
        assert_eq!(z.generation(), 2);
        assert_eq!(z.writer(), 42);
    }

    #[test]
    fn readers_racing_a_writer_see_whole_sets_only() {
        let o = std::sync::Arc::new(Owned::new(64));
        let sets: Vec<Vec<(Peer, u32)>> = (1..=6u16)
            .map(|n| {
                (0..n * 10)
                    .map(|i| {
                        (
                            p(&format!("127.0.{n}.{}:{}", i % 250, 1000 + i), n, 1),
                            u32::from(n),
                        )
                    })
                    .collect()
            })
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (o, stop) = (o.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seen = 0;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(s) = o.zone().read() {
                            if let Some(first) = s.peers.first() {
                                let n = first.peer.weight;
                                assert_eq!(s.peers.len(), usize::from(n) * 10, "a whole set");
                                assert!(s
                                    .peers
                                    .iter()
                                    .all(|p| p.peer.weight == n && p.tag == u32::from(n)));
                                seen += 1;
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        for i in 0..5_000 {
            o.zone().publish(&sets[i % sets.len()], 0, 0).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    }

    #[test]
    fn line_records_are_kept_per_tag_and_freed() {
        let o = Owned::new(2);
        let z = o.zone();
        assert!(z.update_line(11, |l| {
            l.lookups[Lookup::Ok as usize] += 1;
            l.reason = "x".repeat(500);
        }));
        assert!(z.update_line(22, |l| {
            l.peers = 3;
            l.index = 1 << 40;
        }));
        assert_eq!(z.line(22).unwrap().index, 1 << 40, "an API line's index");
        let l = z.line(11).unwrap();
        assert_eq!(l.lookups, [1, 0, 0, 0]);
        assert_eq!(l.reason.len(), REASON_MAX);
        assert_eq!(z.lines().len(), 2);
        z.retain_lines(&[22]);
        assert_eq!(z.line(11), None);
        assert_eq!(z.line(22).unwrap().peers, 3);
        for t in 100..100 + MAX_LINES as u32 - 1 {
            assert!(z.update_line(t, |_| {}));
        }
        assert!(!z.update_line(5, |_| {}), "all records taken");
    }

    #[test]
    fn copy_carries_set_state_and_lines_into_a_larger_zone() {
        let small = Owned::new(2);
        let zs = small.zone();
        let a = p("127.0.0.1:1", 2, 1);
        zs.publish(&set(&[a]), 50, 0).unwrap();
        zs.publish(&set(&[a]), 50, 0).unwrap();
        let s = zs.read().unwrap().peers[0].slot;
        let slot = zs.slot(s).unwrap();
        slot.connections.store(40, Ordering::Relaxed);
        slot.fails.store(1, Ordering::Relaxed);
        slot.conns.store(3, Ordering::Relaxed);
        zs.update_line(7, |l| l.lookups = [5, 1, 2, 0]);

        let big = Owned::new(16);
        let zb = big.zone();
        zb.copy_from(&zs, 60, 0).unwrap();
        let snap = zb.read().unwrap();
        assert_eq!(snap.generation, 2, "the numbering goes on");
        assert_eq!(snap.peers.len(), 1);
        let to = zb.slot(snap.peers[0].slot).unwrap();
        assert_eq!(to.connections.load(Ordering::Relaxed), 40);
        assert_eq!(to.fails.load(Ordering::Relaxed), 1);
        assert_eq!(
            to.conns.load(Ordering::Relaxed),
            0,
            "open connections stay in the old zone"
        );
        assert_eq!(to.since_unix.load(Ordering::Relaxed), 50);
        assert_eq!(zb.line(7).unwrap().lookups, [5, 1, 2, 0]);
    }

    #[test]
    fn sizes_round_trip() {
        for cap in [0, 1, 100, 10_000] {
            assert_eq!(capacity_for(bytes_for(cap)), cap);
        }
        assert_eq!(size_of::<Record>(), 32);
    }
}
