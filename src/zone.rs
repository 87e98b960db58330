//! The shared-memory zone of one upstream, as nginx gives it: registration,
//! initialization (fresh, reused across a reload, or carried over from a zone of
//! another size), the mapping onto core's layout, and the write lock.
//!
//! Writers take nginx's own mutex of the zone's slab pool: if a writer dies
//! holding it, the master frees it (as for every shared zone). Readers never
//! lock; see `consul_core::zone` for how a killed writer leaves nothing torn.

use std::ffi::c_void;
use std::mem::size_of;
use std::ptr;

use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_pagesize, ngx_pagesize_shift, ngx_shared_memory_add, ngx_shm_zone_t,
    ngx_slab_alloc, ngx_slab_page_t, ngx_slab_pool_t, ngx_slab_stat_t, ngx_stream_module,
    NGX_ERROR, NGX_OK,
};

use std::sync::atomic::AtomicU32;

use ngx::core::slab::LockedSlabPool;
use ngx::core::SlabPool;

use consul_core::key::UpstreamKey;
use consul_core::least::nodes_for;
use consul_core::slot::PeerSlot;
use consul_core::zone::{bytes_for, capacity_for, Header, Record, Zone};

use crate::{ffi, log};

/// One zone as this process sees it: core's view of its memory and the slab
/// pool whose mutex serializes writers.
#[derive(Clone)]
pub struct SharedZone {
    zone: Zone<'static>,
    pool: SlabPool,
}

/// Holds the zone's write lock (ngx's locked slab pool); released on drop.
pub struct WriteGuard {
    _pool: LockedSlabPool,
}

impl SharedZone {
    /// # Safety
    /// `shm_zone` must be null or one of this module's zones; its memory stays
    /// mapped for as long as the returned value is used (the cycle's lifetime).
    pub unsafe fn of(shm_zone: *mut ngx_shm_zone_t) -> Option<SharedZone> {
        // SAFETY: per the contract.
        let shm_zone = unsafe { shm_zone.as_ref()? };
        if shm_zone.data.is_null() {
            return None;
        }
        // SAFETY: an initialized zone of this cycle (per the contract); its
        // mapping starts with the slab pool.
        let pool = unsafe { SlabPool::from_shm_zone(shm_zone)? };
        // SAFETY: data was set by init_zone to a laid-out zone in this mapping.
        let zone = unsafe { map(shm_zone.data as *mut Header)? };
        Some(SharedZone { zone, pool })
    }

    pub fn zone(&self) -> &Zone<'static> {
        &self.zone
    }

    /// Takes the write lock (microseconds; its holder is the one discovery
    /// process, or the old one during a reload).
    pub fn lock(&self) -> WriteGuard {
        WriteGuard {
            _pool: self.pool.lock(),
        }
    }
}

/// Core's view of a laid-out zone at `header`.
///
/// # Safety
/// `header` must point at memory laid out by [`init_zone`] (a header followed by
/// two record buffers and the slots, each `capacity` long, and the least_conn
/// tree's nodes), mapped for 'static
/// as far as the caller is concerned.
unsafe fn map(header: *mut Header) -> Option<Zone<'static>> {
    // SAFETY: per the contract; every field is an atomic.
    let h = unsafe { &*header };
    if !Zone::is_formatted(h) {
        return None;
    }
    let cap = h.capacity();
    // SAFETY: per the contract, the arrays follow the header back to back.
    unsafe {
        let rec0 = header.add(1) as *const Record;
        let rec1 = rec0.add(cap);
        let slots = rec1.add(cap) as *const PeerSlot;
        let tree = slots.add(cap) as *const AtomicU32;
        Some(Zone::from_parts(
            h,
            [
                std::slice::from_raw_parts(rec0, cap),
                std::slice::from_raw_parts(rec1, cap),
            ],
            std::slice::from_raw_parts(slots, cap),
            std::slice::from_raw_parts(tree, nodes_for(cap)),
        ))
    }
}

