//! The types every part shares, whatever the protocol: an upstream with
//! `consul_upstream` lines, its lines, and a worker's copy of its discovered set.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::SocketAddr;

use ngx::ffi::{ngx_shm_zone_t, socklen_t};

use consul_core::key::{LogPrefix, UpstreamKey};
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
    /// Its protocol and name: what names its zone, log lines, status entry and
    /// state file.
    pub key: UpstreamKey,
    /// Never empty. The first line also holds the upstream-wide parameters.
    pub lines: Vec<Line>,
    /// `state=`, as a full path (relative paths are under nginx's prefix).
    pub state_path: Option<String>,
    pub shm_zone: *mut ngx_shm_zone_t,
    pub fallback: Cell<Fallback>,
    /// This worker's copy of the discovered set.
    pub local: RefCell<Local>,
}

impl Upstream {
    /// The first `consul_upstream` line: zone, state file, passive health.
    pub fn first(&self) -> &Line {
        &self.lines[0]
    }

    /// `consul upstream "redis": ` (`consul http upstream "api": `), the start
    /// of every runtime log line.
    pub fn prefix(&self) -> LogPrefix<'_> {
        self.key.log_prefix()
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
    /// The peer's zone slot number (what a session's tried peers are kept by).
    pub slot: u32,
    text_len: usize,
    text: [u8; ADDR_TEXT_MAX],
}

impl Endpoint {
    pub fn new(addr: &SocketAddr, slot: u32) -> Endpoint {
        let (buf, socklen) = SockaddrBuf::new(addr);
        let mut text = [0; ADDR_TEXT_MAX];
        let mut rest = &mut text[..];
        // Cannot fail (the text fits); a failure would only shorten the name.
        let _ = write!(rest, "{addr}");
        let text_len = ADDR_TEXT_MAX - rest.len();
        Endpoint {
            sockaddr: buf,
            socklen,
            slot,
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
                Some((Endpoint::new(&p.peer.addr, p.slot), peer))
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
