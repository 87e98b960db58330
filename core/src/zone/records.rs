//! The published set: two buffers of records, one peer per record. The writer
//! fills the buffer that is not active, under its sequence number (odd while it
//! is written), then flips `active`; a reader copies a buffer and checks that
//! its sequence number did not move meanwhile.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

use super::SharedPeer;
use crate::peer::Peer;

/// One buffer's header: its sequence number, generation and record count.
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
pub struct Record(pub(super) [AtomicU64; 4]);

impl Record {
    /// Never inlined: the fault tests stop a writer here with gdb, in release
    /// builds too (one call per record of a publish costs nothing that matters).
    #[inline(never)]
    pub(super) fn store(&self, p: &Peer, slot: u32, tag: u32) {
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
    pub(super) fn load(&self) -> Option<(Peer, u32, u32)> {
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

impl BufHeader {
    /// One try at a consistent copy of the buffer's `records` into `out`, with
    /// each peer's slot epoch (`epoch_of`) read inside it: the buffer's
    /// generation, or `None` while a writer is in it or if one overtook the
    /// reader (`out` is then to be thrown away).
    pub(super) fn try_read(
        &self,
        records: &[Record],
        out: &mut Vec<SharedPeer>,
        epoch_of: impl Fn(u32) -> u32,
    ) -> Option<u64> {
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            return None;
        }
        let generation = self.generation.load(Ordering::Relaxed);
        let count = (self.count.load(Ordering::Relaxed) as usize).min(records.len());
        out.clear();
        out.reserve(count);
        for r in &records[..count] {
            let Some((peer, slot, tag)) = r.load() else {
                continue;
            };
            out.push(SharedPeer {
                peer,
                tag,
                slot,
                epoch: epoch_of(slot),
            });
        }
        fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == s1).then_some(generation)
    }

    /// Fills the buffer with `entries` (peer, slot, tag) as `generation`; its
    /// sequence number is odd meanwhile. Writer only, on the inactive buffer.
    pub(super) fn write<'p>(
        &self,
        records: &[Record],
        entries: impl Iterator<Item = (&'p Peer, u32, u32)>,
        generation: u64,
    ) {
        let s = self.seq.load(Ordering::Relaxed) | 1;
        self.seq.store(s, Ordering::Relaxed);
        fence(Ordering::Release);
        let mut count = 0;
        for (record, (p, slot, tag)) in records.iter().zip(entries) {
            record.store(p, slot, tag);
            count += 1;
        }
        self.count.store(count, Ordering::Relaxed);
        self.generation.store(generation, Ordering::Relaxed);
        self.seq.store(s + 1, Ordering::Release);
    }

    /// The buffer's (peer, slot, tag) entries as the writer sees them (no
    /// concurrent writer).
    pub(super) fn entries(&self, records: &[Record]) -> Vec<(Peer, u32, u32)> {
        let count = (self.count.load(Ordering::Relaxed) as usize).min(records.len());
        records[..count].iter().filter_map(Record::load).collect()
    }
}
