//! The shared-memory zone of one upstream: a versioned header and a bounded
//! array of fixed-size peer records. One process writes (the discovery worker,
//! whose pid is in the header); every worker reads a consistent copy through a
//! sequence lock, and only when the generation moved.

use std::ffi::c_void;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ptr;
use std::sync::atomic::{fence, AtomicI64, AtomicU32, AtomicU64, Ordering};

use ngx::ffi::{ngx_int_t, ngx_shm_zone_t, ngx_slab_alloc, ngx_slab_pool_t, NGX_ERROR, NGX_OK};

use consul_core::Peer;

const MAGIC: u64 = 0x6e67_785f_636f_6e73; // "ngx_cons"
/// Bumped whenever the layout changes; it is also part of the zone's name, so a
/// reload into a module with another layout gets a fresh zone instead of a misread.
pub const LAYOUT: u32 = 2;

#[repr(C)]
pub struct Header {
    magic: u64,
    layout: u32,
    capacity: u32,
    /// Sequence lock: odd while a write is in progress.
    seq: AtomicU64,
    generation: AtomicU64,
    /// Guards writers against each other (old and new worker 0 during a reload).
    write_lock: AtomicU32,
    count: AtomicU32,
    /// The process allowed to write; a newer discovery process takes it over.
    writer: AtomicI64,
    /// Unix time of the last successful answer, 0 if none.
    confirmed_at: AtomicU64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Record {
    addr: [u8; 16],
    scope_id: u32,
    /// `source_tag` of the query the peer came from.
    source: u32,
    port: u16,
    weight: u16,
    priority: u16,
    family: u8,
    _pad: u8,
}

const _: () = assert!(size_of::<Record>() == 32);

impl Record {
    fn from_peer(p: &Peer, source: u32) -> Record {
        let mut r = Record {
            source,
            port: p.addr.port(),
            weight: p.weight,
            priority: p.priority,
            ..Record::default()
        };
        match p.addr {
            SocketAddr::V4(a) => {
                r.family = 4;
                r.addr[..4].copy_from_slice(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                r.family = 6;
                r.addr = a.ip().octets();
                r.scope_id = a.scope_id();
            }
        }
        r
    }

    fn to_peer(self) -> Option<Peer> {
        let addr = match self.family {
            4 => {
                let o = [self.addr[0], self.addr[1], self.addr[2], self.addr[3]];
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(o), self.port))
            }
            6 => SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(self.addr),
                self.port,
                0,
                self.scope_id,
            )),
            _ => return None,
        };
        Some(Peer::new(addr, self.weight, self.priority))
    }
}

const SPINS: usize = 1 << 20;

/// Bytes of shared memory per peer record.
pub const RECORD_SIZE: usize = size_of::<Record>();

/// A zone as seen from one process. Copyable: it is only a pointer into shared memory.
#[derive(Clone, Copy)]
pub struct Zone {
    header: *mut Header,
}

#[derive(Debug, PartialEq, Eq)]
pub enum WriteError {
    /// Another process is the writer now (a newer worker 0 after reload or respawn).
    NotWriter,
    /// The set needs more records than the zone holds.
    TooLarge { capacity: usize },
}

impl Zone {
    /// # Safety
    /// `shm_zone` must be one of this module's zones, initialized by [`init_zone`].
    pub unsafe fn from_shm_zone(shm_zone: *mut ngx_shm_zone_t) -> Option<Zone> {
        if shm_zone.is_null() || (*shm_zone).data.is_null() {
            return None;
        }
        Some(Zone {
            header: (*shm_zone).data as *mut Header,
        })
    }

    fn header(&self) -> &Header {
        // SAFETY: the header lives in shared memory mapped for the whole cycle; all
        // fields that change are atomics.
        unsafe { &*self.header }
    }

    fn records(&self) -> *mut Record {
        // SAFETY: records follow the header in the same slab allocation.
        unsafe { self.header.add(1) as *mut Record }
    }

    pub fn capacity(&self) -> usize {
        self.header().capacity as usize
    }

    pub fn generation(&self) -> u64 {
        self.header().generation.load(Ordering::Acquire)
    }

    pub fn confirmed_at(&self) -> u64 {
        self.header().confirmed_at.load(Ordering::Relaxed)
    }

    pub fn set_confirmed_at(&self, unix: u64) {
        self.header().confirmed_at.store(unix, Ordering::Relaxed);
    }

    /// Makes `pid` the only writer from now on.
    pub fn claim(&self, pid: i64) {
        self.header().writer.store(pid, Ordering::SeqCst);
    }

    pub fn writer(&self) -> i64 {
        self.header().writer.load(Ordering::SeqCst)
    }

