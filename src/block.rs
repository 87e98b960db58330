//! What one `upstream {}` block holds for this module, in either protocol: its
//! `consul_upstream` lines (the protocol-free [`Upstream`]), the balancing
//! method it asked for, and what the directives in it left to check or to
//! chain once the block is read. The module's server conf of every block.

use consul_core::method::Method;

use crate::protocol::{InitUpstream, Key, Protocol};
use crate::upstream::Upstream;

/// The method a block asked for (`least_conn`, `hash`, `ip_hash`, `random`),
/// with what its hash hashes.
pub struct Chosen<P: Protocol> {
    pub method: Method,
    pub key: Option<Key<P>>,
}

impl<P: Protocol> Clone for Chosen<P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P: Protocol> Copy for Chosen<P> {}

/// The module's conf of an upstream block (and of every `server {}` block of
/// the protocol, where it stays empty).
pub struct Block<P: Protocol> {
    /// The block's `consul_upstream` lines, once the first is read.
    pub upstream: Option<Box<Upstream>>,
    pub method: Option<Chosen<P>>,
    /// The first `backup` server taken after `hash` or `random` before any
    /// `consul_upstream` line (file, line): refused if none comes.
    pub deferred_backup: Option<(String, usize)>,
    /// http `keepalive` on nginx < 1.29.7: the `init_upstream` its handler
    /// installed in this block, which calls the balancer below it at init
    /// (see `crate::conf::chain`).
    pub keepalive: Option<InitUpstream<P>>,
    /// What the balancer below `keepalive` is when the block has no
    /// `consul_upstream` line: the method's `init_upstream`, or round robin.
    pub below: Option<InitUpstream<P>>,
    /// A directive of another balancer that cannot work with discovered
    /// peers (`sticky`, `least_time`, `balancer_by_lua*`), seen in the block.
    pub foreign: Option<String>,
    /// The module's `init_upstream` ran for this block (checked once the
    /// protocol's block is read: another balancer replaced it if not).
    pub initialized: bool,
}

impl<P: Protocol> Default for Block<P> {
    fn default() -> Self {
        Block {
            upstream: None,
            method: None,
            deferred_backup: None,
            keepalive: None,
            below: None,
            foreign: None,
            initialized: false,
        }
    }
}
