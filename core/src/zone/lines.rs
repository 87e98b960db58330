//! One record per `consul_upstream` line (by query tag) in the zone's header:
//! where the line's peers come from, its last answer and change, its failure
//! streak, lookup counters, an API line's index. They outlive a reload, like the
//! set; the writer updates them under a sequence number, odd meanwhile.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use super::{Zone, READ_TRIES};

/// `consul_upstream` lines one upstream may have (each keeps a line record).
pub const MAX_LINES: usize = 32;
/// Text kept of a line's last failure reason.
pub const REASON_MAX: usize = 8 * REASON_WORDS;
const REASON_WORDS: usize = 16;

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

impl Zone<'_> {
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

    /// Copies `old`'s line records into this fresh zone (see `Zone::copy_from`).
    pub(super) fn copy_lines_from(&self, old: &Zone<'_>) {
        for (to, from) in self.header.lines.iter().zip(&old.header.lines) {
            let st = read_line(from);
            if st.tag != 0 {
                to.store(&st);
            }
        }
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
mod tests {
    use super::*;
    use crate::zone::tests::Owned;

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
}