fn pagesize() -> usize {
    // SAFETY: set by ngx_os_init before any configuration is read.
    unsafe { ngx_pagesize }
}

/// Free pages of a new zone of `size` bytes: the arithmetic of `ngx_slab_init`.
fn slab_pages(size: usize) -> usize {
    let page = pagesize();
    // SAFETY: set with ngx_pagesize.
    let shift = unsafe { ngx_pagesize_shift };
    // nginx's smallest slab chunk is 8 bytes (min_shift 3).
    let slots = shift.saturating_sub(3);
    let head = size_of::<ngx_slab_pool_t>()
        + slots * (size_of::<ngx_slab_page_t>() + size_of::<ngx_slab_stat_t>());
    let mut pages = size.saturating_sub(head) / (page + size_of::<ngx_slab_page_t>());
    let start = (head + pages * size_of::<ngx_slab_page_t>()).div_ceil(page) * page;
    let room = size.saturating_sub(start) / page;
    if pages > room {
        pages = room;
    }
    pages
}

/// Peers a zone of `size` bytes holds: the one place this is computed.
pub fn capacity_of(size: usize) -> usize {
    capacity_for(slab_pages(size) * pagesize())
}

/// The smallest zone size (whole pages) that holds `peers` peers.
pub fn size_for(peers: usize) -> usize {
    let page = pagesize();
    let mut size = (bytes_for(peers) / page + 1) * page;
    while capacity_of(size) < peers {
        size += page;
    }
    size
}

/// The tag of this module's zones: a symbol of nginx (of its stream module),
/// not of this module, so that a zone (and its peers) survives a reload even
/// when the module's file moved; and one that no other zone of nginx uses, so
/// that a zone of another directive with the same name is refused instead of
/// shared (nginx's stream upstream `zone` uses the upstream module's address).
fn tag() -> *mut c_void {
    ptr::addr_of_mut!(ngx_stream_module) as *mut c_void
}

/// The zone named `name` that the cycle being configured already has, with its tag.
fn declared(cf: &ngx_conf_t, name: &[u8]) -> Option<*mut c_void> {
    // SAFETY: the cycle being configured and its list of zones.
    let mut part = unsafe { &(*cf.cycle).shared_memory.part } as *const ngx::ffi::ngx_list_part_t;
    while !part.is_null() {
        // SAFETY: a part of the cycle's list of zones.
        let p = unsafe { &*part };
        let zones = p.elts as *const ngx_shm_zone_t;
        for i in 0..p.nelts {
            // SAFETY: i < nelts.
            let z = unsafe { &*zones.add(i) };
            if z.shm.name.as_bytes() == name {
                return Some(z.tag);
            }
        }
        part = p.next;
    }
    None
}

/// Whether the cycle being configured has a zone `name` of this module's.
pub fn is_ours(cf: &ngx_conf_t, name: &[u8]) -> bool {
    declared(cf, name).is_some_and(|t| t == tag())
}

/// Registers the zone of `upstream` with `size` bytes, named by its key
/// (`consul_upstream:v<LAYOUT>:<stream|http>:<name>`): an http and a stream
/// upstream of the same name get zones of their own.
pub fn register(
    cf: &mut ngx_conf_t,
    upstream: &UpstreamKey,
    size: usize,
) -> Result<*mut ngx_shm_zone_t, String> {
    let text = upstream.zone_name();
    if declared(cf, text.as_bytes()).is_some_and(|t| t != tag()) {
        return Err(format!(
            "shared memory zone \"{text}\" is already declared for a different use: this name is the zone of \"consul_upstream\" in {upstream}"
        ));
    }
    let mut name = ffi::pool_str(cf, &text).ok_or("out of memory")?;
    // SAFETY: cf is the configuration being parsed.
    let shm_zone = unsafe { ngx_shared_memory_add(cf, &mut name, size, tag()) };
    if shm_zone.is_null() {
        return Err(format!("could not add shared zone \"{text}\""));
    }
    // SAFETY: a zone nginx just returned.
    unsafe {
        (*shm_zone).init = Some(init_zone);
        (*shm_zone).data = ptr::null_mut();
    }
    Ok(shm_zone)
}

