# Configurations nginx users write around consul_upstream: `zone` in the
# upstream, static `server` lines (fallback and `backup`), reloads with them.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';

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
