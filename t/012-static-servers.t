# Configurations nginx users write around consul_upstream: `zone` in the
# upstream, static `server` lines (fallback and `backup`), reloads with them.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';

# TEST 6: upstreams with nginx's `zone` line and no peer to give, one per
# (what DNS says) x (method) x (directive order), each behind its own port.
our @NO_PEER;
{
    my %state = (
        down  => ['redis.service.yunlu_office.consul', '127.0.0.1:1'],    # nothing listens
        empty => ['empty.service.yunlu_office.consul'],                   # NOERROR, no records
        nx    => ['gone.service.yunlu_office.consul'],                    # NXDOMAIN
        dead  => ['dead.service.yunlu_office.consul'],                    # 2 peers, both refuse
    );
    my %method = (
        rr => '', least_conn => 'least_conn;', hash => 'hash $remote_addr;',
        chash => 'hash $remote_addr consistent;', random => 'random;',
        random2 => 'random two least_conn;',
    );
    my $port = 7100;
    for my $st (sort keys %state) {
        for my $m (sort keys %method) {
            for my $order (qw(zone_first zone_last)) {
                my ($q, $r) = @{ $state{$st} };
                $r //= '127.0.0.1:$TEST_NGINX_DNS_PORT';
                my $cu = "consul_upstream $q resolver=$r interval=1s;";
                my $zone = "zone z_${st}_${m}_$order 64k;";
                my @body = $order eq 'zone_first' ? ($zone, $method{$m}, $cu)
                                                  : ($cu, $method{$m}, $zone);
                push @NO_PEER, { name => "${st}_${m}_$order", port => $port++,
                                 body => join(' ', grep { length } @body) };
            }
        }
    }
    # static servers that are all down: nginx's round robin answers
    push @NO_PEER, { name => 'static_down', port => $port++,
                     body => 'zone z_static_down 64k; consul_upstream gone.service.yunlu_office.consul'
                           . ' resolver=127.0.0.1:$TEST_NGINX_DNS_PORT; server 127.0.0.1:6382 down;' };
    push @NO_PEER, { name => 'static_down_hash', port => $port++,
                     body => 'hash $remote_addr; server 127.0.0.1:6382 down; zone z_static_down_hash 64k;'
                           . ' consul_upstream gone.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;' };
}

sub no_peer_config {
    return join '', map {
        "upstream $_->{name} { $_->{body} }\n"
        . "server { listen 127.0.0.1:$_->{port}; proxy_pass $_->{name}; }\n"
    } @NO_PEER;
}

worker_connections(1024);    # TEST 6: 50 listening sockets and 50 lines' DNS connections
run_tests();

__DATA__

=== TEST 1: zone in the upstream: discovery works, reloads keep the master alive
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    zone redis 64k;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
my $master = nginx_pid();
ok(nginx_reload(), 'first reload');
ok(nginx_reload(), 'second reload');
is(nginx_pid(), $master, 'the same master');
ok(kill(0, $master), 'and alive');
my $t = tally(20);
ok(!$t->{fail} && $t->{6380} && $t->{6381}, 'both used after the reloads: ' . tally_str($t));
--- no_error_log
[error]
[warn]



=== TEST 2: zone with a fallback server: the fallback serves before the first answer only
--- workers: 2
--- backends: 6380 6382
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    zone redis 64k;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    server 127.0.0.1:6382;
}
--- check
is_tally(tally(10), {6382 => 10}, 'DNS down from the start: the fallback serves');
dns_start(records => "instance $::NAME 127.0.0.1:6380\n");
ok(wait_for_backends([6380], only => 1, first_set => 0, timeout => 5), 'then discovery takes over');
--- no_error_log
[emerg]



=== TEST 3: a backup server serves only while no discovered peer can
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381 6382
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s fail_timeout=30s;
    server 127.0.0.1:6382 backup;
}
--- stream_server_config
    proxy_pass redis;
    proxy_connect_timeout 1s;
--- check
ok(wait_for_backends([6380, 6381], only => 1), 'discovered peers serve, the backup does not');
backend_stop('6380', '6381');
my $t = tally(10);
is_tally($t, {6382 => 10}, 'both discovered instances dead: the backup serves every connection');
backend_start('6380', '6381');
is_tally(tally(10), {6382 => 10}, 'still while they are down by max_fails (fail_timeout=30s)');
--- error_log
connect() failed (111: Connection refused)



