# SRV weight 0 (issue 16, item 2). Consul answers weight 0 for an instance in
# warning when the operator set `Weights.Warning = 0`: "no share while others can
# take it" (RFC 2782: only the smallest chance beside weighted records). A
# weight-0 peer takes a connection only when no weighted peer of its priority
# tier can (down, tried, at max_conns), whatever the balancing method; weight-0
# peers share among themselves evenly; the status page shows weight 0.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);
use IO::Select ();
use JSON::PP ();

our $NAME = 'redis.service.yunlu_office.consul';

# Priority 1: 6380 weight 0, 6381 weight 1; priority 2: 6382.
our $ZERO = "instance $NAME 127.0.0.1:6380 weight=0\n"
    . "instance $NAME 127.0.0.1:6381 weight=1\n"
    . "instance $NAME 127.0.0.1:6382 priority=2\n";

sub zero_block {
    my ($method) = @_;
    return <<"_EOB_";
upstream redis {
    $method
    consul_upstream $NAME resolver=127.0.0.1:\$TEST_NGINX_DNS_PORT interval=1s fail_timeout=2s;
}
_EOB_
}

# The same walk for every method; connections come from 127.0.0.7 (one
# $remote_addr key) and from changing ports ($remote_port keys).
our $ZERO_CHECK = <<'_EOC_';
ok(wait_for_log(qr/3 peers from/, 5), 'three peers discovered');
is_tally(tally(20), {6381 => 20}, 'the weighted peer takes every connection while it can');
is_tally(tally(10, local_addr => '127.0.0.7'), {6381 => 10}, 'one client address: the same');
backend_stop(6381);
is_tally(tally(12), {6380 => 12},
         'the weighted peer down: the weight-0 peer of its tier serves, not priority 2');
backend_stop(6380);
is_tally(tally(6), {6382 => 6}, 'the whole tier down: priority 2');
backend_start(6380);
backend_start(6381);
sleep 2.2;
ok(wait_for_backends([6381], only => 1, timeout => 6), 'back to the weighted peer only');
_EOC_

# GET PATH on the http port: the body ('' on failure).
sub http_body {
    my ($path) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $Test::Nginx::Util::ServerPort,
                                  Proto => 'tcp', Timeout => 3) or return '';
    print $s "GET $path HTTP/1.0\r\nHost: localhost\r\n\r\n";
    my ($resp, $sel) = ('', IO::Select->new($s));
    while ($sel->can_read(3)) {
        sysread($s, $resp, 65536, length $resp) or last;
    }
    close $s;
    return $resp =~ /\r\n\r\n(.*)\z/s ? $1 : '';
}

run_tests();

__DATA__

=== TEST 1: round robin: weight 0 beside weight 1 takes nothing while the weighted peer serves; the status shows weight 0
--- workers: 2
--- stream_listen_options: reuseport
--- dns eval
$::ZERO
--- backends: 6380 6381 6382
--- stream_config eval
main::zero_block('')
--- config
location = /status { consul_upstream_status; }
location = /metrics { consul_upstream_status prometheus; }
--- check eval
$::ZERO_CHECK . <<'_EOC_';
my $doc = JSON::PP->new->decode(main::http_body('/status'));
my %w = map { $_->{address} => $_->{weight} } @{ $doc->{upstreams}[0]{peers} };
is_deeply(\%w, {'127.0.0.1:6380' => 0, '127.0.0.1:6381' => 1, '127.0.0.1:6382' => 1},
          'JSON: weight 0 as Consul sent it') or diag Test::More::explain(\%w);
like(main::http_body('/metrics'),
     qr/^nginx_consul_peer_weight\{upstream="redis",protocol="stream",peer="127\.0\.0\.1:6380"\} 0$/m,
     'Prometheus: weight 0');
_EOC_
--- error_log
connect() failed (111: Connection refused)



