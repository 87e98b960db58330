//! Cost of picking a peer, at 2, 100, 1,000 and 10,000 peers.
//!
//! - `pick/selector`: `Selector::pick`, the O(1) schedule used by the module.
//! - `pick/view`: `PeerView::select` + `release` with round robin, what the balancer
//!   does per connection (passive health in shared slots, tried filter, counters).
//! - `pick/least_conn`, `pick/hash`, `pick/hash_consistent`, `pick/random`,
//!   `pick/random_two`: the same for each of nginx's methods over discovered peers
//!   (least_conn updates the shared tournament tree on pick and release).
//! - `pick/nginx_swrr`, `pick/nginx_least_conn`: re-implementations of nginx's smooth
//!   weighted round robin (`ngx_stream_upstream_get_peer`) and of its least_conn
//!   (`ngx_stream_upstream_get_least_conn_peer`), which walk every peer on every pick: O(n).
//! - `rebuild/selector`, `rebuild/ring`: what a worker builds for a new peer set (once per
//!   set change, not per connection): the round-robin schedule, a consistent-hash ring.
//!
//! All peers have weight 1 and priority 1, as Consul publishes by default.
//! The measurement times are short so that `cargo bench -p ngx-consul-core --bench select`
//! finishes in about half a minute; `-- --quick` is shorter still. `bench/run.sh` reads
//! the results from `target/criterion/pick/*/*/new/estimates.json`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ngx_consul_core::least::{nodes_for, Tree, NONE};
use ngx_consul_core::method::{Method, Rng, Tier};
use ngx_consul_core::select::Selector;
use ngx_consul_core::slot::PeerSlot;
use ngx_consul_core::view::{Balancing, PeerView, PickContext, Shared, SlotRef};
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

/// nginx's least_conn: every pick scans all peers for the fewest connections per
/// weight (`ngx_stream_upstream_get_least_conn_peer`), then among equals runs the
/// smooth weighted round robin.
struct NginxLeastConn {
    conns: Vec<u64>,
    weight: Vec<u64>,
    current_weight: Vec<i64>,
}

impl NginxLeastConn {
    fn new(n: usize) -> Self {
        NginxLeastConn {
            conns: vec![0; n],
            weight: vec![1; n],
            current_weight: vec![0; n],
        }
    }

    fn pick(&mut self) -> usize {
        let mut best = 0;
        let mut many = false;
        for i in 1..self.conns.len() {
            let (c, w) = (self.conns[i], self.weight[i]);
            let (bc, bw) = (self.conns[best], self.weight[best]);
            if c * bw < bc * w {
                best = i;
                many = false;
            } else if c * bw == bc * w {
                many = true;
            }
        }
        if many {
            let (bc, bw) = (self.conns[best], self.weight[best]);
            let mut total = 0;
            let mut top = best;
            for i in best..self.conns.len() {
                if self.conns[i] * bw != bc * self.weight[i] {
                    continue;
                }
                self.current_weight[i] += self.weight[i] as i64;
                total += self.weight[i] as i64;
                if self.current_weight[i] > self.current_weight[top] {
                    top = i;
                }
            }
            self.current_weight[top] -= total;
            best = top;
        }
        self.conns[best] += 1;
        best
    }

    fn release(&mut self, i: usize) {
        self.conns[i] -= 1;
    }
}

/// Shared state as the zone holds it, in ordinary memory.
struct Zoneish {
    slots: Vec<PeerSlot>,
    nodes: Vec<AtomicU32>,
    vtime: AtomicU64,
}

impl Zoneish {
    fn new(ps: &[Peer]) -> Zoneish {
        let slots: Vec<PeerSlot> = ps
            .iter()
            .map(|p| {
                let s = PeerSlot::default();
                s.weight.store(u32::from(p.share()), Ordering::Relaxed);
                s.band.store(p.band(), Ordering::Relaxed);
                s
            })
            .collect();
        let nodes = (0..nodes_for(slots.len()))
            .map(|_| AtomicU32::new(NONE))
            .collect();
        let z = Zoneish {
            slots,
            nodes,
            vtime: AtomicU64::new(0),
        };
        Tree::new(&z.nodes, &z.slots).rebuild();
        z
    }

    fn view(&self, ps: &[Peer], method: Method) -> PeerView<'_> {
        let mut view = PeerView::new(Balancing {
            method,
            ..Balancing::default()
        });
        let shared = Shared {
            tree: Tree::new(&self.nodes, &self.slots),
            vtime: &self.vtime,
        };
        view.replace(
            ps.iter()
                .zip(&self.slots)
                .enumerate()
                .map(|(i, (p, s))| (*p, SlotRef::new(s, 0, i as u32)))
                .collect(),
            0,
            Some(shared),
        );
        view
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

        let methods = [
            ("view", Method::RoundRobin),
            ("least_conn", Method::LeastConn),
            ("hash", Method::Hash),
            ("hash_consistent", Method::ConsistentHash),
            ("random", Method::Random),
            ("random_two", Method::RandomTwo),
        ];
        for (name, method) in methods {
            let zone = Zoneish::new(&ps);
            let mut view = zone.view(&ps, method);
            let health = view.balancing().health;
            let mut rng = Rng::new(7);
            let mut now = 1_000u64;
            let mut key = 0u64;
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    now += 1;
                    key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut ctx = PickContext {
                        retry: false,
                        key_hash: Some(key),
                        rng: &mut rng,
                    };
                    let i = view
                        .select(|i| black_box(i) == usize::MAX, now, &mut ctx)
                        .unwrap();
                    view.slot(i).unwrap().release(false, &health, now);
                    black_box(i)
                })
            });
        }

        let mut lc = NginxLeastConn::new(n);
        g.bench_with_input(BenchmarkId::new("nginx_least_conn", n), &n, |b, _| {
            b.iter(|| {
                let i = lc.pick();
                lc.release(i);
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
        g.bench_with_input(BenchmarkId::new("ring", n), &ps, |b, ps| {
            b.iter(|| black_box(Tier::build(black_box(ps), true)))
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
