//! An agent's HTTP response bytes → `http::parse_head` and the chunked decoder,
//! fed in pieces of every size the input picks: never a panic, a body never
//! over its cap, the same body whatever the pieces.
#![no_main]

use consul_core::http::{parse_head, Chunked, Framing};
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
});
