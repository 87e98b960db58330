# The DNS server goes away, or stops knowing the service: the last good set
# is kept (on_empty=keep, on_error=keep by default), warnings are logged once
# per streak, recovery is logged.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';
our $FAILED = qr/\[warn\] .*consul upstream "redis": resolving redis\.service\.yunlu_office\.consul failed: .+, keeping 2 peers/;

run_tests();

__DATA__

=== TEST 1: DNS server stopped: traffic keeps flowing, one warning, recovery logged
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s timeout=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
dns_stop();
my $t = tally(40, delay => 0.1);    # ~4 s, several intervals
is_tally($t, {6380 => 20, 6381 => 20}, 'both still used, no connection failed');
ok(wait_for_log($FAILED, 3), 'failure warned');
sleep 1.5;
is(log_count($FAILED), 1, 'exactly one warning over the streak');
dns_restart();
ok(wait_for_log(qr/\[notice\] .*consul upstream "redis": resolver recovered after \d+ failed attempts/, 4),
   'recovery logged');
my ($n) = error_log_text() =~ /resolver recovered after (\d+) failed attempts/;
ok($n >= 3, "recovered after $n failed attempts (>= 3 in ~5 s)");
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'both after recovery');
--- no_error_log
[error]



=== TEST 2: a second failure streak warns again (once)
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
ok(wait_for_log($FAILED, 4), 'first streak warned');
dns_restart();
ok(wait_for_log(qr/resolver recovered after/, 4), 'recovered');
dns_stop();
ok(wait_for_log($FAILED, 4, 2), 'second streak warned');
sleep 2;
is(log_count($FAILED), 2, 'two streaks, two warnings');
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'set kept');
--- no_error_log
[error]



=== TEST 3: all instances deregistered (NXDOMAIN): last set kept, one warning
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
my $EMPTY = qr/\[warn\] .*consul upstream "redis": redis\.service\.yunlu_office\.consul has no healthy instances \(NXDOMAIN\), keeping 2 peers/;
ok(wait_for_backends([6380, 6381]), 'both discovered');
consul_deregister_all($NAME);
like(`dig \@127.0.0.1 -p $DnsPort +tcp SRV $NAME.`, qr/status: NXDOMAIN/, 'BIND says NXDOMAIN');
ok(wait_for_log($EMPTY, 3), 'warned');
is_tally(tally(30, delay => 0.1), {6380 => 15, 6381 => 15}, 'both still used over 3 s');
is(log_count($EMPTY), 1, 'exactly one warning');
consul_register($NAME, '127.0.0.1:6381');
ok(wait_until(sub { my $t = tally(4); !$t->{6380} && $t->{6381} }, 4),
   'a new registration replaces the kept set');
--- no_error_log
[error]



=== TEST 4: name without SRV records (NOERROR, no records): kept, "(no records)"
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
instance primary.redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
my $EMPTY = qr/\[warn\] .*consul upstream "redis": redis\.service\.yunlu_office\.consul has no healthy instances \(no records\), keeping 2 peers/;
ok(wait_for_backends([6380, 6381]), 'both discovered');
consul_deregister_all($NAME);
like(`dig \@127.0.0.1 -p $DnsPort +tcp SRV $NAME.`, qr/status: NOERROR.*ANSWER: 0/s, 'BIND says NOERROR, no answer');
ok(wait_for_log($EMPTY, 3), 'warned');
sleep 2;
is(log_count($EMPTY), 1, 'exactly one warning');
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'both still used');
--- no_error_log
[error]



=== TEST 5: no DNS at all from the start: no peers, connections fail fast, nginx fine
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": resolving redis\.service\.yunlu_office\.consul failed: .*, no peers to keep$/m, 4),
   'failure logged, saying that the line has no peers');
my $t0 = time;
is_tally(tally(3), {fail => 3}, 'connections fail');
ok(time - $t0 < 2, 'and fail fast');
--- error_log
no live upstreams



=== TEST 6: the DNS server comes up after nginx: instances picked up
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- backends: 6380 6381
--- check
ok(wait_for_log(qr/resolving redis\.service\.yunlu_office\.consul failed: /, 4), 'failure logged');
dns_start(records => "instance $NAME 127.0.0.1:6380\ninstance $NAME 127.0.0.1:6381\n");
ok(wait_for_backends([6380, 6381], timeout => 5), 'both discovered once DNS is up');
ok(wait_for_log(qr/resolver recovered after \d+ failed attempts/, 2), 'recovery logged');



=== TEST 7: the event loop is not blocked while a resolver hangs (black hole first)
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
                    interval=1s timeout=2s;
}
--- check
ok(wait_for_backends([6380], timeout => 10), 'discovered through the second resolver');
# Every lookup now spends ~2 s on the black hole: connections must not wait.
my @lat;
for (1 .. 40) {
    my $t0 = time;
    my ($ap) = probe_backend();
    push @lat, time - $t0 if defined $ap;
    sleep 0.05;
}
is(scalar @lat, 40, 'all 40 connections answered');
my ($max) = sort { $b <=> $a } @lat;
ok($max < 0.5, sprintf('slowest connection %.3f s (< 0.5 s)', $max));
close $main::HOLE;
