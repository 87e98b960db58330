# Spec for issue 17 (consul_upstream in http upstreams; design-17.md §8, its
# "040-http-balance"): written before the implementation. Until it lands every block
# fails at once with nginx -t's `"consul_upstream" directive is not allowed here`.
#
# Balancing http requests over discovered peers: weights, priority tiers, static and
# backup servers beside, a dead peer passed over, proxy_next_upstream (off, _tries),
# $upstream_addr/$upstream_status, max_fails/fail_timeout, max_conns, slow_start,
# proxy_pass http://$var, nginx's zone line with Consul down, memcached_pass. The
# static baselines of the same behaviours are in t/060-http-harness.t.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::Http;
use Time::HiRes qw(time sleep);

our $NAME = 'api.service.yunlu_office.consul';
our $LOCATION = <<'_EOC_';
location /api/ {
    proxy_pass http://api;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    add_header X-Upstream-Addr $upstream_addr always;
    add_header X-Upstream-Status $upstream_status always;
}
_EOC_

# The same backends in every block (reset between blocks) and the location above.
add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value('http_backends', '8081 8082 8083 memcached:11311')
        unless defined $block->http_backends;
    $block->set_value('config', $LOCATION) unless defined $block->config;
});

# Requests on new connections: { 'status upstream_addr' => count }
sub addr_status {
    my ($n, $path) = @_;
    my %seen;
    for (1 .. $n) {
        my $r = http_get($path // '/api/');
        $seen{"$r->{status} " . ($r->{headers}{'x-upstream-addr'} // '-')
              . ' ' . ($r->{headers}{'x-upstream-status'} // '-')}++;
    }
    return \%seen;
}

run_tests();

__DATA__

=== TEST 1: a request through a discovered instance
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(http_wait_for_backends([8081], path => '/api/'), 'discovered 8081');
--- request
GET /api/
--- response_body_like: ^127\.0\.0\.1 8081 conn=\d+ req=\d+$
--- error_log eval
qr/consul http upstream "api": 1 peer from api\.service\.yunlu_office\.consul \(generation \d+\)/
--- no_error_log
[error]
[warn]



=== TEST 2: two instances share the requests equally
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
is_tally(http_tally(20, '/api/'), {8081 => 10, 8082 => 10}, '10:10 over 20 requests');
is_tally(http_tally(20, '/api/', keepalive => 1), {8081 => 10, 8082 => 10}, '10:10 over one client connection');
--- no_error_log
[error]
[warn]



=== TEST 3: SRV weights 3 and 1 give 30:10 over 40 requests
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081 weight=3
instance api.service.yunlu_office.consul 127.0.0.1:8082 weight=1
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
is_tally(http_tally(40, '/api/'), {8081 => 30, 8082 => 10}, '30:10');
--- no_error_log
[error]



=== TEST 4: priority tiers: the lowest priority serves; when it dies, the next tier within the same request
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081 priority=1
instance api.service.yunlu_office.consul 127.0.0.1:8082 priority=2
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_log(qr/2 peers from/, 10), 'both discovered');
is_tally(http_tally(10, '/api/'), {8081 => 10}, 'priority 1 takes every request');
http_backend_kill(8081);
my $seen = addr_status(10);
is_deeply($seen, {'200 127.0.0.1:8081, 127.0.0.1:8082 502, 200' => 1, '200 127.0.0.1:8082 200' => 9},
          'priority 1 dead: tried once, then priority 2 serves (max_fails=1)')
    or diag(Test::More::explain($seen));
--- error_log eval
main::killed_peer_error(8081)



=== TEST 5: a static server beside consul_upstream serves before the first answer only
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    server 127.0.0.1:8083;
}
--- check
is_tally(http_tally(10, '/api/'), {8083 => 10}, 'Consul down from the start: the static server serves');
dns_start(records => "instance $::NAME 127.0.0.1:8081\n");
ok(http_wait_for_backends([8081], path => '/api/', only => 1, first_set => 0, timeout => 5),
   'then the discovered peer takes over');
is_tally(http_tally(10, '/api/'), {8081 => 10}, 'and serves alone');



=== TEST 6: a backup server serves only while no discovered peer can
--- workers: 2
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT fail_timeout=30s;
    server 127.0.0.1:8083 backup;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/', only => 1), 'discovered peers serve, the backup rests');
http_backend_kill(8081);
http_backend_kill(8082);
is_tally(http_tally(10, '/api/'), {8083 => 10}, 'both discovered peers dead: the backup serves every request');
is(backend_stats(8083)->{requests}, 10, 'counted at the backup');
--- error_log
connect() failed (111: Connection refused)



=== TEST 7: a dead peer (registered, nothing listening) is passed over within the request
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:20001
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_fails=0;
}
--- check
ok(wait_for_log(qr/2 peers from/, 10), 'both discovered');
my $mark = log_mark();
my $seen = addr_status(10);
is_deeply($seen, {'200 127.0.0.1:20001, 127.0.0.1:8081 502, 200' => 5, '200 127.0.0.1:8081 200' => 5},
          'every request answered; half tried the dead peer first ($upstream_addr, $upstream_status)')
    or diag(Test::More::explain($seen));
my $refused = () = error_log_since($mark) =~ /connect\(\) failed \(111: Connection refused\) while connecting to upstream/g;
is($refused, 5, 'five refused connects (max_fails=0: the dead peer keeps its turn)');
--- error_log
connect() failed (111: Connection refused)



=== TEST 8: proxy_next_upstream off: the dead peer's turns are 502s
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:20001
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_fails=0;
}
--- config
location /api/ {
    proxy_pass http://api;
    proxy_next_upstream off;
    add_header X-Upstream-Addr $upstream_addr always;
    add_header X-Upstream-Status $upstream_status always;
}
--- check
ok(wait_for_log(qr/2 peers from/, 10), 'both discovered');
my $seen = addr_status(10);
is_deeply($seen, {'502 127.0.0.1:20001 502' => 5, '200 127.0.0.1:8081 200' => 5}, '5 x 502, 5 x 200')
    or diag(Test::More::explain($seen));
