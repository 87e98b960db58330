# nginx's own expectations as a yardstick (issue 16, Tests): what nginx-tests'
# stream_upstream.t, stream_upstream_hash.t, stream_upstream_least_conn.t,
# stream_upstream_random.t and stream_upstream_max_conns.t expect of static
# `server` lines, held here by peers from `consul_upstream` (these tests are
# written from those expectations, not copied). Where the module departs on
# purpose, the block says so:
# - `max_conns=` is upstream-wide (one limit for every discovered peer, as
#   nginx copies a `server ... resolve max_conns=` line's limit onto every peer
#   it resolves); nginx-tests' per-server limits are played with a limited
#   discovered peer beside static `server` lines, which serve when no
#   discovered peer can;
# - a peer found twice is one peer (peers are addresses), so nginx-tests'
#   "equal peers aggregate max_conns" has no counterpart;
# - `hash` maps keys with its own hash function, not nginx's CRC32: which peer
#   a key lands on differs from nginx (the same in every worker and restart);
# - `down` servers have no counterpart: Consul leaves critical instances out.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);
use IO::Select ();

our $NAME = 'redis.service.yunlu_office.consul';

# hold(N, local_addr => A): N connections through nginx, open at the same
# time. Returns [backend port or undef when nginx closed the connection (no
# peer could take it)], and the sockets (close them with close_all).
sub hold {
    my ($n, %o) = @_;
    my (@ports, @socks);
    for (1 .. $n) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $o{port} // stream_port(),
                                      Proto => 'tcp', Timeout => 3,
                                      ($o{local_addr} ? (LocalAddr => $o{local_addr}) : ()))
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

sub close_all { close $_ for @{ $_[0] } }

# {port => count, fail => count} of hold()'s ports.
sub counts {
    my %n;
    $n{ $_ // 'fail' }++ for @{ $_[0] };
    return \%n;
}

run_tests();

__DATA__

=== TEST 1: stream_upstream.t "balanced", "weight": 15:15 over two instances, 10:20 for weights 1 and 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
instance weighted.service.yunlu_office.consul 127.0.0.1:6380 weight=1
instance weighted.service.yunlu_office.consul 127.0.0.1:6381 weight=2
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream weighted {
    consul_upstream weighted.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass weighted;
}
--- check
ok(wait_for_log(qr/"weighted": 2 peers from/, 5) && wait_for_log(qr/"redis": 2 peers from/, 5), 'discovered');
is_tally(tally(30), {6380 => 15, 6381 => 15}, 'balanced');
is_tally(tally(30, port => 1990), {6380 => 10, 6381 => 20}, 'weight');
--- no_error_log
[error]



=== TEST 2: stream_upstream.t "failures", "backup", "recovery", "per-upstream variables"
A dead instance is passed over; a dead priority-1 instance leaves everything to
priority 2 (nginx's backup server); once it answers again and fail_timeout has
passed, connections held at once all go to it (20 here: Test::Nginx's
worker_connections is 64); $upstream_addr lists every try.
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6389
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
instance backup.service.yunlu_office.consul 127.0.0.1:6389
instance backup.service.yunlu_office.consul 127.0.0.1:6380 priority=2
--- backends: 6380 6381
--- stream_config
log_format bytes $upstream_addr!$upstream_bytes_sent!$upstream_bytes_received;
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream backup {
    consul_upstream backup.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT fail_timeout=1s;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass backup;
    access_log logs/u.log bytes;
}
--- check
backend_stop(6389);
ok(wait_for_log(qr/"backup": 2 peers from/, 5) && wait_for_log(qr/"redis": 3 peers from/, 5), 'discovered');
is_tally(tally(30), {6380 => 15, 6381 => 15}, 'failures: no connection fails');
is_tally(tally(30, port => 1990), {6380 => 30}, 'backup: priority 2 serves');
backend_start(6389);
sleep 1.2;    # fail_timeout passes
# One connection probes it first: nginx before 1.25 reports a success only
# when the connection ends (nginx-tests' single primary is never down at all).
is_tally(tally(1, port => 1990), {6389 => 1}, 'recovery: the probe');
my ($ports, $socks) = main::hold(20, port => 1990);
is_deeply(main::counts($ports), {6389 => 20}, 'recovery: 20 held at once, all on priority 1');
main::close_all($socks);
backend_stop(6389);
my $log = do { local (@ARGV, $/) = "$Test::Nginx::Util::ServRoot/logs/u.log"; <> };
like($log, qr/^127\.0\.0\.1:6389, 127\.0\.0\.1:6380!0, \d+!0, \d+$/m, 'per-upstream variables: both tries');
--- error_log
connect() failed (111: Connection refused)



=== TEST 3: stream_upstream_hash.t "hash", "hash consistent": one client's connections on one peer
The peer differs from nginx's (another hash function than CRC32), on purpose.
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    hash $remote_addr;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream cons {
    hash $remote_addr consistent;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass cons;
}
--- check
ok(wait_for_log(qr/"redis": 2 peers from/, 5) && wait_for_log(qr/"cons": 2 peers from/, 5), 'discovered');
for my $port (stream_port(), 1990) {
    my $t = tally(10, port => $port);
    is(scalar(keys %$t), 1, "port $port: 10 of 10 on one peer") or diag tally_str($t);
    ok(!$t->{fail}, "port $port: none failed");
}
--- no_error_log
[error]



=== TEST 4: stream_upstream_hash.t "empty key", "empty key - consistent": round robin, 2:2
$proxy_protocol_addr without PROXY protocol is empty (so is $ssl_preread_server_name
without SNI: the same path; this nginx is built without ssl_preread).
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    hash $proxy_protocol_addr;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream cempty {
    hash $proxy_protocol_addr consistent;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass cempty;
}
--- check
ok(wait_for_log(qr/"redis": 2 peers from/, 5) && wait_for_log(qr/"cempty": 2 peers from/, 5), 'discovered');
is_tally(tally(4), {6380 => 2, 6381 => 2}, 'empty key');
is_tally(tally(4, port => 1990), {6380 => 2, 6381 => 2}, 'empty key - consistent');
--- no_error_log
[error]



=== TEST 5: stream_upstream_least_conn.t "balanced", "least_conn": 5:5; while one peer holds a connection, 10 of 10 to the other
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    least_conn;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_log(qr/2 peers from/, 5), 'discovered');
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'balanced');
my ($ports, $socks) = main::hold(1);
my $other = $ports->[0] == 6380 ? 6381 : 6380;
is_tally(tally(10), {$other => 10}, 'least_conn');
main::close_all($socks);
--- no_error_log
[error]



