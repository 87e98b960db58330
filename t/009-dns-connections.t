# DNS connections to the resolver (issue 16, item 9): lines that ask the same
# resolver share one TCP connection (200 lines held 200; dnsmasq serves 20 TCP
# clients, BIND 150); the server closing it (miekg/dns: after 128 queries, or
# 8 s idle) costs no failed lookup; each line keeps its own timeout; the
# connection belongs to the cycle (a reload closes it, the new workers open
# one). The resolver is the hostile DNS server in "consul" mode, which logs the
# connections it accepts and closes.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::HostileDns;
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';
$ENV{TEST_NGINX_HOSTILE_PORT} = hostile_port();

# Ten upstreams, svc1..svc10, one line each, all asking the hostile server.
our $TEN = join '', map { "instance svc$_.service.yunlu_office.consul 127.0.0.1:6380\n" } 1 .. 10;
sub ten_upstreams {
    my $params = shift;
    return join '', map {
        "upstream u$_ { consul_upstream svc$_.service.yunlu_office.consul "
          . "resolver=127.0.0.1:$ENV{TEST_NGINX_HOSTILE_PORT} $params; }\n"
    } 1 .. 10;
}
$ENV{TEST_NGINX_TEN_FAST} = ten_upstreams('interval=100ms');
$ENV{TEST_NGINX_TEN} = ten_upstreams('interval=300ms');

run_tests();

__DATA__

=== TEST 1: ten lines with the same resolver share one TCP connection
--- backends: 6380
--- setup
hostile_start(mode => 'consul', consul => { tcp_max_queries => 0, tcp_idle => 0 }, instances => $main::TEN);
--- stream_config
$TEST_NGINX_TEN
upstream redis { server 127.0.0.1:6380; }
--- check
ok(wait_for_log(qr/1 peer from svc10\.service/, 5), 'every line answered');
sleep 1;
ok(hostile_queries(type => 'SRV') >= 30, 'queries go on: ' . hostile_queries(type => 'SRV'));
# One connection for the master's lookup before it forked the workers (all ten
# lines on it, closed when it was done), one for worker 0's lines since.
is(hostile_connections(), 2, "over one connection (after the master's)");
is(hostile_connections(open => 1), 1, 'which stays open');
--- no_error_log
[warn]
[error]



=== TEST 2: the server closes the connection after 128 queries: no lookup fails
--- backends: 6380
--- setup
hostile_start(mode => 'consul', consul => { tcp_max_queries => 128 }, instances => $main::TEN);
--- stream_config
$TEST_NGINX_TEN_FAST
upstream redis { server 127.0.0.1:6380; }
--- check
ok(wait_for_log(qr/1 peer from svc10\.service/, 5), 'every line answered');
# 100 queries a second: a new connection every 1.3 s or so (the first one was
# the master's lookup, 10 queries, before it forked the workers).
ok(wait_until(sub { hostile_connections() >= 1 + 5 }, 15), 'the server closed connections: ' . hostile_connections());
ok(hostile_queries(type => 'SRV') >= 4 * 128, 'queries: ' . hostile_queries(type => 'SRV'));
cmp_ok(hostile_connections(open => 1), '<=', 1, 'one open at a time');
--- no_error_log
failed
[error]



=== TEST 3: the server closes an idle connection: no lookup fails
--- backends: 6380
--- setup
hostile_start(mode => 'consul', consul => { tcp_idle => 0.5 },
              instances => "instance $main::NAME 127.0.0.1:6380\n");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
ok(wait_until(sub { hostile_connections() >= 4 }, 8), 'a connection for each query: ' . hostile_connections());
--- no_error_log
failed
[error]



=== TEST 4: each line keeps its own timeout on the shared connection
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- setup
hostile_start(mode => 'never', instances => "instance $main::NAME 127.0.0.1:6380\n");
--- stream_config
upstream short {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT timeout=1s;
}
upstream long {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT timeout=6s;
}
--- stream_server_config
proxy_pass short;
--- check
ok(wait_for_backends([6380]), 'discovered');
# Both lines ask the silent server from now on (a reload keeps the sets and
# worker 0 asks at once; the master asks nothing, its zones hold the sets: its
# own lookup is bounded by 2 s at start).
stream_config_set(<<'_EOC_');
upstream short {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT timeout=1s;
}
upstream long {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT timeout=6s;
}
_EOC_
ok(nginx_reload(), 'reloaded');
ok(wait_for_log(qr/consul upstream "short": resolving \S+ failed: 127\.0\.0\.1:\d+ timed out, keeping 1 peer$/m, 5), 'timeout=1s gives up');
is(log_count(qr/consul upstream "long": resolving \S+ failed/), 0, 'timeout=6s still waits');
ok(wait_for_log(qr/consul upstream "long": resolving \S+ failed: 127\.0\.0\.1:\d+ timed out, keeping 1 peer$/m, 8), 'then gives up too');



=== TEST 5: a reload closes the shared connection; the new workers open one
--- workers: 2
--- backends: 6380
--- setup
hostile_start(mode => 'consul', consul => { tcp_max_queries => 0, tcp_idle => 0 }, instances => $main::TEN);
--- stream_config
$TEST_NGINX_TEN
upstream redis { server 127.0.0.1:6380; }
--- check
ok(wait_for_log(qr/1 peer from svc10\.service/, 5), 'every line answered');
# The master's lookup had one (closed); worker 0 asks one interval later.
ok(wait_until(sub { hostile_connections() == 2 }, 5), "worker 0's after the master's");
is(hostile_connections(open => 1), 1, 'one connection');
ok(nginx_reload(), 'reloaded');
ok(wait_until(sub { hostile_connections() == 3 && hostile_connections(open => 1) == 1 }, 10),
   'the old one closed, one new: ' . hostile_connections() . ' accepted, ' . hostile_connections(open => 1) . ' open');
--- no_error_log
[error]
