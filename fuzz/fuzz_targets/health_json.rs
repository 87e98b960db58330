//! Consul's `/v1/health/service` answer (JSON bytes) → `health::parse` →
//! `HealthAnswer::peers`: never a panic; every entry is counted once (a peer,
//! left out by health, or left out for its address); peers are canonical,
//! priority 1, port ≠ 0, one per instance and address, none that takes no
//! connections or points at nginx's own socket.
#![no_main]

use std::collections::HashMap;
use std::net::IpAddr;

use consul_core::answer::{takes_connections, OwnAddresses};
use consul_core::health::{parse, Address, API_PRIORITY};
use consul_core::peer::canonicalize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let only_passing = flags & 1 == 1;
    let with_resolver = flags & 2 == 2;
    let mut answer = match parse(body, only_passing) {
        Ok(a) => a,
        Err(e) => {
            assert!(e.starts_with("malformed answer ("), "{e}");
            assert!(e.len() < 140);
            return;
        }
    };
    let left = answer.left.clone();
    let address_left = left.port_zero + left.no_address + left.bad_address;
    assert_eq!(
        answer.entries,
        answer.instances.len() + answer.critical + answer.not_passing + address_left,
        "every entry counted once"
    );
    let own = OwnAddresses {
        listen: vec!["127.0.0.1:6379".parse().unwrap()],
        local_ips: vec![],
    };
    // Every host name resolves to one address (or, for every other one, none).
    let hosts: HashMap<String, Vec<IpAddr>> = answer
        .host_names()
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let ips = if i % 2 == 0 { vec![IpAddr::from([127, 0, 0, 9])] } else { vec![] };
            (h, ips)
        })
        .collect();
    for i in &answer.instances {
        assert_ne!(i.port, 0);
        if let Address::Host(h) = &i.address {
            assert_eq!(*h, h.to_ascii_lowercase());
            assert!(!h.ends_with('.'));
        }
    }
    let instances = answer.instances.len();
    let peers = answer.peers(&own, with_resolver.then_some(&hosts));
    assert!(peers.len() <= instances);
    let mut again = peers.clone();
    canonicalize(&mut again);
    assert_eq!(again, peers, "canonical");
    for p in &peers {
        assert_ne!(p.addr.port(), 0);
        assert_eq!(p.priority, API_PRIORITY);
        assert!(takes_connections(p.addr.ip()));
        assert!(!own.contains(&p.addr));
    }
});