=== TEST 2: least_conn: weight 0 only when no weighted peer of the tier can
--- workers: 2
--- stream_listen_options: reuseport
--- dns eval
$::ZERO
--- backends: 6380 6381 6382
--- stream_config eval
main::zero_block('least_conn;')
--- check eval
$::ZERO_CHECK
--- error_log
connect() failed (111: Connection refused)



=== TEST 3: hash $remote_port: weight 0 only when no weighted peer of the tier can
--- workers: 2
--- stream_listen_options: reuseport
--- dns eval
$::ZERO
--- backends: 6380 6381 6382
--- stream_config eval
main::zero_block('hash $remote_port;')
--- check eval
$::ZERO_CHECK
--- error_log
connect() failed (111: Connection refused)



=== TEST 4: hash $remote_addr consistent: weight 0 only when no weighted peer of the tier can
--- workers: 2
--- stream_listen_options: reuseport
--- dns eval
$::ZERO
--- backends: 6380 6381 6382
--- stream_config eval
main::zero_block('hash $remote_addr consistent;')
--- check eval
$::ZERO_CHECK
--- error_log
connect() failed (111: Connection refused)



=== TEST 5: random: weight 0 only when no weighted peer of the tier can
--- workers: 2
--- stream_listen_options: reuseport
--- dns eval
$::ZERO
--- backends: 6380 6381 6382
--- stream_config eval
main::zero_block('random;')
--- check eval
$::ZERO_CHECK
--- error_log
connect() failed (111: Connection refused)



=== TEST 6: random two least_conn: weight 0 only when no weighted peer of the tier can
--- workers: 2
--- stream_listen_options: reuseport
--- dns eval
$::ZERO
--- backends: 6380 6381 6382
--- stream_config eval
main::zero_block('random two least_conn;')
--- check eval
$::ZERO_CHECK
--- error_log
connect() failed (111: Connection refused)



=== TEST 7: weight-0 peers share evenly among themselves; all of them weight 0 is an even spread
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 weight=0
instance redis.service.yunlu_office.consul 127.0.0.1:6381 weight=0
instance redis.service.yunlu_office.consul 127.0.0.1:6382 weight=5
--- backends: 6380 6381 6382
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s fail_timeout=30s;
}
--- check
ok(wait_for_log(qr/3 peers from/, 5), 'three peers discovered');
is_tally(tally(10), {6382 => 10}, 'the weighted peer while it can');
backend_stop(6382);
is_tally(tally(1), {6380 => 1}, 'the weighted peer down: a weight-0 peer');
is_tally(tally(20), {6380 => 10, 6381 => 10}, 'the two weight-0 peers, evenly');
consul_deregister($::NAME, '127.0.0.1:6382');
ok(wait_for_log(qr/2 peers from/, 5), 'the weighted instance deregistered');
is_tally(tally(20), {6380 => 10, 6381 => 10}, 'every instance weight 0 (all in warning): as weight 1');
backend_start(6382);
--- error_log
connect() failed (111: Connection refused)



=== TEST 8: an instance going to warning (weight 1 -> 0) stops taking connections at the next answer
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=200ms;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both serve');
# One update: the SRV record's weight changes, as Consul's answer does.
my $weight = sub {
    my ($from, $to) = @_;
    nsupdate("update delete $::NAME. SRV 1 $from 6380 7f000001.addr.yunlu_office.consul.",
             "update add $::NAME. 0 SRV 1 $to 6380 7f000001.addr.yunlu_office.consul.");
};
$weight->(1, 0);
ok(wait_for_log(qr/2 peers from .* \(generation 2\)/, 5), 'the weight change is a new set');
is_tally(tally(20), {6381 => 20}, 'the instance in warning takes nothing');
$weight->(0, 1);
ok(wait_for_log(qr/2 peers from .* \(generation 3\)/, 5), 'passing again');
ok(wait_for_backends([6380, 6381]), 'it serves again');
--- no_error_log
[error]