--- error_log
connect() failed (111: Connection refused)



=== TEST 9: proxy_next_upstream_tries 1 stops after the dead peer; 2 reaches the live one
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:20001
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_fails=0;
}
--- config
location /api/ {
    proxy_pass http://api;
    proxy_next_upstream_tries 1;
}
location /two/ {
    proxy_pass http://api;
    proxy_next_upstream_tries 2;
}
--- check
ok(wait_for_log(qr/2 peers from/, 10), 'both discovered');
is_tally(http_tally(10, '/api/'), {8081 => 5, fail => 5}, '_tries 1: the dead peer\'s turns fail');
is_tally(http_tally(10, '/two/'), {8081 => 10}, '_tries 2: every request answered');
--- error_log
connect() failed (111: Connection refused)



=== TEST 10: max_fails=2 fail_timeout=30s: the dead peer is tried twice in all (both workers together)
--- workers: 2
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:20001
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_fails=2 fail_timeout=30s;
}
--- check
ok(wait_for_log(qr/2 peers from/, 10), 'both discovered');
my $mark = log_mark();
is_tally(http_tally(20, '/api/'), {8081 => 20}, 'every request answered by 8081');
my $refused = () = error_log_since($mark) =~ /connect\(\) failed \(111: Connection refused\) while connecting to upstream/g;
is($refused, 2, 'the dead peer was tried max_fails=2 times, then left alone for fail_timeout');
--- error_log
connect() failed (111: Connection refused)



=== TEST 11: max_conns=1: a peer with a request open takes no other; none free: 502 "no live upstreams"
--- workers: 2
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=1;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
http_backend_hold($_) for 8081, 8082;
my @held = map {
    my $d = http_get_background('/api/');
    my $n = $_;
    ok(wait_until(sub { backend_stats(8081)->{held} + backend_stats(8082)->{held} == $n }, 5), "request $n held");
    $d;
} 1 .. 2;
is(backend_stats(8081)->{held} . ' ' . backend_stats(8082)->{held}, '1 1', 'one open request per peer');
my $r = http_get('/api/');
is($r->{status}, 502, 'a third request: both peers at max_conns, 502');
http_backend_release();
my @done = map { $_->() } @held;
is(join(' ', sort map { "$_->{status} $_->{backend_port}" } @done), '200 8081 200 8082', 'the held ones answered');
--- error_log
no live upstreams while connecting to upstream



