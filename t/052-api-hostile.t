# api= lines against a hostile or failing agent (the Consul API double's modes):
# truncated and malformed JSON, wrong types, a body over the cap, a slow drip, a
# connection closed mid-body, bad chunked framing, gzip, 500 "No cluster leader",
# an agent that never answers, an agent that is down, an agent that closes its
# idle connections — never a crash or a hang: the set is kept as on_error says,
# each streak is said once with its reason, recovery is said; max_stale drops a
# kept set on time even while a blocking query waits.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::Api;
use Time::HiRes qw(time sleep);

our $API = "http://127.0.0.1:$ENV{TEST_NGINX_API_PORT}";
our $Q = "$API/v1/health/service/redis";

# One hostile behaviour: switch the mode, wake the blocked query (a change),
# expect REASON in one warning; the set {6380, 6381} serves meanwhile; then the
# agent behaves again and a change is followed.
my $round = 0;
sub hostile {
    my ($mode, $reason, %o) = @_;
    $round++;
    my $mark = log_mark();
    api_mode($mode, %o);
    api_register('redis', "127.0.0.1:" . (20000 + $round));   # wakes the blocked query
    my $ok = wait_until(sub {
        error_log_since($mark) =~ /\[warn\] .*consul upstream "redis": resolving \Q$Q\E failed: $reason, keeping 2 peers/
    }, $o{timeout} // 10);
    ok($ok, "$mode: warned ($reason)") or diag error_log_since($mark);
    is_tally(tally(6), {6380 => 3, 6381 => 3}, "$mode: the set is kept");
    api_deregister('redis', "127.0.0.1:" . (20000 + $round));
    api_mode('ok');
    ok(wait_until(sub { error_log_since($mark) =~ /consul upstream "redis": agent recovered after \d+ failed attempts/ }, 15),
       "$mode: recovery said");
    my $warns = () = error_log_since($mark) =~ /\[warn\]/g;
    is($warns, 1, "$mode: one warning for the streak");
}

run_tests();

__DATA__

=== TEST 1: every hostile answer: the set is kept, one warning each, recovery
--- consul_api
instance redis 127.0.0.1:6380
instance redis 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT timeout=1s interval=200ms;
}
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
my $a = qr/127\.0\.0\.1:\d+/;
hostile('no_leader', qr/$a answered 500: No cluster leader/);
hostile('malformed', qr/$a: malformed answer \(EOF while parsing [^)]+\)/);
hostile('wrong_types', qr/$a: malformed answer \(invalid type: string "6380", expected i64 at line 1 column \d+\)/);
hostile('object', qr/$a: malformed answer \(invalid type: map, expected a sequence at line 1 column \d+\)/);
hostile('truncated', qr/$a closed the connection in the middle of the answer/);
hostile('close_mid_body', qr/$a closed the connection in the middle of the answer/);
hostile('bad_chunk', qr/$a: malformed chunk size/);
hostile('gzip', qr/$a: unsupported Content-Encoding "gzip"/);
hostile('close', qr/$a closed the connection without answering/);
hostile('huge', qr/$a: answer larger than \d+ KiB/, bytes => 40 << 20, timeout => 20);
hostile('huge_length', qr/$a: answer larger than \d+ KiB/, bytes => 1 << 40);
hostile('drip', qr/$a did not finish its answer within 1s/, delay => 0.05);
hostile('permission_denied', qr/ACL: $a answered 403: Permission denied/);
--- no_error_log
[error]



=== TEST 2: HTTP/1.0 without a length, chunked bodies, an agent that closes idle connections: all fine, nothing said
--- consul_api
instance redis 127.0.0.1:6380
instance redis 127.0.0.1:20000-20039
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
--- check
ok(wait_for_log(qr/consul upstream "redis": 41 peers from/, 10), 'a chunked answer of 41 instances');
api_mode('http10');
api_register('redis', '127.0.0.1:6381');
ok(wait_for_log(qr/consul upstream "redis": 42 peers from/, 5), 'an HTTP/1.0 answer, read to the end of the connection');
api_mode('drop_keepalive');
api_clear_requests();
for my $i (1 .. 3) {
    api_deregister('redis', "127.0.0.1:" . (20000 + $i));
    ok(wait_for_log(qr/consul upstream "redis": @{[42 - $i]} peers from/, 5), "change $i followed");
}
my %conns;
wait_until(sub { %conns = map { $_->{conn} => 1 } @{ health_requests('redis') }; keys(%conns) >= 3 }, 5);
ok(keys(%conns) >= 3, scalar(keys %conns) . ' connections after 3 changes: each closed one replaced, and nothing said');
--- no_error_log
[error]
[warn]



