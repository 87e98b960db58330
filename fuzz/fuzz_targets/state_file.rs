//! State file text → `state::decode`: never a panic; an accepted file is one
//! upstream's (stream or http), holds sane, canonical, bounded peers, and
//! encoding it decodes to the same thing.
#![no_main]

use consul_core::key::UpstreamKey;
use consul_core::peer::canonicalize;
use consul_core::state::{decode, encode};
use libfuzzer_sys::fuzz_target;

/// The zone's capacity in peers, as the module passes it.
const MAX_PEERS: usize = 2_000;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A file is a stream or an http upstream's, never both.
    let keys = [UpstreamKey::stream("redis"), UpstreamKey::http("redis")];
    let mut accepted = keys
        .iter()
        .filter_map(|key| match decode(text, key, MAX_PEERS) {
            Ok(s) => Some((key, s)),
            Err(e) => {
                assert!(!e.is_empty());
                None
            }
        });
    let Some((key, saved)) = accepted.next() else {
        return;
    };
    assert!(accepted.next().is_none(), "one file, two upstreams");
    assert_eq!(&saved.upstream, key);
    let total: usize = saved.sources.iter().map(|s| s.peers.len()).sum();
    assert!(total <= MAX_PEERS);
    for src in &saved.sources {
        for p in &src.peers {
            // Weight 0 is kept: a weight-0 peer serves when no weighted one can.
            assert_ne!(p.addr.port(), 0);
        }
        let mut again = src.peers.clone();
        canonicalize(&mut again);
        assert_eq!(again, src.peers, "peers of {} not canonical", src.query);
    }
    let back = decode(&encode(&saved), key, MAX_PEERS).expect("an encoded state file decodes");
    assert_eq!(back, saved);
});