=== TEST 4: a backup server before the first answer and after on_empty=fail
--- workers: 2
--- backends: 6380 6382
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s on_empty=fail;
    server 127.0.0.1:6382 backup;
}
--- check
is_tally(tally(10), {6382 => 10}, 'no DNS yet: the backup serves');
dns_start(records => "instance $::NAME 127.0.0.1:6380\n");
ok(wait_for_backends([6380], only => 1, first_set => 0, timeout => 5), 'discovered: the backup rests');
consul_deregister_all($::NAME);
ok(wait_for_log(qr/has no healthy instances \(NXDOMAIN\), dropping 1 peer/, 4), 'dropped');
is_tally(tally(10), {6382 => 10}, 'the backup serves again');
--- no_error_log
[error]



=== TEST 5: retries go from dead discovered peers to the backup within one connection
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:20001
instance redis.service.yunlu_office.consul 127.0.0.1:20002
instance redis.service.yunlu_office.consul 127.0.0.1:20003
--- backends: 6382
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_fails=0;
    server 127.0.0.1:6382 backup;
}
--- check
ok(wait_for_log(qr/3 peers from/, 5), 'three dead instances discovered');
my $mark = log_mark();
my $t = tally(6);
is_tally($t, {6382 => 6}, 'every connection reaches the backup');
my $refused = () = error_log_since($mark) =~ /connect\(\) failed \(111: Connection refused\) while connecting to upstream/g;
is($refused, 18, 'after trying each of the three discovered peers once (6 x 3)');
--- error_log
connect() failed (111: Connection refused)



=== TEST 6: nginx's zone line and no peer to give: connections fail cleanly, no worker dies
Consul down, an empty answer, NXDOMAIN, or two discovered peers that both
refuse; every method, `zone` before and after `consul_upstream`; static
servers all `down`. With nginx's `zone` the upstream carries the modify flag,
and nginx reads the peer's name even for "no live upstreams": worker crash
(SIGSEGV) on every such connection before the fix.
--- workers: 2
--- dns
instance primary.empty.service.yunlu_office.consul 127.0.0.1:6380
instance dead.service.yunlu_office.consul 127.0.0.1:20001
instance dead.service.yunlu_office.consul 127.0.0.1:20002
--- stream_config eval
main::no_peer_config()
--- stream_server_config
    proxy_pass static_down;
--- check
my $n = scalar @::NO_PEER;
my @fails = map { my $u = $_; [map { (probe_backend(port => $u->{port}, timeout => 2))[1] } 1 .. 2] } @::NO_PEER;
ok(wait_for_log(qr/\(NXDOMAIN\), no peers to keep$/m, 5, 14), 'NXDOMAIN answers seen (the line has no peers)');
ok(wait_for_log(qr/\(no records\), no peers to keep$/m, 5, 12), 'empty answers seen (the line has no peers)');
ok(wait_for_log(qr/2 peers from dead\.service/, 5, 12), 'the dead peers discovered');
ok(wait_for_log(qr/resolving redis\.service\.yunlu_office\.consul failed/, 5, 12), 'Consul down seen');
for my $i (0 .. $#::NO_PEER) {
    my $u = $::NO_PEER[$i];
    push @{ $fails[$i] }, map { (probe_backend(port => $u->{port}, timeout => 2))[1] } 1 .. 3;
}
# Closed by nginx (a reset when it had not read what was sent): no answer.
my @bad = grep { grep { !defined $_ || $_ !~ /^(closed without an answer|read: Connection reset by peer)$/ } @{ $fails[$_] } } 0 .. $#::NO_PEER;
is(join(' ', map { "$::NO_PEER[$_]{name}: @{ $fails[$_] }" } @bad), '',
   "each of $n upstreams: 5 connections closed without an answer");
my $log = error_log_text();
my @unnamed = grep { $log !~ /no live upstreams while connecting to upstream, .*upstream: "\Q$_->{name}\E"/ } @::NO_PEER;
is(join(' ', map { $_->{name} } @unnamed), '', '"no live upstreams" with the upstream\'s name, for each');
--- error_log
no live upstreams
--- no_error_log
exited on signal



=== TEST 7: random, then a backup server, then consul_upstream: the backup serves until discovery
(main refused this order: "balancing method does not support parameter "backup"")
--- workers: 2
--- backends: 6380 6381 6382
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    random two least_conn;
    server 127.0.0.1:6382 backup;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
is_tally(tally(10), {6382 => 10}, 'no DNS yet: the backup serves');
dns_start(records => "instance $::NAME 127.0.0.1:6380\ninstance $::NAME 127.0.0.1:6381\n");
ok(wait_for_backends([6380, 6381], only => 1, first_set => 0, timeout => 5), 'discovered: random over them, the backup rests');
--- no_error_log
[error]
