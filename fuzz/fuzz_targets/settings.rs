//! `consul_upstream` parameters → `Settings::parse`: never a panic; an accepted line
//! is sane and, written back as parameters, parses to the same settings.
//! Input: the directive's arguments, one per line (nginx passes each as one string).
#![no_main]

use consul_core::settings::{Policy, Settings, Transport, MIN_ZONE_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let args: Vec<&str> = text.split('\n').collect();
    let s = match Settings::parse(&args) {
        Ok(s) => s,
        Err(e) => {
            assert!(!e.0.is_empty(), "an empty error message for {args:?}");
            return;
        }
    };
    assert!(!s.query.is_empty());
    match &s.api {
        // An API line is named by its request URL (service and tags keep their case).
        Some(api) => {
            assert_eq!(s.query, api.query());
            assert!(s.query.starts_with("http://") || s.query.starts_with("https://"));
            assert!(api.token.is_none(), "a token only comes from token_file");
            assert!((1_000..=600_000).contains(&api.wait_ms));
            assert!(api.ca_file.is_none() || api.agent.tls);
        }
        None => {
            assert!(!s.query.ends_with('.'));
            assert_eq!(s.query, s.query.to_ascii_lowercase());
            assert!(!s.resolvers.is_empty());
        }
    }
    assert!(s.resolvers.iter().all(|r| r.port() != 0));
    assert!(s.interval_ms > 0 && s.timeout_ms > 0);
    assert!(s.max_stale_ms != Some(0));
    assert!(s.zone_size >= MIN_ZONE_SIZE && s.zone_size <= 1 << 30);

    let again = render(&s);
    let refs: Vec<&str> = again.iter().map(String::as_str).collect();
    match Settings::parse(&refs) {
        Ok(back) => assert_eq!(back, s, "{args:?} -> {again:?}"),
        Err(e) => panic!("{args:?} was accepted, but {again:?} is refused: {e}"),
    }
});

/// The parameters that say exactly `s` (every value explicit).
fn render(s: &Settings) -> Vec<String> {
    let policy = |p: Policy| match p {
        Policy::Keep => "keep",
        Policy::Fail => "fail",
    };
    let mut a = match &s.api {
        Some(api) => {
            let mut a = vec![format!("service={}", api.service), format!("api={}", api.agent)];
            a.extend(api.tags.iter().map(|t| format!("tag={t}")));
            a.extend(api.datacenter.iter().map(|d| format!("datacenter={d}")));
            a.extend(api.filter.iter().map(|f| format!("filter={f}")));
            a.extend(api.token_file.iter().map(|f| format!("token_file={f}")));
            a.extend(api.ca_file.iter().map(|f| format!("api_ca={f}")));
            if api.only_passing {
                a.push("only_passing".into());
            }
            a.push(format!("wait={}ms", api.wait_ms));
            a
        }
        None => vec![format!("{}.", s.query)],
    };
    a.extend(s.resolvers.iter().map(|r| format!("resolver={r}")));
    a.push(format!("interval={}ms", s.interval_ms));
    a.push(format!("timeout={}ms", s.timeout_ms));
    // An API line takes tcp/udp only for its resolvers.
    if s.api.is_none() || !s.resolvers.is_empty() {
        a.push(
            match s.transport {
                Transport::Tcp => "tcp",
                Transport::Udp => "udp",
            }
            .into(),
        );
    }
    a.push(format!("on_empty={}", policy(s.on_empty)));
    a.push(format!("on_error={}", policy(s.on_error)));
    a.push(match s.max_stale_ms {
        Some(ms) => format!("max_stale={ms}ms"),
        None => "max_stale=off".into(),
    });
    a.push(format!("zone={}", s.zone_size));
    if let Some(p) = &s.state_path {
        a.push(format!("state={p}"));
    }
    a.push(format!("max_fails={}", s.health.max_fails));
    a.push(format!("fail_timeout={}ms", s.health.fail_timeout_ms));
    a.push(format!("slow_start={}ms", s.slow_start_ms));
    a.push(format!("max_conns={}", s.max_conns));
    a
}
