//! A DNS response (wire bytes) → the peer set the module would publish: hickory's
//! parser, core's conversion (`message::records_of`), `SrvAnswer::parse` and `peers`;
//! and the same bytes as the answer to the master's lookup (`lookup::SrvLookup`,
//! which reads by the rules both DNS clients share), over UDP and TCP.
#![no_main]

use std::collections::HashSet;

use consul_core::answer::{
    normalize, takes_connections, OwnAddresses, SrvAnswer, MAX_ADDRS_PER_TARGET, MAX_SRV_RECORDS,
};
use consul_core::lookup::{QueryIds, SrvLookup};
use consul_core::message::records_of;
use consul_core::peer::canonicalize;
use libfuzzer_sys::fuzz_target;

/// The query of the seeds (real BIND answers); hostile owners are other names.
const QUERY: &str = "redis.service.yunlu_office.consul";

fuzz_target!(|data: &[u8]| {
    if let [hi, lo, ..] = *data {
        let own = OwnAddresses::default();
        for over_tcp in [false, true] {
            // The query's id is the message's: the seeds answer QUERY's question.
            let mut ids = QueryIds::new(u16::from_be_bytes([hi, lo]));
            let mut lookup = SrvLookup::new(QUERY, "127.0.0.1:8600".parse().unwrap());
            if lookup.start(&mut ids).is_some() {
                let _ = lookup.on_message(data, over_tcp, &own, &mut ids);
                lookup.fail("timed out".into(), &own);
                assert!(lookup.is_done(), "a lookup ends when its transport fails");
            }
        }
    }
    let Ok((answers, additionals)) = records_of(data) else {
        return;
    };
    let mut answer = SrvAnswer::parse(QUERY, &answers, &additionals);
    assert!(answer.srvs.len() <= MAX_SRV_RECORDS);
    assert!(
        answer.srvs.iter().all(|s| s.port != 0),
        "an SRV with port 0 was kept"
    );
    let srvs = answer.srvs.len();
    // nginx's own sockets: one on a loopback address, one on all addresses.
    let own = OwnAddresses {
        listen: vec![
            "127.0.0.1:1985".parse().unwrap(),
            "0.0.0.0:6379".parse().unwrap(),
        ],
        local_ips: vec!["10.0.0.1".parse().unwrap()],
    };
    let peers = answer.peers(&own);
    // Never an address that takes no connections, never nginx itself.
    for p in &peers {
        assert!(
            takes_connections(p.addr.ip()),
            "peer {p} takes no connections"
        );
        assert!(!own.contains(&p.addr), "peer {p} is nginx's own socket");
    }

    // Bounded: one peer per SRV record and address of its target.
    assert!(peers.len() <= srvs * MAX_ADDRS_PER_TARGET);
    // Usable: a port (weight 0 is kept: such a peer serves when no weighted
    // peer of its tier can).
    for p in &peers {
        assert_ne!(p.addr.port(), 0, "peer {p} has port 0");
    }
    // Deduplicated: one peer per address.
    let addrs: HashSet<_> = peers.iter().map(|p| p.addr).collect();
    assert_eq!(addrs.len(), peers.len(), "duplicate addresses in {peers:?}");
    // Canonical: canonicalizing again changes nothing (an unchanged answer is no change).
    let mut again = peers.clone();
    canonicalize(&mut again);
    assert_eq!(again, peers, "peer set not in canonical order");
    // Only what the message says: every port is some kept SRV record's port.
    let ports: HashSet<u16> = answer.srvs.iter().map(|s| s.port).collect();
    assert!(peers.iter().all(|p| ports.contains(&p.addr.port())));
    // Names are compared in one form: lower case, no root dot.
    assert!(answers
        .iter()
        .chain(&additionals)
        .all(|r| r.name == normalize(&r.name)));
});
