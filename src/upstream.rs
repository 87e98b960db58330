//! The types the module's parts share: an upstream block with `consul_upstream`
//! lines, its lines, a worker's copy of its discovered set, the module's confs,
//! and the placeholder server that carries such a block through nginx's checks.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::ptr;

use ngx::core::Pool;
use ngx::ffi::{
    ngx_addr_t, ngx_array_push, ngx_conf_t, ngx_shm_zone_t, ngx_str_t,
    ngx_stream_upstream_server_t, ngx_stream_upstream_srv_conf_t, socklen_t,
};

use consul_core::method::Rng;
use consul_core::settings::Settings;
use consul_core::view::{PeerView, Shared, SlotRef};

use crate::ffi;
use crate::sockaddr::SockaddrBuf;
use crate::zone::SharedZone;

/// One `consul_upstream` line: a query with its resolvers and policies.
pub struct Line {
    pub settings: Settings,
    /// `source_tag` of the query: marks the line's peers and record in the zone.
    pub tag: u32,
    pub file: String,
    pub line: usize,
    /// An `api=` line's agent addresses and TLS context.
    pub api: Option<crate::api::ApiConf>,
}

/// Static `server` lines of the block: nginx's round robin serves them when no
/// discovered peer can take a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fallback {
    /// How many servers (nginx's round-robin peers) there are.
    pub servers: usize,
}

/// One upstream block with `consul_upstream` lines (their peer sets are merged).
pub struct Upstream {
    pub name: String,
    /// Never empty. The first line also holds the upstream-wide parameters.
    pub lines: Vec<Line>,
    /// `state=`, as a full path (relative paths are under nginx's prefix).
    pub state_path: Option<String>,
    pub uscf: *mut ngx_stream_upstream_srv_conf_t,
    pub shm_zone: *mut ngx_shm_zone_t,
    pub fallback: std::cell::Cell<Fallback>,
    /// `hash`'s key, when the upstream balances by a hash.
    pub hash_key: std::cell::Cell<*mut ngx::ffi::ngx_stream_complex_value_t>,
    /// This worker's copy of the discovered set.
    pub local: RefCell<Local>,
}

impl Upstream {
    /// The first `consul_upstream` line: zone, state file, passive health.
    pub fn first(&self) -> &Line {
        &self.lines[0]
    }

    /// `consul upstream "redis": `, the start of every runtime log line.
    pub fn prefix(&self) -> String {
        consul_core::key::UpstreamKey::stream(self.name.as_str()).log_prefix()
    }

    /// The zone, once nginx has initialized it.
    pub fn zone(&self) -> Option<SharedZone> {
        // SAFETY: shm_zone is this upstream's zone, registered at configuration
        // time; its memory is mapped for as long as the cycle lives.
        unsafe { SharedZone::of(self.shm_zone) }
    }
}

/// Room for a socket address's text: "[v6%scope]:port" takes at most 58 bytes.
const ADDR_TEXT_MAX: usize = 64;

/// A peer's socket address in the C form nginx connects with, and its text, in
/// one record: a pick reads no other memory to hand them to nginx.
pub struct Endpoint {
    pub sockaddr: SockaddrBuf,
    pub socklen: socklen_t,
    text_len: usize,
    text: [u8; ADDR_TEXT_MAX],
}

impl Endpoint {
    pub fn new(addr: &SocketAddr) -> Endpoint {
        let (buf, socklen) = SockaddrBuf::new(addr);
        let mut text = [0; ADDR_TEXT_MAX];
        let mut rest = &mut text[..];
        // Cannot fail (the text fits); a failure would only shorten the name.
        let _ = write!(rest, "{addr}");
        let text_len = ADDR_TEXT_MAX - rest.len();
        Endpoint {
            sockaddr: buf,
            socklen,
            text_len,
            text,
        }
    }

    pub fn text(&self) -> &[u8] {
        &self.text[..self.text_len]
    }
}

/// This worker's copy of one upstream's discovered set.
pub struct Local {
    pub view: PeerView<'static>,
    pub generation: u64,
    pub endpoints: Vec<Endpoint>,
    /// This worker's random numbers (random picks, slow start).
    pub rng: Rng,
    /// TLS sessions to the discovered peers (`proxy_ssl on`).
    #[cfg(ngx_feature = "ssl")]
    pub sessions: crate::tls::Sessions,
}

impl Local {
    pub fn new(view: PeerView<'static>) -> Local {
        Local {
            view,
            generation: 0,
            endpoints: Vec::new(),
            rng: Rng::new(0),
            #[cfg(ngx_feature = "ssl")]
            sessions: Default::default(),
        }
    }

    /// Copies the zone's set if its generation moved: one atomic load otherwise.
    pub fn refresh(&mut self, zone: Option<SharedZone>) {
        let Some(zone) = zone else { return };
        let zone = zone.zone();
        if zone.generation() == self.generation {
            return;
        }
        let Some(snap) = zone.read() else { return };
        if self.generation == 0 {
            // Workers draw different random numbers.
            self.rng = Rng::new(ffi::pid() as u64 ^ ffi::current_msec());
        }
        let (endpoints, peers): (Vec<Endpoint>, Vec<_>) = snap
            .peers
            .iter()
            .filter_map(|p| {
                let slot = zone.slot(p.slot)?;
                let peer = (p.peer, SlotRef::new(slot, p.epoch, p.slot));
                Some((Endpoint::new(&p.peer.addr), peer))
            })
            .unzip();
        self.endpoints = endpoints;
        let shared = Shared {
            tree: zone.tree(),
            vtime: zone.vtime(),
        };
        self.view.replace(peers, ffi::worker_index(), Some(shared));
        #[cfg(ngx_feature = "ssl")]
        self.sessions.retain(
            (0..self.view.peers().len())
                .filter_map(|i| self.view.slot(i))
                .map(|s| (s.index, s.epoch)),
        );
        self.generation = snap.generation;
    }
}

