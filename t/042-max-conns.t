# max_conns= (issue 16, item 7): open connections per discovered peer, counted
# by all workers together in the upstream's zone. A full peer is passed over
# (weight-0 peers and further tiers, then the static servers, take the
# connection); when no peer can, the connection fails with nginx's "no live
# upstreams". nginx-tests' stream_upstream_max_conns.t expectations are in
# 040-nginx-parity.t.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);
use IO::Select ();
use JSON::PP ();

our $NAME = 'redis.service.yunlu_office.consul';

# hold(N, port => P): N connections through nginx, open at the same time:
# ([backend port, or undef when nginx closed it], [sockets]).
sub hold {
    my ($n, %o) = @_;
    my (@ports, @socks);
    for (1 .. $n) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $o{port} // stream_port(),
                                      Proto => 'tcp', Timeout => 3)
            or die "hold: connect: $!\n";
        syswrite $s, "CLIENT INFO\r\n";
        my ($buf, $sel) = ('', IO::Select->new($s));
        while ($buf !~ /laddr=\S+:\d+ .*\r\n/s) {
            last unless $sel->can_read(3);
            sysread($s, $buf, 8192, length $buf) or last;
        }
        my ($port) = $buf =~ /\bladdr=\[?[0-9a-fA-F:.]+?\]?:(\d+)\s/;
        push @ports, $port;
        push @socks, $s;
    }
    return (\@ports, \@socks);
}

sub shown { join ' ', map { $_ // '-' } @{ $_[0] } }

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

=== TEST 1: max_conns= takes a number
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul max_conns=many;   # emerg: invalid parameter "max_conns=many"
}



=== TEST 2: max_conns= is not negative
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul max_conns=-1;   # emerg: invalid parameter "max_conns=-1"
}



=== TEST 3: max_conns= is upstream-wide: on the first line only
--- stream_config
upstream redis {
    consul_upstream redis.service.dc1.consul max_conns=2;
    consul_upstream redis.service.dc2.consul max_conns=2;   # emerg: invalid parameter "max_conns=2": it belongs on the first "consul_upstream" line of the upstream
}



=== TEST 4: all workers count together
Each worker alone would let 6 connections through to each peer.
--- workers: 2
--- stream_listen_options: reuseport
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=3;
}
--- check
ok(wait_for_log(qr/2 peers from/, 5), 'discovered');
my $mark = log_mark();
my ($p, $s) = main::hold(12);
my %n;
$n{ $_ // 'fail' }++ for @$p;
is_deeply(\%n, {6380 => 3, 6381 => 3, fail => 6}, 'three per peer in all') or diag main::shown($p);
my %pids = map { $_ => 1 } error_log_since($mark)
    =~ /\[(?:info|error)\] (\d+)#\d+: \*\d+ (?:proxy \S+ connected to|no live upstreams)/g;
is(scalar(keys %pids), 2, 'both workers took connections');
close $_ for @$s;
sleep 0.5;
($p, $s) = main::hold(2);
is(join(' ', sort map { $_ // '-' } @$p), '6380 6381', 'closed connections free their places in every worker');
close $_ for @$s;
--- error_log
no live upstreams while connecting to upstream



=== TEST 5: a full weighted peer leaves the connection to its tier's weight-0 peer, then to the next tier
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381 weight=0
instance redis.service.yunlu_office.consul 127.0.0.1:6382 priority=2
--- backends: 6380 6381 6382
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=1;
}
--- check
ok(wait_for_log(qr/3 peers from/, 5), 'discovered');
my ($p, $s) = main::hold(4);
is(main::shown($p), '6380 6381 6382 -', 'weighted, weight 0, priority 2, then none');
close $_ for @$s;
--- error_log
no live upstreams while connecting to upstream



=== TEST 6: the status page shows the limit
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=2;
}
upstream plain {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- config
location = /status { consul_upstream_status; }
location = /metrics { consul_upstream_status prometheus; }
--- check
ok(wait_for_log(qr/"redis": 1 peer from/, 5), 'discovered');
my ($p, $s) = main::hold(3);
is(main::shown($p), '6380 6380 -', 'two, then none');
my $doc = JSON::PP->new->decode(main::http_body('/status'));
my %u = map { $_->{name} => $_ } @{ $doc->{upstreams} };
is($u{redis}{max_conns}, 2, 'JSON: max_conns');
is($u{redis}{peers}[0]{active}, 2, 'JSON: the peer is at its limit');
ok(exists $u{plain}{max_conns} && !defined $u{plain}{max_conns}, 'JSON: null without a limit');
my $m = main::http_body('/metrics');
like($m, qr/^nginx_consul_upstream_max_conns\{upstream="redis",protocol="stream"\} 2$/m, 'Prometheus: the limit');
unlike($m, qr/^nginx_consul_upstream_max_conns\{upstream="plain"[,}]/m, 'Prometheus: absent without one');
close $_ for @$s;
--- error_log
no live upstreams while connecting to upstream



=== TEST 7: a reload changes the limit; connections the old workers still carry count
--- workers: 1
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=1;
}
--- check
ok(wait_for_log(qr/1 peer from/, 5), 'discovered');
my ($p, $s) = main::hold(2);
is(main::shown($p), '6380 -', 'max_conns=1');
stream_config_set(<<'_EOC_');
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=2;
}
_EOC_
my %old = map { $_ => 1 } nginx_worker_pids();
kill 'HUP', nginx_pid();
ok(wait_until(sub { grep { !$old{$_} } nginx_worker_pids() }, 10), 'a new worker');
sleep 0.5;
my ($p2, $s2) = main::hold(2);
is(main::shown($p2), '6380 -', 'max_conns=2, one of them held by the old worker');
close $_ for @$s, @$s2;
ok(wait_until(sub { !grep { $old{$_} } nginx_worker_pids() }, 10), 'the old worker is gone');
my ($p3, $s3) = main::hold(3);
is(main::shown($p3), '6380 6380 -', 'two');
close $_ for @$s3;
--- error_log
no live upstreams while connecting to upstream
