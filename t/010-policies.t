# Structured queries, fallback servers, on_empty/on_error/max_stale policies,
# priority tiers, resolver failover, backoff, the state file.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';
our $SRVQ = qr/query: redis\.service\.yunlu_office\.consul IN SRV/;

# A loopback port with nothing listening.
run_tests();

__DATA__

=== TEST 1: service= tag= datacenter= build primary.redis.service.yunlu_office.consul
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance primary.redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis tag=primary datacenter=yunlu_office resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6381]), 'tagged instance discovered');
is_tally(tally(6), {6381 => 6}, 'only the tagged instance');
ok(dns_queries(qr/query: primary\.redis\.service\.yunlu_office\.consul IN SRV/) >= 1, 'queried the tag name');
--- error_log eval
qr/consul upstream "redis": 1 peers? from primary\.redis\.service\.yunlu_office\.consul/
--- no_error_log
[error]
[warn]



=== TEST 2: service= alone: redis.service.consul (no datacenter)
--- dns
instance redis.service.consul 127.0.0.1:6382
--- backends: 6382
--- stream_config
upstream redis {
    consul_upstream service=redis resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6382]), 'discovered');
ok(dns_queries(qr/query: redis\.service\.consul IN SRV/) >= 1, 'queried redis.service.consul');
--- no_error_log
[error]
[warn]



=== TEST 3: service= datacenter= domain=: redis.service.yunlu_office.consul with domain=consul
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream service=redis datacenter=yunlu_office domain=consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
ok(dns_queries($SRVQ) >= 1, 'queried redis.service.yunlu_office.consul');
--- no_error_log
[error]
[warn]



=== TEST 4: fallback server before the first answer (DNS down), unused once discovery has peers
--- backends: 6380 6381 6382
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    server 127.0.0.1:6382;
}
--- check
is_tally(tally(4), {6382 => 4}, 'fallback serves before any answer');
dns_start(records => "instance $NAME 127.0.0.1:6380\ninstance $NAME 127.0.0.1:6381\n");
ok(wait_for_backends([6380, 6381], timeout => 5), 'discovered');
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'fallback no longer used');
--- no_error_log
[error]



=== TEST 5: fallback server when discovery has nothing (NXDOMAIN from the start)
--- dns
instance other.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381 6382
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    server 127.0.0.1:6382;
}
--- check
ok(wait_for_log(qr/consul upstream "redis": redis\.service\.yunlu_office\.consul has no healthy instances \(NXDOMAIN\)/, 4),
   'empty answer logged');
is_tally(tally(6), {6382 => 6}, 'fallback serves');
consul_register($NAME, '127.0.0.1:6380');
ok(wait_for_backends([6380], only => 1, timeout => 4), 'discovery takes over');
--- no_error_log
[error]



=== TEST 6: on_empty=fail: NXDOMAIN drops the set, connections fail
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s on_empty=fail;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
consul_deregister_all($NAME);
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": redis\.service\.yunlu_office\.consul has no healthy instances \(NXDOMAIN\), dropping 2 peers/, 4),
   'dropping logged');
is_tally(tally(3), {fail => 3}, 'connections fail');
consul_register($NAME, '127.0.0.1:6380');
ok(wait_for_backends([6380], timeout => 4), 'served again after a registration');
--- error_log
no live upstreams



=== TEST 7: on_empty=fail with a fallback server: fallback takes over
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6382
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s on_empty=fail;
    server 127.0.0.1:6382;
}
--- check
ok(wait_for_backends([6380], only => 1), 'discovered, fallback unused');
consul_deregister_all($NAME);
ok(wait_for_backends([6382], only => 1, timeout => 4), 'fallback after the drop');
--- no_error_log
[error]



=== TEST 8: on_error=fail: DNS down drops the set
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s on_error=fail;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
dns_stop();
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": resolving redis\.service\.yunlu_office\.consul failed: .+, dropping 2 peers/, 4),
   'dropping logged');
is_tally(tally(3), {fail => 3}, 'connections fail');
dns_restart();
ok(wait_for_backends([6380, 6381], timeout => 5), 'back after recovery');
--- error_log
no live upstreams



=== TEST 9: on_error=fail does not drop on NXDOMAIN (that is on_empty)
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s on_error=fail;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
consul_deregister_all($NAME);
ok(wait_for_log(qr/has no healthy instances \(NXDOMAIN\), keeping 1 peers?/, 4), 'kept');
is_tally(tally(4), {6380 => 4}, 'still served');
--- no_error_log
[error]



