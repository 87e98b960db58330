//! Cost of picking a peer, at 2, 100, 1,000 and 10,000 peers.
//!
//! - `pick/selector`: `Selector::pick`, the O(1) schedule used by the module.
//! - `pick/view`: `PeerView::select` + `release`, what the balancer does per connection
//!   (passive health checks, tried filter, connection counters).
//! - `pick/nginx_swrr`: a re-implementation of nginx's smooth weighted round robin
//!   (`ngx_stream_upstream_get_peer`), which walks every peer on every pick: O(n).
//! - `rebuild/selector`: building a selector for a new peer set (once per set change
//!   per worker, not per connection).
//!
//! All peers have weight 1 and priority 1, as Consul publishes by default.
//! The measurement times are short so that `cargo bench -p ngx-consul-core --bench select`
//! finishes in about half a minute; `-- --quick` is shorter still. `bench/run.sh` reads
//! the results from `target/criterion/pick/*/*/new/estimates.json`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ngx_consul_core::select::Selector;
use ngx_consul_core::view::{HealthPolicy, PeerView};
use ngx_consul_core::Peer;

const SIZES: [usize; 4] = [2, 100, 1_000, 10_000];

/// Peer `i` at 127.78.(i / 250).(i % 250 + 1):6400, as `bench/run.sh` lays out its backends.
fn peers(n: usize) -> Vec<Peer> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::new(127, 78, (i / 250) as u8, (i % 250 + 1) as u8);
            Peer::new(SocketAddr::from((ip, 6400)), 1, 1)
        })
        .collect()
}

/// nginx's round-robin peer (the fields `ngx_stream_upstream_get_peer` reads and writes).
struct RrPeer {
    current_weight: i64,
    effective_weight: i64,
    weight: i64,
    fails: u32,
    max_fails: u32,
    fail_timeout_ms: u64,
    checked_ms: u64,
    down: bool,
}

/// nginx's smooth weighted round robin: every pick adds each usable peer's effective
/// weight to its current weight, takes the peer with the largest current weight and
/// subtracts the total from it. `tried` is the per-connection bitmap nginx keeps.
struct NginxSwrr {
    peers: Vec<RrPeer>,
    tried: Vec<u64>,
}

impl NginxSwrr {
    fn new(n: usize) -> Self {
        NginxSwrr {
            peers: (0..n)
                .map(|_| RrPeer {
                    current_weight: 0,
                    effective_weight: 1,
                    weight: 1,
                    fails: 0,
                    max_fails: 1,
                    fail_timeout_ms: 10_000,
                    checked_ms: 0,
                    down: false,
                })
                .collect(),
            tried: vec![0; n.div_ceil(64)],
        }
    }

    /// One connection's first pick: nginx zeroes the tried bitmap per connection
    /// (`ngx_stream_upstream_init_round_robin_peer`), then runs `get_peer`, which
    /// visits every peer.
    fn pick(&mut self, now_ms: u64) -> Option<usize> {
        self.tried.iter_mut().for_each(|w| *w = 0);
        let mut best: Option<usize> = None;
        let mut best_cw = i64::MIN;
        let mut total = 0i64;
        for (i, peer) in self.peers.iter_mut().enumerate() {
            if self.tried[i / 64] & (1 << (i % 64)) != 0 || peer.down {
                continue;
            }
            if peer.max_fails != 0
                && peer.fails >= peer.max_fails
                && now_ms.saturating_sub(peer.checked_ms) <= peer.fail_timeout_ms
            {
                continue;
            }
            peer.current_weight += peer.effective_weight;
            total += peer.effective_weight;
            if peer.effective_weight < peer.weight {
                peer.effective_weight += 1;
            }
            if best.is_none() || peer.current_weight > best_cw {
                best = Some(i);
                best_cw = peer.current_weight;
            }
        }
        let b = best?;
        let peer = &mut self.peers[b];
        peer.current_weight -= total;
        if now_ms.saturating_sub(peer.checked_ms) > peer.fail_timeout_ms {
            peer.checked_ms = now_ms;
        }
        self.tried[b / 64] |= 1 << (b % 64);
        Some(b)
    }
}

fn bench_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    g.throughput(Throughput::Elements(1));
    for &n in &SIZES {
        let ps = peers(n);

        let mut sel = Selector::new(&ps, 0);
        g.bench_with_input(BenchmarkId::new("selector", n), &n, |b, _| {
            b.iter(|| black_box(sel.pick(|i| black_box(i) != usize::MAX)))
        });

        let mut view = PeerView::new(HealthPolicy::default());
        view.replace(ps.clone(), 0);
        let addrs: Vec<SocketAddr> = view.peers().iter().map(|p| p.addr).collect();
        let mut now = 1_000u64;
        g.bench_with_input(BenchmarkId::new("view", n), &n, |b, _| {
            b.iter(|| {
                now += 1;
                let i = view.select(|i| black_box(i) == usize::MAX, now).unwrap();
                view.release(i, &addrs[i], false, now);
                black_box(i)
            })
        });

        let mut swrr = NginxSwrr::new(n);
        g.bench_with_input(BenchmarkId::new("nginx_swrr", n), &n, |b, _| {
            b.iter(|| black_box(swrr.pick(black_box(1_000))))
        });
    }
    g.finish();
}

fn bench_rebuild(c: &mut Criterion) {
    let mut g = c.benchmark_group("rebuild");
    for &n in &SIZES {
        let ps = peers(n);
        g.bench_with_input(BenchmarkId::new("selector", n), &ps, |b, ps| {
            b.iter(|| black_box(Selector::new(black_box(ps), 0)))
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1_000))
        .sample_size(20)
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_pick, bench_rebuild
}
criterion_main!(benches);