/// The module's conf of a `server {}` or `upstream {}` block of `stream {}`.
#[derive(Default)]
pub struct SrvConf {
    pub upstream: Option<Box<Upstream>>,
    /// `least_conn`, `hash` or `random` in the block.
    pub method: Option<crate::methods::Chosen>,
    /// The first `backup` server taken after `hash` or `random` before any
    /// `consul_upstream` line (file, line): refused if none comes.
    pub deferred_backup: Option<(String, usize)>,
}

/// A `state=` file in use.
pub struct StatePath {
    /// The file, however spelled (`consul_core::state::resolved_path`).
    pub file: std::path::PathBuf,
    /// As written (under nginx's prefix).
    pub written: String,
    pub upstream: consul_core::key::UpstreamKey,
}

/// Every upstream that uses `consul_upstream`, for the discovery process.
#[derive(Default)]
pub struct MainConf {
    pub upstreams: Vec<*const Upstream>,
    /// `state=` files in use, with their upstream: one file, one upstream.
    pub state_paths: Vec<StatePath>,
    /// Blocks with a deferred `backup` server (see `SrvConf::deferred_backup`).
    pub deferred_backups: Vec<*const SrvConf>,
}

/// The module's conf of an upstream block.
///
/// # Safety
/// `uscf` must be a stream upstream block's configuration.
pub unsafe fn srv_conf_of<'a>(uscf: &ngx_stream_upstream_srv_conf_t) -> Option<&'a SrvConf> {
    // SAFETY: per the contract; the conf lives as long as the cycle.
    let srv = unsafe { ffi::upstream_srv_conf(uscf, ffi::module()) } as *const SrvConf;
    // SAFETY: a non-null module conf of an upstream block is this module's SrvConf.
    unsafe { srv.as_ref() }
}

/// The module's upstream of an upstream block, if it has `consul_upstream`.
///
/// # Safety
/// `uscf` must be a stream upstream block's configuration.
pub unsafe fn upstream_of<'a>(uscf: &ngx_stream_upstream_srv_conf_t) -> Option<&'a Upstream> {
    // SAFETY: per the contract.
    unsafe { srv_conf_of(uscf) }?.upstream.as_deref()
}

/// Marks the placeholder server: its name points at this text.
static PLACEHOLDER: &str = "consul_upstream";

/// nginx refuses an upstream block without servers: a placeholder server carries
/// the block through that check and [`remove_placeholder`] takes it out again.
/// It has an address (0.0.0.0:0) so that a balancer that replaced ours
/// (`least_conn` after `consul_upstream`) gets as far as our postconfiguration
/// check, which names the conflict, instead of "no servers in upstream".
pub fn add_placeholder(
    cf: &mut ngx_conf_t,
    uscf: &mut ngx_stream_upstream_srv_conf_t,
) -> Result<(), String> {
    // SAFETY: cf.pool is the configuration's pool, alive for the whole cycle.
    let pool = unsafe { Pool::from_ngx_pool(cf.pool) };
    let sin = pool.calloc(std::mem::size_of::<libc::sockaddr_in>()) as *mut libc::sockaddr_in;
    let addr = pool.calloc(std::mem::size_of::<ngx_addr_t>()) as *mut ngx_addr_t;
    // SAFETY: uscf.servers is the block's server array (created with the block).
    let server = unsafe { ngx_array_push(uscf.servers) } as *mut ngx_stream_upstream_server_t;
    if sin.is_null() || addr.is_null() || server.is_null() {
        return Err("out of memory".into());
    }
    // SAFETY: fresh, zeroed pool memory of the right sizes.
    unsafe {
        (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
        (*addr).sockaddr = sin as *mut ngx::ffi::sockaddr;
        (*addr).socklen = std::mem::size_of::<libc::sockaddr_in>() as socklen_t;
        (*addr).name = ngx_str_t {
            len: PLACEHOLDER.len(),
            data: PLACEHOLDER.as_ptr() as *mut u8,
        };
        ptr::write_bytes(server, 0, 1);
        (*server).name = (*addr).name;
        (*server).addrs = addr;
        (*server).naddrs = 1;
        (*server).weight = 1;
    }
    Ok(())
}

/// Takes the placeholder out of the block's servers; returns how many (static)
/// servers are left.
pub fn remove_placeholder(uscf: &mut ngx_stream_upstream_srv_conf_t) -> usize {
    if uscf.servers.is_null() {
        return 0;
    }
    // SAFETY: the block's server array, as nginx built it.
    let servers = unsafe { &mut *uscf.servers };
    // SAFETY: its elements are ngx_stream_upstream_server_t.
    let list = unsafe { servers.as_slice_mut::<ngx_stream_upstream_server_t>() };
    let mut kept = 0;
    for i in 0..list.len() {
        if !ptr::eq(list[i].name.data, PLACEHOLDER.as_ptr()) {
            list.swap(kept, i);
            kept += 1;
        }
    }
    servers.nelts = kept;
    kept
}