=== TEST 10: max_stale=3s: the kept set expires 3 s after the last answer
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s max_stale=3s;
}
--- check
# "for Ns": the time without an answer, 3 s or a little more (checked every interval)
my $STALE = qr/\[warn\] .*consul upstream "redis": no successful answer for [345]s \(max_stale\), dropping 2 peers/;
ok(wait_for_backends([6380, 6381]), 'both discovered');
# Successful, unchanged answers for twice max_stale: the clock counts from the
# last of them, not from when the set was first published.
sleep 6.5;
dns_stop();
my $t0 = time;
is_tally(tally(10, delay => 0.1), {6380 => 5, 6381 => 5}, 'kept at first');
ok(wait_for_log($STALE, 6), 'expiry logged');
my $dt = time - $t0;
ok($dt >= 2.0 && $dt <= 5.0, sprintf('after %.1f s (3 s +- an interval)', $dt));
is_tally(tally(3), {fail => 3}, 'then connections fail');
dns_restart();
ok(wait_for_backends([6380, 6381], timeout => 5), 'back after recovery');
--- error_log
no live upstreams



=== TEST 11: max_stale with NXDOMAIN answers: an empty answer is not a success
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s max_stale=3s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
consul_deregister_all($NAME);
ok(wait_for_log(qr/has no healthy instances \(NXDOMAIN\), keeping 1 peers?/, 4), 'kept at first');
ok(wait_for_log(qr/no successful answer for [345]s \(max_stale\), dropping 1 peers?/, 6), 'expired');
--- error_log
max_stale



=== TEST 12: three priority tiers
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 priority=1
instance redis.service.yunlu_office.consul 127.0.0.1:6381 priority=2
instance redis.service.yunlu_office.consul 127.0.0.1:6382 priority=3
--- backends: 6380 6381 6382
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    max_fails=1 fail_timeout=1s;
}
--- check
ok(wait_for_log(qr/consul upstream "redis": 3 peers from/), 'three peers');
is_tally(tally(6), {6380 => 6}, 'tier 1');
backend_stop(6380);
is_tally(tally(6), {6381 => 6}, 'tier 2');
backend_stop(6381);
is_tally(tally(6), {6382 => 6}, 'tier 3');
backend_start(6381);
ok(wait_for_backends([6381], only => 1, timeout => 5), 'tier 2 again');
backend_start(6380);
ok(wait_for_backends([6380], only => 1, timeout => 5), 'tier 1 again');
--- error_log
connect() failed (111: Connection refused) while connecting to upstream



=== TEST 13: first resolver dead (nothing listening): failover to the second
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- setup
$ENV{TEST_NGINX_DEAD_PORT} = dead_port();
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul
                    resolver=127.0.0.1:$TEST_NGINX_DEAD_PORT
                    resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s timeout=1s;
}
--- check
ok(wait_for_backends([6380, 6381], timeout => 5), 'discovered through the second resolver');
consul_deregister($NAME, '127.0.0.1:6381');
ok(wait_for_backends([6380], only => 1, timeout => 4), 'changes still seen');
--- no_error_log
[error]
resolving redis.service.yunlu_office.consul failed