=== TEST 6: stream_upstream_random.t: random, random two, "random wait", "random weight", single peer, failures
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
instance weighted.service.yunlu_office.consul 127.0.0.1:6380 weight=1
instance weighted.service.yunlu_office.consul 127.0.0.1:6381 weight=2
instance one.service.yunlu_office.consul 127.0.0.1:6380
instance fail.service.yunlu_office.consul 127.0.0.1:6389
instance fail.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    random;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream lc {
    random two;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream w {
    random two least_conn;
    consul_upstream weighted.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream one {
    random;
    consul_upstream one.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream two {
    random two;
    consul_upstream one.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream fail {
    random;
    consul_upstream fail.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream fail2 {
    random two;
    consul_upstream fail.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
server { listen 127.0.0.1:1990; proxy_pass lc; }
server { listen 127.0.0.1:1991; proxy_pass w; }
server { listen 127.0.0.1:1992; proxy_pass one; }
server { listen 127.0.0.1:1993; proxy_pass two; }
server { listen 127.0.0.1:1994; proxy_pass fail; }
server { listen 127.0.0.1:1995; proxy_pass fail2; }
--- check
backend_stop(6389);
ok(wait_until(sub { log_count(qr/peers? from/) >= 7 }, 5), 'every upstream discovered');
my $t = tally(1);
ok($t->{6380} || $t->{6381}, 'random');
$t = tally(1, port => 1990);
ok($t->{6380} || $t->{6381}, 'random two');
my ($ports, $socks) = main::hold(1, port => 1990);
my $other = $ports->[0] == 6380 ? 6381 : 6380;
is_tally(tally(1, port => 1990), {$other => 1}, 'random wait: the peer without the held connection');
main::close_all($socks);
($ports, $socks) = main::hold(3, port => 1991);
is_deeply(main::counts($ports), {6380 => 1, 6381 => 2}, 'random weight: 1:2 held');
main::close_all($socks);
is_tally(tally(1, port => 1992), {6380 => 1}, 'single one');
is_tally(tally(1, port => 1993), {6380 => 1}, 'single two');
is_tally(tally(10, port => 1994), {6381 => 10}, 'failures');
is_tally(tally(10, port => 1995), {6381 => 10}, 'failures two');
--- error_log
connect() failed (111: Connection refused)



=== TEST 7: stream_upstream_max_conns.t "unlimited", "conn subtraction", "single", "all peers"
A full peer takes nothing more, counted over open connections; when every
peer is full the connection fails with nginx's "no live upstreams".
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
instance lim.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=0;
}
upstream lim {
    consul_upstream lim.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=3;
}
upstream two {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=1;
}
server { listen 127.0.0.1:1990; proxy_pass lim; }
server { listen 127.0.0.1:1991; proxy_pass two; }
--- check
ok(wait_until(sub { log_count(qr/peers? from/) >= 3 }, 5), 'every upstream discovered');
my ($p, $s) = main::hold(4);
is_deeply(main::counts($p), {6380 => 2, 6381 => 2}, 'unlimited');
main::close_all($s);
($p, $s) = main::hold(2, port => 1990);
close $s->[0];
sleep 0.3;
my ($p2, $s2) = main::hold(2, port => 1990);
is_deeply(main::counts([@$p, @$p2]), {6380 => 4}, 'conn subtraction: a closed connection frees its place');
main::close_all($_) for $s, $s2;
sleep 0.3;
($p, $s) = main::hold(4, port => 1990);
is_deeply(main::counts($p), {6380 => 3, fail => 1}, 'single');
main::close_all($s);
($p, $s) = main::hold(4, port => 1991);
is_deeply(main::counts($p), {6380 => 1, 6381 => 1, fail => 2}, 'all peers');
main::close_all($s);
is(log_count(qr/\[error\] .*no live upstreams while connecting to upstream/), 3,
   'each refused connection: nginx\'s "no live upstreams"');



=== TEST 8: stream_upstream_max_conns.t "backup", "backup limited", "some peers", "weight"
A full discovered peer leaves connections to the static servers; a limited
static backup refuses beyond its own max_conns. The weight of a peer does not
move its limit.
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 weight=2
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=2;
    server 127.0.0.1:6381 backup;
}
upstream backup_lim {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=2;
    server 127.0.0.1:6381 backup max_conns=3;
}
upstream some {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=1;
    server 127.0.0.1:6381;
}
server { listen 127.0.0.1:1990; proxy_pass backup_lim; }
server { listen 127.0.0.1:1991; proxy_pass some; }
--- check
ok(wait_until(sub { log_count(qr/peers? from/) >= 3 }, 5), 'every upstream discovered');
my ($p, $s) = main::hold(6);
is("@$p", "6380 6380 6381 6381 6381 6381", 'backup');
main::close_all($s);
sleep 0.3;
($p, $s) = main::hold(6, port => 1990);
is(join(' ', map { $_ // '-' } @$p), "6380 6380 6381 6381 6381 -", 'backup limited');
main::close_all($s);
($p, $s) = main::hold(4, port => 1991);
is_deeply(main::counts($p), {6380 => 1, 6381 => 3}, 'some peers; weight 2 does not raise the limit');
main::close_all($s);



=== TEST 9: stream_upstream_max_conns.t "least_conn", "least_conn backup", "least_conn backup limited"
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    least_conn;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=1;
    server 127.0.0.1:6381;
}
upstream lc_backup {
    least_conn;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=2;
    server 127.0.0.1:6381 backup;
}
upstream lc_backup_lim {
    least_conn;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=2;
    server 127.0.0.1:6381 backup max_conns=3;
}
server { listen 127.0.0.1:1990; proxy_pass lc_backup; }
server { listen 127.0.0.1:1991; proxy_pass lc_backup_lim; }
--- check
ok(wait_until(sub { log_count(qr/peers? from/) >= 3 }, 5), 'every upstream discovered');
my ($p, $s) = main::hold(4);
is_deeply(main::counts($p), {6380 => 1, 6381 => 3}, 'least_conn');
main::close_all($s);
($p, $s) = main::hold(6, port => 1990);
is("@$p", "6380 6380 6381 6381 6381 6381", 'least_conn backup');
main::close_all($s);
sleep 0.3;
($p, $s) = main::hold(6, port => 1991);
is(join(' ', map { $_ // '-' } @$p), "6380 6380 6381 6381 6381 -", 'least_conn backup limited');
main::close_all($s);



=== TEST 10: stream_upstream_max_conns.t "hash", "hash consistent"; stream_upstream_random.t "max_conns", "max_conns two"
One client address (one key): its peer full, the key goes to the other peer,
then nowhere. Upstream-wide max_conns=1 where nginx-tests give the peers 1 and 2.
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    hash $remote_addr;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=1;
}
upstream chash {
    hash $remote_addr consistent;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=1;
}
upstream mc {
    random;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=1;
}
upstream mc2 {
    random two;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_conns=1;
}
server { listen 127.0.0.1:1990; proxy_pass chash; }
server { listen 127.0.0.1:1991; proxy_pass mc; }
server { listen 127.0.0.1:1992; proxy_pass mc2; }
--- check
ok(wait_until(sub { log_count(qr/peers? from/) >= 4 }, 5), 'every upstream discovered');
for my $c ([stream_port(), 'hash'], [1990, 'hash consistent'], [1991, 'max_conns'], [1992, 'max_conns two']) {
    my ($p, $s) = main::hold(4, port => $c->[0], local_addr => '127.0.0.7');
    is_deeply(main::counts($p), {6380 => 1, 6381 => 1, fail => 2}, $c->[1]);
    main::close_all($s);
    sleep 0.2;
}
is(log_count(qr/no live upstreams/), 8, 'every refused connection logged');