/// The shm zone `init` callback, in the master (or the single process). `data`
/// is the previous cycle's zone when nginx reuses it across a reload (same name
/// and size): the set, peer state and line records stay as they are. A fresh
/// zone takes over what the previous cycle's zone of another size held.
///
/// # Safety
/// Called by nginx with a zone this module registered.
pub unsafe extern "C" fn init_zone(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx passes a valid zone; its memory starts with a slab pool.
    let zone = unsafe { &mut *shm_zone };
    // SAFETY: data, when set, is this zone's data from the previous cycle.
    if !data.is_null() && unsafe { map(data as *mut Header) }.is_some() {
        zone.data = data;
        return NGX_OK as ngx_int_t;
    }
    let pool = zone.shm.addr as *mut ngx_slab_pool_t;
    // SAFETY: nginx initialized the pool; start/end bound its pages.
    let pages =
        unsafe { ((*pool).end as usize).saturating_sub((*pool).start as usize) } / pagesize();
    let capacity = capacity_of(zone.shm.size).min(capacity_for(pages * pagesize()));
    // Not zeroed: only the header needs it (records, slots and tree nodes are
    // written before they are read), and zeroing the rest would touch every
    // page of a big `zone=`, at `nginx -t` too, where nginx's own zones touch
    // only their page descriptors.
    // SAFETY: a fresh pool.
    let mem = unsafe { ngx_slab_alloc(pool, bytes_for(capacity)) };
    if mem.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    let header = mem as *mut Header;
    // SAFETY: header..+bytes_for(capacity) is ours; nobody reads it yet. All
    // zero is every atomic's initial state.
    unsafe {
        ptr::write_bytes(header as *mut u8, 0, size_of::<Header>());
        (*header).format(capacity);
    }
    zone.data = mem;
    // SAFETY: just laid out.
    let Some(new) = (unsafe { map(header) }) else {
        return NGX_ERROR as ngx_int_t;
    };
    // SAFETY: nginx calls init with the zone's shm fields set.
    if let Some(old) = unsafe { previous_zone(zone) } {
        let now_ms = ffi::current_msec();
        if let Err(too_large) = new.copy_from(&old, ffi::unix_now(), now_ms) {
            log::error!(
                "consul upstream zone \"{}\": the previous zone's peers do not fit the new size (max {}), starting empty",
                String::from_utf8_lossy(zone.shm.name.as_bytes()),
                too_large.capacity
            );
        }
    }
    NGX_OK as ngx_int_t
}

/// The running cycle's zone of the same name and tag, if it has one (a reload
/// that changed `zone=`: nginx maps the old zone until the new cycle is set up).
///
/// # Safety
/// `zone` must be a zone of the cycle being initialized.
unsafe fn previous_zone(zone: &ngx_shm_zone_t) -> Option<Zone<'static>> {
    // SAFETY: during ngx_init_cycle, ngx_cycle is the running (old) cycle.
    let cycle = unsafe { ngx::ffi::ngx_cycle.as_ref()? };
    let mut part = &cycle.shared_memory.part as *const ngx::ffi::ngx_list_part_t;
    while !part.is_null() {
        // SAFETY: a part of the cycle's list of zones.
        let p = unsafe { &*part };
        let zones = p.elts as *const ngx_shm_zone_t;
        for i in 0..p.nelts {
            // SAFETY: i < nelts.
            let old = unsafe { &*zones.add(i) };
            let same = old.tag == zone.tag
                && old.shm.name.as_bytes() == zone.shm.name.as_bytes()
                && old.shm.addr != zone.shm.addr
                && !old.data.is_null();
            if same {
                // SAFETY: a zone of this module in the running cycle, still mapped.
                return unsafe { map(old.data as *mut Header) };
            }
        }
        part = p.next;
    }
    None
}