=== TEST 3: an agent that never answers: the request times out after wait + wait/16 + timeout
--- consul_api
instance redis 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT wait=2s timeout=1s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
api_mode('silent');
my $t0 = time;
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": resolving \Q$Q\E failed: 127\.0\.0\.1:\d+ did not answer within \d+m?s, keeping 1 peer/, 10),
   'silence is a failure');
my $dt = time - $t0;
my ($n, $unit) = error_log_text() =~ /did not answer within (\d+)(m?s)/;
my $ms = $unit eq 's' ? 1000 * $n : $n;
ok($ms >= 1875 + 117 + 1000 && $ms <= 2000 + 125 + 1000, "the request's time: $ms ms (wait less its jitter, + wait/16 + timeout)");
ok($dt < 8, sprintf('said after %.1f s', $dt));
is_tally(tally(4), {6380 => 4}, 'the set serves');
--- no_error_log
[error]



=== TEST 4: max_stale drops a kept set on time, though a blocking request still waits
--- consul_api
instance redis 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT max_stale=3s timeout=30s;
    server 127.0.0.1:6381;
}
--- check
ok(wait_for_backends([6380], only => 1), 'discovered');
ok(wait_until(sub { grep { $_->{index} > 0 } @{ health_requests('redis') } }, 5), 'blocking');
my ($w) = health_requests('redis')->[-1]{wait} =~ /^(\d+)ms$/;
ok($w <= 1500, "wait=${w}ms: at most half of max_stale, so that an unchanged service confirms its set in time");
api_mode('silent');
my $t0 = time;
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": no successful answer for [34]s \(max_stale\), dropping 1 peer/, 10),
   'dropped by max_stale');
my $dt = time - $t0;
ok($dt < 6, sprintf('%.1f s after the agent fell silent (its request would wait 30 s)', $dt));
ok(wait_for_backends([6381], only => 1, first_set => 0), 'the static server serves');



=== TEST 5: the agent is down, then back: connection refused is said once, backoff, recovery
--- consul_api
instance redis 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT interval=500ms;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
api_stop();
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": resolving \Q$Q\E failed: (cannot connect to 127\.0\.0\.1:\d+ \(Connection refused\)|127\.0\.0\.1:\d+: Connection reset by peer), keeping 1 peer/, 5),
   'the agent is gone (its connection reset, then refused)');
sleep 4;
is_tally(tally(4), {6380 => 4}, 'the set serves');
api_start(init => "instance redis 127.0.0.1:6380\n");
ok(wait_for_log(qr/\[notice\] .*consul upstream "redis": agent recovered after (\d+) failed attempts/, 12), 'recovered');
my ($n) = error_log_text() =~ /agent recovered after (\d+) failed attempts/;
ok($n >= 2 && $n <= 8, "$n attempts in about 4 s: backoff from interval, doubling");
is(log_count(qr/resolving .* failed/), 1, 'one warning for the outage');
--- no_error_log
[error]



=== TEST 6: a backoff while the agent answers 500: at most one request per backoff step
--- consul_api
instance redis 127.0.0.1:6380
mode no_leader
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT interval=1s;
}
--- check
ok(wait_for_log(qr/resolving \Q$Q\E failed: 127\.0\.0\.1:\d+ answered 500: No cluster leader/, 5), 'no leader');
sleep 8;
my $n = @{ health_requests('redis') };
ok($n >= 3 && $n <= 6, "$n requests in 8 s (1, 2, 4 s apart...)");
