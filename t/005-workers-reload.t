# Several workers (master_process on): only worker 0 queries DNS, every worker
# balances over the shared set; a reload keeps the set, even with DNS down.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';
our $SRVQ = qr/query: redis\.service\.yunlu_office\.consul IN SRV/;

# pids of the processes that proxied to a backend, from the info-level log
sub proxy_pids {
    my %pids;
    for (split /\n/, error_log_text()) {
        $pids{$1}++ if /\[info\] (\d+)#\d+: \*\d+ proxy \S+ connected to 127\.0\.0\.1:638\d/;
    }
    return \%pids;
}

run_tests();

__DATA__

=== TEST 1: two workers: one process queries (about seconds / interval queries)
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
is(scalar(nginx_worker_pids()), 2, 'two workers');
ok(wait_for_backends([6380, 6381]), 'both discovered');
my $q0 = dns_queries($SRVQ);
sleep 5;
my $q = dns_queries($SRVQ) - $q0;
ok($q >= 3 && $q <= 7, "$q SRV queries in 5 s with interval=1s (one process: ~5, two: ~10)");
is(log_count(qr/consul upstream "redis": 2 peers from/), 1, 'the set is logged once');
# Lookups run on worker 0's event loop: no worker gets a second thread.
for my $pid (nginx_worker_pids()) {
    opendir(my $dh, "/proc/$pid/task") or die "/proc/$pid/task: $!";
    my $threads = grep { /^\d+$/ } readdir $dh;
    is($threads, 1, "worker $pid runs one thread");
}
--- no_error_log
[error]
[warn]



=== TEST 2: interval=2s with two workers: ~half the queries
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=2s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
my $q0 = dns_queries($SRVQ);
sleep 6;
my $q = dns_queries($SRVQ) - $q0;
ok($q >= 2 && $q <= 4, "$q SRV queries in 6 s with interval=2s (~3)");
--- no_error_log
[error]
[warn]



=== TEST 3: every worker balances over the discovered set, each exactly by weight
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 weight=3
instance redis.service.yunlu_office.consul 127.0.0.1:6381 weight=1
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
my $mark = log_mark();
my $t = tally(80);
ok(!$t->{fail}, 'no connection failed: ' . tally_str($t));
my $per_worker = worker_tally($mark);
my %workers = map { $_ => 1 } nginx_worker_pids();
is(scalar(grep { $workers{$_} } keys %$per_worker), 2, 'both workers proxied to discovered peers')
    or diag Test::More::explain($per_worker);
split_is_exact($per_worker, {6380 => 3, 6381 => 1}, 'each worker splits 3:1 exactly');
--- no_error_log
[error]
[warn]



=== TEST 4: workers killed and respawned with DNS down: the set survives, one process resolves
--- workers: 2
--- allow_alert
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
dns_stop();
my @old = nginx_worker_pids();
kill 'KILL', @old;
ok(wait_until(sub { my @w = nginx_worker_pids(); @w == 2 && !grep { my $p = $_; grep { $_ == $p } @old } @w }, 5),
   'master respawned both workers');
is_tally(tally(10), {6380 => 10}, 'the set survived in shared memory (DNS down: no lookup rebuilt it)');
dns_start(records => "instance $NAME 127.0.0.1:6380\ninstance $NAME 127.0.0.1:6381\n");
ok(wait_for_backends([6380, 6381], timeout => 6), 'changes are discovered again');
my $q0 = dns_queries($SRVQ);
sleep 4;
my $q = dns_queries($SRVQ) - $q0;
ok($q >= 2 && $q <= 5, "$q SRV queries in 4 s: still one querying process (two: ~8)");
is(log_count(qr/\[alert\]/), 2, 'no alert but the two deaths');
--- error_log
exited on signal 9



=== TEST 5: reload with DNS stopped before it: the set is kept, no connection fails
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
dns_stop();
ok(wait_for_log(qr/resolving redis\.service\.yunlu_office\.consul failed: .+, keeping 2 peers/, 4),
   'DNS failure noticed before the reload');
my $bg = tally_background(delay => 0.01);
sleep 0.5;
ok(nginx_reload(), 'reloaded');
sleep 2.5;
my $t = $bg->();
ok(!$t->{fail}, 'no connection failed during and after the reload: ' . tally_str($t));
ok($t->{6380} && $t->{6381}, 'both used: ' . tally_str($t));
$t = tally(20);
ok(!$t->{fail} && $t->{6380} && $t->{6381}, 'after the reload: ' . tally_str($t));
--- no_error_log
[error]



=== TEST 6: reload, then a change in Consul is discovered by the new workers
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
ok(nginx_reload(), 'reloaded');
is_tally(tally(4), {6380 => 4}, 'set kept');
consul_register($NAME, '127.0.0.1:6381');
ok(wait_for_backends([6380, 6381], timeout => 4), 'new instance used after the reload');
my $q0 = dns_queries($SRVQ);
sleep 4;
my $q = dns_queries($SRVQ) - $q0;
ok($q >= 2 && $q <= 5, "$q SRV queries in 4 s: one querying process after the reload (two: ~8)");
--- no_error_log
[error]
[warn]



=== TEST 7: two reloads in a row with DNS down
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
dns_stop();
my $bg = tally_background(delay => 0.01);
ok(nginx_reload(), 'first reload');
ok(nginx_reload(), 'second reload');
sleep 1.5;
my $t = $bg->();
ok(!$t->{fail} && $t->{6380} && $t->{6381}, 'no connection failed: ' . tally_str($t));
--- no_error_log
[error]



=== TEST 8: single process (master_process off) queries too
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
my $q0 = dns_queries($SRVQ);
sleep 3;
my $q = dns_queries($SRVQ) - $q0;
ok($q >= 1 && $q <= 4, "$q SRV queries in 3 s");
--- no_error_log
[error]
[warn]



=== TEST 9: quit while worker 0's lookup hangs on a black hole: nginx exits at once
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- setup
# A resolver that accepts TCP connections and never answers.
$main::HOLE = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 64,
                                    Proto => 'tcp', ReuseAddr => 1) or die "hole: $!";
$ENV{TEST_NGINX_HOLE_PORT} = $main::HOLE->sockport;
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul
                    resolver=127.0.0.1:$TEST_NGINX_HOLE_PORT
                    resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s timeout=30s;
}
--- check
# The first lookup would spend 30 s on the black hole before the second resolver:
# a quit that waited for it would take that long.
sleep 1;
my $t0 = time;
ok(nginx_stop(5), 'nginx quit');
my $took = time - $t0;
ok($took < 10, sprintf('quit took %.2f s with a lookup in flight (timeout=30s)', $took));
close $main::HOLE;
ok(nginx_restart(), 'started again for the harness');
--- no_error_log
[alert]
[emerg]