=== TEST 14: IPv6 resolver [::1]:PORT
--- dns_config
listen-on-v6 port $TEST_NGINX_DNS_PORT { ::1; };
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=[::1]:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
SKIP: {
    skip 'BIND does not answer on [::1] (no IPv6 loopback)', 2
        unless `dig \@::1 -p $DnsPort +tcp +time=1 +tries=1 +short SOA consul 2>&1` =~ /hostmaster/;
    ok(wait_for_backends([6380], timeout => 5), 'discovered over IPv6');
    ok(scalar(grep { /client \S+ ::1#\d+ / } do { open my $f, '<', dns_querylog(); <$f> }),
       'BIND saw queries from ::1');
}



=== TEST 15: every resolver dead: failure logged once
--- setup
$ENV{TEST_NGINX_DEAD_PORT} = dead_port();
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul
                    resolver=127.0.0.1:$TEST_NGINX_DEAD_PORT
                    resolver=127.0.0.2:$TEST_NGINX_DEAD_PORT
                    interval=1s timeout=1s;
}
--- check
ok(wait_for_log(qr/resolving redis\.service\.yunlu_office\.consul failed: /, 4), 'failure logged');
sleep 2;
is(log_count(qr/resolving redis\.service\.yunlu_office\.consul failed: /), 1, 'once');



=== TEST 16: backoff: a failing name (REFUSED) is asked ever less often, up to 10 s apart
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
upstream refused {
    consul_upstream service=redis domain=notserved resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
like(`dig \@127.0.0.1 -p $DnsPort +tcp SRV redis.service.notserved.`, qr/status: REFUSED/, 'BIND refuses the name');
ok(wait_for_log(qr/consul upstream "refused": resolving redis\.service\.notserved failed: 127\.0\.0\.1:\d+ answered REFUSED, no peers to keep$/m, 4),
   'failure logged, with the response code');
sleep 16;
# When each query of the failing name came: gaps of about 1, 2, 4, then 8 s
# (then 10 s, the cap).
my @at;
open my $f, '<', dns_querylog() or die;
while (<$f>) {
    next unless /^\S+ (\d+):(\d+):([\d.]+) .*query: redis\.service\.notserved IN SRV/;
    push @at, $1 * 3600 + $2 * 60 + $3;
}
# (A gap near 0 is this test's own dig, asked beside nginx's first query.)
my @gaps = grep { $_ > 0.5 } map { $at[$_] - $at[$_ - 1] } 1 .. $#at;
diag sprintf 'gaps: %s', join ' ', map { sprintf '%.1f', $_ } @gaps;
ok(@gaps >= 4, scalar(@gaps) . ' gaps');
ok(!grep({ $gaps[$_] < 1.6 * $gaps[$_ - 1] } 1 .. 3), 'each gap about doubles the one before');
ok($gaps[3] >= 7 && $gaps[3] <= 9, sprintf('the fourth is about 8 s: %.1f s', $gaps[3]));
my $ok = dns_queries($SRVQ);
ok($ok >= 14, "the healthy name is asked every interval meanwhile: $ok queries");



=== TEST 17: restart with DNS down: the state file serves the last set
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- setup
unlink "$TmpDir/redis.state";
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s state=$TEST_NGINX_CONSUL_TMP/redis.state;
}
--- check
my $state = "$TmpDir/redis.state";
ok(wait_for_backends([6380, 6381]), 'both discovered');
ok(wait_until(sub { -s $state }, 3), 'state file written');
dns_stop();
ok(nginx_restart(), 'nginx restarted (not reloaded) with DNS down');
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'served from the state file');
ok(wait_for_log(qr/resolving redis\.service\.yunlu_office\.consul failed: .+, keeping 2 peers/, 4),
   'DNS failure keeps the loaded 2 peers');
--- no_error_log
[error]



=== TEST 18: state file follows changes
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- setup
unlink "$TmpDir/redis.state";
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s state=$TEST_NGINX_CONSUL_TMP/redis.state;
}
--- check
my $state = "$TmpDir/redis.state";
ok(wait_for_backends([6380]), 'discovered');
consul_register($NAME, '127.0.0.1:6381');
ok(wait_for_backends([6380, 6381], timeout => 4), 'change discovered');
sleep 0.5;
dns_stop();
ok(nginx_restart(), 'restarted with DNS down');
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'the state file has the newer set');
--- no_error_log
[error]



=== TEST 19: corrupt state file: logged and ignored, discovery works and replaces it
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- setup
open my $f, '>', "$TmpDir/corrupt.state" or die;
print $f "\x00\x01garbage{{{ not a state file\n127.0.0.1:99999 weight=x\n";
close $f;
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s state=$TEST_NGINX_CONSUL_TMP/corrupt.state;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
ok(wait_until(sub { open my $f, '<', "$TmpDir/corrupt.state" or return 0; local $/; <$f> =~ /^\{"format":"ngx-consul-state"/ }, 3),
   'the corrupt file is replaced by a good one');
--- error_log eval
qr/\[error\] \d+#\d+: consul upstream "redis": state file "[^"]*\/corrupt\.state" ignored: not valid JSON \(.+\)$/m
--- no_error_log
from state file



=== TEST 20: corrupt state file and DNS down: starts, no peers, no crash
--- backends: 6380
--- setup
open my $f, '>', "$TmpDir/corrupt2.state" or die;
print $f "\xff" x 300;
close $f;
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s state=$TEST_NGINX_CONSUL_TMP/corrupt2.state;
}
--- check
ok(wait_for_log(qr/resolving redis\.service\.yunlu_office\.consul failed: /, 4), 'DNS failure logged');
is_tally(tally(3), {fail => 3}, 'no peers');
ok(scalar(grep { /corrupt2\.state/ } split /\n/, error_log_text()), 'the corrupt file is named in the log');
--- error_log
no live upstreams
