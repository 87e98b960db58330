//! An agent's HTTP response bytes → `http::parse_head`, the chunked decoder and
//! the `ResponseReader` both clients read with, fed in pieces of every size the
//! input picks: never a panic, a body never over its cap, the same response
//! whatever the pieces.
#![no_main]

use consul_core::http::{parse_head, Chunked, Framing, Progress, ResponseReader, MAX_HEAD};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fn dechunk(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), String> {
    let mut c = Chunked::default();
    let mut out = Vec::new();
    for part in input.chunks(step.max(1)) {
        let used = c.decode(part, &mut out, MAX)?;
        assert!(used <= part.len());
        assert!(out.len() <= MAX);
        if used < part.len() {
            assert!(c.is_done());
            break;
        }
    }
    Ok((out, c.is_done()))
}

/// The response read from `input` in pieces of `step`, then the connection's end.
fn read(input: &[u8], step: usize) -> Result<Option<(Vec<u8>, u16)>, String> {
    let mut r = ResponseReader::new(MAX);
    for part in input.chunks(step.max(1)) {
        if let Progress::Done { response, .. } = r.push(part)? {
            assert!(response.body.len() <= MAX);
            return Ok(Some((response.body, response.status)));
        }
    }
    Ok(r.end().map(|response| (response.body, response.status)))
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    match parse_head(input) {
        Ok(Some(head)) => {
            assert!(head.len <= input.len());
            assert!((200..=599).contains(&head.status));
            if head.framing == Framing::Close {
                assert!(!head.keep_alive);
            }
        }
        Ok(None) => {}
        Err(e) => assert!(!e.is_empty()),
    }
    let whole = dechunk(input, input.len());
    let pieces = dechunk(input, usize::from(step));
    match (whole, pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the same body whatever the pieces"),
        (Err(_), Err(_)) => {}
        // An error may come only once its bytes arrive: with the whole input
        // an error, pieces may stop on one too.
        (a, b) => panic!("whole {a:?} vs pieces {b:?}"),
    }
    // The reader: the same response (or an error) whatever the pieces. (A head
    // longer than MAX_HEAD is refused once that much came without its end:
    // whole, it may be complete.)
    match (read(input, input.len()), read(input, usize::from(step))) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the same response whatever the pieces"),
        (Err(_), Err(_)) => {}
        (Ok(_), Err(_)) if input.len() >= MAX_HEAD => {}
        (a, b) => panic!("whole {a:?} vs pieces {b:?}"),
    }
});