    /// Publishes `peers` (canonical order, each with its source tag) as a new
    /// generation, if `pid` is the writer.
    pub fn write(&self, pid: i64, peers: &[(Peer, u32)]) -> Result<u64, WriteError> {
        let h = self.header();
        if peers.len() > self.capacity() {
            return Err(WriteError::TooLarge {
                capacity: self.capacity(),
            });
        }
        // A write takes microseconds: a lock held for SPINS tries belongs to a
        // process that died while writing, and is taken over.
        for _ in 0..SPINS {
            if h.write_lock
                .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                break;
            }
            std::hint::spin_loop();
        }
        // An odd sequence left by a dead writer would stall readers: make it even.
        if h.seq.load(Ordering::Relaxed) & 1 == 1 {
            h.seq.fetch_add(1, Ordering::Relaxed);
        }
        if h.writer.load(Ordering::SeqCst) != pid {
            h.write_lock.store(0, Ordering::Release);
            return Err(WriteError::NotWriter);
        }
        h.seq.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        let records = self.records();
        for (i, (p, source)) in peers.iter().enumerate() {
            // SAFETY: i < capacity, checked above; volatile because readers race
            // with this write by design and discard what the sequence lock rejects.
            unsafe { ptr::write_volatile(records.add(i), Record::from_peer(p, *source)) };
        }
        h.count.store(peers.len() as u32, Ordering::Relaxed);
        let generation = h.generation.load(Ordering::Relaxed) + 1;
        h.generation.store(generation, Ordering::Relaxed);
        h.seq.fetch_add(1, Ordering::Release);
        h.write_lock.store(0, Ordering::Release);
        Ok(generation)
    }

    /// A consistent copy of the set and its generation; `None` if a write kept
    /// the set changing for too long (the caller keeps its copy and asks again later).
    pub fn read(&self) -> Option<(u64, Vec<Peer>)> {
        let (generation, tagged) = self.read_tagged()?;
        Some((generation, tagged.into_iter().map(|(p, _)| p).collect()))
    }

    /// [`Zone::read`] with each peer's source tag.
    pub fn read_tagged(&self) -> Option<(u64, Vec<(Peer, u32)>)> {
        let h = self.header();
        let mut out = Vec::new();
        for _ in 0..SPINS {
            let s1 = h.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let generation = h.generation.load(Ordering::Relaxed);
            let count = (h.count.load(Ordering::Relaxed) as usize).min(self.capacity());
            out.clear();
            out.reserve(count);
            let records = self.records();
            for i in 0..count {
                // SAFETY: i < capacity; a torn record is discarded by the seq check.
                let r = unsafe { ptr::read_volatile(records.add(i)) };
                if let Some(p) = r.to_peer() {
                    out.push((p, r.source));
                }
            }
            fence(Ordering::Acquire);
            if h.seq.load(Ordering::Relaxed) == s1 {
                return Some((generation, out));
            }
        }
        None
    }
}

/// The shm zone `init` callback. `data` is the previous cycle's zone data when
/// nginx reuses the zone across a reload: the set survives the reload as it is.
///
/// # Safety
/// Called by nginx with a zone this module registered.
pub unsafe extern "C" fn init_zone(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx passes a valid zone; its memory is mapped and starts with a slab pool.
    let zone = &mut *shm_zone;
    if !data.is_null() {
        let old = &*(data as *const Header);
        if old.magic == MAGIC && old.layout == LAYOUT {
            zone.data = data;
            return NGX_OK as ngx_int_t;
        }
    }
    let pool = zone.shm.addr as *mut ngx_slab_pool_t;
    let avail = ((*pool).end as usize).saturating_sub((*pool).start as usize);
    // The slab allocator rounds large blocks up to whole pages: aim a page short.
    let mut capacity = avail.saturating_sub(size_of::<Header>() + 4096) / RECORD_SIZE;
    let mut mem = ptr::null_mut();
    while capacity > 0 {
        mem = ngx_slab_alloc(pool, size_of::<Header>() + capacity * RECORD_SIZE);
        if !mem.is_null() {
            break;
        }
        capacity = capacity * 15 / 16;
    }
    if mem.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    let header = mem as *mut Header;
    ptr::write(
        header,
        Header {
            magic: MAGIC,
            layout: LAYOUT,
            capacity: capacity.min(u32::MAX as usize) as u32,
            seq: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            write_lock: AtomicU32::new(0),
            count: AtomicU32::new(0),
            writer: AtomicI64::new(0),
            confirmed_at: AtomicU64::new(0),
        },
    );
    zone.data = mem;
    NGX_OK as ngx_int_t
}
