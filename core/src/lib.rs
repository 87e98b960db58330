//! The FFI-free half of ngx-consul: everything `cargo test` can reach without nginx.
//!
//! - [`key`]: an upstream's protocol and name, and everything named after them
//!   (zone name, log prefix, status label, state file identity).
//! - [`settings`]: `consul_upstream` parameters to typed settings, with nginx-style errors.
//! - [`api`]: an `api=` line's parameters, agent address, ACL token and request target.
//! - [`health`]: Consul's `/v1/health/service` answer (JSON) to a peer set.
//! - [`blocking`]: Consul's client rules for blocking queries (index, wait, pace).
//! - [`http`]: an HTTP/1.1 GET and its response, read with bounds.
//! - [`answer`]: a DNS answer (SRV + addresses) to a canonical peer set.
//! - [`message`]: a DNS response message (wire bytes) to the records [`answer`] reads.
//! - [`lookup`]: how both DNS clients (worker 0's, the master's before it forks
//!   workers) read a resolver's answers, and one line's lookup as bytes in and out.
//! - [`peer`]: a discovered backend (one SRV record, one address).
//! - [`select`]: smooth weighted round robin over priority tiers, O(1) per pick.
//! - [`method`]: nginx's other methods (`least_conn`, `hash` and `ip_hash`, `random`)
//!   over a set; [`least`]: least connections across workers, O(log n).
//! - [`slot`]: the per-peer atomics every worker shares in the zone.
//! - [`zone`]: the shared-memory zone's layout and every operation on it.
//! - [`view`]: a worker's peer view with passive health that survives set updates.
//! - [`policy`]: what discovery does with each outcome (keep, drop, backoff, log once).
//! - [`group`]: one upstream's lines in the writing process: their parts of the
//!   set, merged and sized, each line's record, when the state file is written.
//! - [`state`]: the state file that carries the last good set across restarts.
//! - [`status`]: what the balancer sees, as JSON and Prometheus text.

pub mod answer;
pub mod api;
pub mod blocking;
pub mod group;
pub mod health;
pub mod http;
pub mod key;
pub mod least;
pub mod lookup;
pub mod message;
pub mod method;
pub mod peer;
pub mod policy;
pub mod select;
pub mod settings;
pub mod slot;
pub mod state;
pub mod status;
pub mod view;
pub mod zone;

pub use peer::Peer;
