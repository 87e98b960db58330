//! A DNS response message, as bytes from the wire, to core's [`Record`]s.
//!
//! The one place where hickory's parsed records become the plain data that
//! [`crate::answer::SrvAnswer`] works on: the module converts what its resolver
//! returns with [`convert`], and the fuzz target `dns_message` drives the whole
//! path (hickory's parser, this conversion, `SrvAnswer`) from raw bytes.
//! hickory-proto is the version hickory-resolver uses (one copy in Cargo.lock).

use hickory_proto::op::Message;
use hickory_proto::rr::{RData, Record as DnsRecord};

use crate::answer::{Record, RecordData};

/// The ANSWER and ADDITIONAL records of a response message, converted.
/// Other sections (question, authority, EDNS) are not needed to build a peer set.
pub fn records_of(msg: &[u8]) -> Result<(Vec<Record>, Vec<Record>), String> {
    let msg = Message::from_vec(msg).map_err(|e| format!("malformed DNS message: {e}"))?;
    let answers = msg.answers.iter().map(convert).collect();
    let additionals = msg.additionals.iter().map(convert).collect();
    Ok((answers, additionals))
}

/// One hickory record as core's record: SRV, A, AAAA and CNAME keep their data,
/// anything else is [`RecordData::Other`] (counted, never used).
pub fn convert(r: &DnsRecord) -> Record {
    let data = match &r.data {
        RData::SRV(s) => RecordData::Srv {
            priority: s.priority,
            weight: s.weight,
            port: s.port,
            target: s.target.to_ascii(),
        },
        RData::A(a) => RecordData::A(a.0),
        RData::AAAA(a) => RecordData::Aaaa(a.0),
        RData::CNAME(c) => RecordData::Cname(c.0.to_ascii()),
        _ => RecordData::Other,
    };
    Record::new(&r.name.to_ascii(), data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::SrvAnswer;

    /// BIND 9.18's answer over TCP (length prefix removed) to
    /// `redis.service.yunlu_office.consul SRV`, zone as t/ writes it: two instances,
    /// `.addr.` targets, A records in ADDITIONAL (also the fuzz target's seed).
    const BIND_TWO: &[u8] = include_bytes!("../../fuzz/seeds/dns_message/bind-two-instances.bin");

    #[test]
    fn bind_answer_to_peers() {
        let (answers, additionals) = records_of(BIND_TWO).unwrap();
        assert_eq!(answers.len(), 2);
        assert_eq!(additionals.len(), 1, "one A record for the shared target");
        let mut ans = SrvAnswer::parse("redis.service.yunlu_office.consul", &answers, &additionals);
        let peers: Vec<String> = ans
            .peers(&crate::answer::OwnAddresses::default())
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            peers,
            [
                "127.0.0.1:6380 weight=3 priority=1",
                "127.0.0.1:6381 weight=1 priority=1"
            ]
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(records_of(b"").is_err());
        assert!(records_of(&BIND_TWO[..BIND_TWO.len() / 2]).is_err());
        // A name whose compression pointer points at itself.
        let mut looped = BIND_TWO[..12].to_vec();
        looped[5] = 1; // QDCOUNT 1
        looped[7] = 0; // ANCOUNT 0
        looped[9] = 0;
        looped[11] = 0;
        looped.extend_from_slice(&[0xc0, 12, 0, 33, 0, 1]);
        assert!(records_of(&looped).is_err());
    }
}
