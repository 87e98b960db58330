//! The zone's memory, laid out: a [`Header`], then two record buffers and the
//! peer slots, `capacity` each, then the least_conn tree's nodes. [`MAGIC`] and
//! [`LAYOUT`] mark memory this module laid out; [`bytes_for`] and
//! [`capacity_for`] convert between peers and bytes.

use std::mem::size_of;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use super::lines::{LineCell, MAX_LINES};
use super::records::{BufHeader, Record};
use super::Zone;
use crate::least::nodes_for;
use crate::slot::PeerSlot;

/// "ngx_cons": marks memory this module laid out.
pub const MAGIC: u64 = 0x6e67_785f_636f_6e73;
/// Bumped whenever the layout changes; it is also part of the zone's name, so a
/// reload into a module with another layout gets a fresh zone instead of a misread.
pub const LAYOUT: u32 = 5;
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

impl Zone<'_> {
    /// Whether the memory holds a zone of this layout (a reused zone after a reload).
    pub fn is_formatted(header: &Header) -> bool {
        header.magic.load(Ordering::Acquire) == MAGIC
            && header.layout.load(Ordering::Relaxed) == LAYOUT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip() {
        for cap in [0, 1, 100, 10_000] {
            assert_eq!(capacity_for(bytes_for(cap)), cap);
        }
        assert_eq!(size_of::<Record>(), 32);
    }
}
