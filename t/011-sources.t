# Several consul_upstream lines in one upstream: their sets are merged, each
# query keeps its own policies, and each part survives reloads and restarts.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $DC1 = 'redis.service.dc1.consul';
our $DC2 = 'redis.service.dc2.consul';

run_tests();

__DATA__

=== TEST 1: two datacenters in one upstream: every instance of both gets traffic
--- dns
instance redis.service.dc1.consul 127.0.0.1:6380
instance redis.service.dc2.consul 127.0.0.1:6381 weight=2
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.dc1.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    consul_upstream service=redis datacenter=dc2 resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both datacenters discovered');
is_tally(tally(30), {6380 => 10, 6381 => 20}, 'weights apply across the merged set');
ok(wait_for_log(qr/consul upstream "redis": 1 peer from redis\.service\.dc[12]\.consul, (?:1 peer|2 peers) in all \(generation \d+\)/, 1),
   'each part logged with the total');
--- no_error_log
[error]
[warn]



=== TEST 2: a change in one query leaves the other's part alone
--- dns
instance redis.service.dc1.consul 127.0.0.1:6380
instance redis.service.dc2.consul 127.0.0.1:6381
--- backends: 6380 6381 6382
--- stream_config
upstream redis {
    consul_upstream redis.service.dc1.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    consul_upstream redis.service.dc2.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
consul_register($main::DC2, '127.0.0.1:6382');
ok(wait_for_backends([6380, 6381, 6382], timeout => 4), 'new dc2 instance added');
ok(wait_for_log(qr/2 peers from redis\.service\.dc2\.consul, 3 peers in all/, 1), 'logged');
consul_deregister_all($main::DC1);
ok(wait_for_log(qr/redis\.service\.dc1\.consul has no healthy instances \(NXDOMAIN\), keeping 1 peer/, 4),
   'dc1 empty: its part kept (on_empty=keep)');
is_tally(tally(12), {6380 => 4, 6381 => 4, 6382 => 4}, 'all three still used');
--- no_error_log
[error]



=== TEST 3: policies are per query: on_empty=fail drops only that part
--- dns
instance redis.service.dc1.consul 127.0.0.1:6380
instance redis.service.dc2.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.dc1.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s on_empty=fail;
    consul_upstream redis.service.dc2.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
consul_deregister_all($main::DC1);
ok(wait_for_log(qr/redis\.service\.dc1\.consul has no healthy instances \(NXDOMAIN\), dropping 1 peer/, 4),
   'dc1 part dropped');
sleep 0.3;
is_tally(tally(6), {6381 => 6}, 'only dc2 left');
--- no_error_log
[error]



=== TEST 4: reload with DNS down keeps both parts, each still owned by its query
--- workers: 2
--- dns
instance redis.service.dc1.consul 127.0.0.1:6380
instance redis.service.dc2.consul 127.0.0.1:6381
--- backends: 6380 6381 6382
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.dc1.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    consul_upstream redis.service.dc2.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s on_empty=fail;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
# DNS down first: nothing a new lookup brings can rebuild the set.
dns_stop();
ok(nginx_reload(), 'reloaded');
ok(wait_for_log(qr/resolving redis\.service\.dc1\.consul failed: .+, keeping 1 peer/, 4),
   'the new worker 0 failed to ask, and kept dc1\'s part');
my $t = tally(20);
ok(!$t->{fail} && $t->{6380} && $t->{6381}, 'both parts served after the reload: ' . tally_str($t));
# The new worker 0 knows which peers are dc2's: dropping dc2 leaves dc1's.
dns_start(records => "instance redis.service.dc1.consul 127.0.0.1:6380\n");
ok(wait_for_log(qr/redis\.service\.dc2\.consul has no healthy instances \(NXDOMAIN\), dropping 1 peer/, 6),
   'dc2 part dropped by the new worker 0');
sleep 0.3;
is_tally(tally(6), {6380 => 6}, 'dc1 part intact');
--- no_error_log
[error]



=== TEST 5: restart with DNS down: the state file restores every part
--- dns
instance redis.service.dc1.consul 127.0.0.1:6380
instance redis.service.dc2.consul 127.0.0.1:6381
--- backends: 6380 6381
--- setup
unlink "$TmpDir/two.state";
--- stream_config
upstream redis {
    consul_upstream redis.service.dc1.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s state=$TEST_NGINX_CONSUL_TMP/two.state;
    consul_upstream redis.service.dc2.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
my $state = "$TmpDir/two.state";
ok(wait_for_backends([6380, 6381]), 'both discovered');
ok(wait_until(sub { open my $f, '<', $state or return 0; local $/; my $t = <$f>;
                    $t =~ /dc1/ && $t =~ /dc2/ && $t =~ /6380/ && $t =~ /6381/ }, 4),
   'state file holds both queries');
dns_stop();
ok(nginx_restart(), 'nginx restarted with DNS down');
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'both parts served from the state file');
ok(wait_for_log(qr/2 peers from state file/, 1), 'loaded');
--- no_error_log
[error]



=== TEST 6: a peer found by two lines is one peer; each line says what it resolves
--- dns
instance redis.service.dc1.consul 127.0.0.1:6380
instance redis.service.dc1.consul 127.0.0.1:6381
instance redis.service.dc2.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.dc1.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    consul_upstream redis.service.dc2.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
ok(wait_for_log(qr/1 peer from redis\.service\.dc2\.consul, 2 peers in all/, 4)
   || wait_for_log(qr/2 peers from redis\.service\.dc1\.consul, 2 peers in all/, 1),
   'two peers in all, not three');
is_tally(tally(20), {6380 => 10, 6381 => 10}, '6380 is not counted twice');
--- error_log eval
[qr/\[info\] \d+#\d+: consul upstream "redis": resolving redis\.service\.dc1\.consul every 1000ms via 127\.0\.0\.1:\d+ \(tcp\), zone=256k holds \d+ peers$/m,
 qr/\[info\] \d+#\d+: consul upstream "redis": resolving redis\.service\.dc2\.consul every 1000ms via 127\.0\.0\.1:\d+ \(tcp\), zone=256k holds \d+ peers$/m]
--- no_error_log
[error]
[warn]



=== TEST 7: two queries whose 32-bit tags collide are two lines, each with its part
s31597.service.consul and s618190.service.consul have one FNV-1a hash
(main refused them: "cannot be told apart in the zone: rename one").
--- workers: 2
--- dns
instance s31597.service.consul 127.0.0.1:6380
instance s618190.service.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream s31597.service.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s on_empty=fail;
    consul_upstream s618190.service.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s on_empty=fail;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both lines discovered');
consul_deregister_all('s618190.service.consul');
ok(wait_for_backends([6380], only => 1, timeout => 5), 'one line emptied: only its own peer left');
ok(nginx_reload(), 'reloaded');
is_tally(tally(10), {6380 => 10}, 'after the reload each line still owns its part');
ok(wait_for_log(qr/s618190\.service\.consul has no healthy instances \(NXDOMAIN\), dropping 1 peer/, 1), 'the emptied line dropped its own peer');
consul_register('s618190.service.consul', '127.0.0.1:6381');
ok(wait_for_backends([6380, 6381]), 'and it comes back');
--- no_error_log
[error]