=== TEST 12: slow_start=30s: a newcomer gets a small share at first
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s slow_start=30s;
}
--- check
ok(http_wait_for_backends([8081], path => '/api/'), '8081 discovered');
consul_register($::NAME, '127.0.0.1:8082');
ok(wait_for_log(qr/2 peers from/, 5), '8082 joins');
my $t = http_tally(40, '/api/');
is($t->{fail} // 0, 0, 'no failure');
cmp_ok($t->{8082} // 0, '<', 12, "the newcomer took a small share (" . tally_str($t) . "; 20 without slow_start)");
--- no_error_log
[error]



=== TEST 13: proxy_pass http://$variable finds the upstream by name
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- config
location /api/ {
    set $up api;
    proxy_pass http://$up;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
is_tally(http_tally(20, '/api/'), {8081 => 10, 8082 => 10}, '10:10');
--- no_error_log
[error]



=== TEST 14: nginx's zone line and Consul down: 502 "no live upstreams", $upstream_addr is the name, no worker dies
A get that returns NGX_BUSY must set pc->name: with `zone` nginx copies it (MODIFY
flag, nginx >= 1.27.3) and a worker crashes otherwise (design-17.md §1, the http twin
of issue 20 item 1).
--- workers: 2
--- http_config
upstream api {
    zone api 64k;
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
# both workers up (under load the second may not have its title yet)
my @workers;
wait_until(sub { (@workers = nginx_worker_pids()) == 2 }, 10);
my $seen = addr_status(10);
is_deeply($seen, {'502 api 502' => 10}, 'ten 502s naming the upstream') or diag(Test::More::explain($seen));
is(join(' ', nginx_worker_pids()), join(' ', @workers), 'the same workers');
--- error_log
no live upstreams while connecting to upstream



=== TEST 15: memcached_pass to a discovered memcached, with keepalive
--- dns
instance mc.service.yunlu_office.consul 127.0.0.1:11311
--- http_config
upstream mc {
    consul_upstream mc.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    keepalive 4;
}
--- config
location /mc {
    set $memcached_key $arg_k;
    memcached_pass mc;
}
--- check
ok(http_wait_for_backends([11311], path => '/mc?k=one'), 'discovered');
http_backends_reset();
is_tally(http_tally(10, '/mc?k=one', keepalive => 1), {11311 => 10}, '10 answers from the memcached peer');
my $s = backend_stats(11311);
is("$s->{accepted}/$s->{requests}", '1/10', 'over one connection (keepalive)');
is(http_get('/mc?k=missing1')->{status}, 404, 'a miss is a 404');
--- no_error_log
[error]



=== TEST 16: a retry takes the set as it is then: a newcomer, never a peer that left meanwhile
The request waits at 8081 until proxy_read_timeout; meanwhile 8083 registers and 8082
(still running) deregisters. The retry goes to 8083. A worker that kept the set it
took when the request began (checked: the module before issue 17) finds only the
peer that left, whose slot no longer takes connections: 502, "8081, api".
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- config
location /api/ {
    proxy_pass http://api;
    proxy_read_timeout 5s;
    proxy_next_upstream error timeout;
    add_header X-Upstream-Addr $upstream_addr always;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
http_backend_hold(8081);
my $held;
for (1 .. 2) {
    my $d = http_get_background('/api/');
    if (wait_until(sub { backend_stats(8081)->{held} == 1 }, 2)) { $held = $d; last }
    $d->();
}
ok($held, 'a request waits at 8081');
consul_register($::NAME, '127.0.0.1:8083');
consul_deregister($::NAME, '127.0.0.1:8082');
ok(wait_for_log(qr/consul http upstream "api": 2 peers from/, 4, 2), 'the set is 8081 and 8083');
my $before = backend_stats(8082)->{requests};
my $r = $held->();
is("$r->{status} " . ($r->{backend_port} // '-'), '200 8083', 'the retry went to the newcomer');
is($r->{headers}{'x-upstream-addr'}, '127.0.0.1:8081, 127.0.0.1:8083', '$upstream_addr');
is(backend_stats(8082)->{requests}, $before, '8082 got no request once it left');
http_backend_release();
--- error_log
upstream timed out
