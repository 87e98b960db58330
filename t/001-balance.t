# Balancing across the discovered instances: every instance gets traffic,
# SRV weights and ports are used, retries skip peers already tried.
# One nginx process (master_process off): smooth weighted round robin is exact.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';

run_tests();

__DATA__

=== TEST 1: a connection through a discovered instance
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380]), 'discovered 6380');
--- stream_response
+PONG
+OK
--- error_log eval
qr/consul upstream "redis": 1 peers? from redis\.service\.yunlu_office\.consul \(generation \d+\)/
--- no_error_log
[error]
[warn]



=== TEST 2: two instances both get traffic, equally
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
is_tally(tally(20), {6380 => 10, 6381 => 10}, '10:10 over 20 connections');
--- error_log eval
qr/consul upstream "redis": 2 peers from redis\.service\.yunlu_office\.consul \(generation \d+\)/
--- no_error_log
[error]
[warn]



=== TEST 3: SRV weights 3 and 1 give 30:10 over 40 connections
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 weight=3
instance redis.service.yunlu_office.consul 127.0.0.1:6381 weight=1
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
is_tally(tally(40), {6380 => 30, 6381 => 10}, '30:10');
--- no_error_log
[error]



=== TEST 4: SRV weight 0 (Consul: an instance in warning with Weights.Warning = 0) serves only while the weighted one cannot
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 weight=0
instance redis.service.yunlu_office.consul 127.0.0.1:6381 weight=1
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_log(qr/2 peers from/), 'both discovered');
is_tally(tally(20), {6381 => 20}, '0:20');
backend_stop(6381);
is_tally(tally(10), {6380 => 10}, 'the weighted one down: the weight-0 one serves');
backend_start(6381);
--- error_log
connect() failed (111: Connection refused)



=== TEST 5: SRV ports are used (instances on 6382/6383, nothing on the default 6379)
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6382
instance redis.service.yunlu_office.consul 127.0.0.1:6383
--- backends: 6382 6383
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6382, 6383]), 'both discovered');
is_tally(tally(10), {6382 => 5, 6383 => 5}, 'only the SRV ports');
--- no_error_log
[error]



=== TEST 6: RFC 2782 name (_service._tag) with underscores
--- dns
instance _redis._tcp.service.yunlu_office.consul 127.0.0.1:6380
instance _redis._tcp.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream _redis._tcp.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
ok(dns_queries(qr/query: _redis\._tcp\.service\.yunlu_office\.consul IN SRV/) >= 1,
   'queried the RFC 2782 name');
--- no_error_log
[error]



=== TEST 7: tag query without a datacenter
--- dns
instance redis.service.consul 127.0.0.1:6380
instance primary.redis.service.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream primary.redis.service.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6381]), 'tagged instance discovered');
is_tally(tally(6), {6381 => 6}, 'only the tagged instance');
--- no_error_log
[error]



=== TEST 8: the default resolver is 127.0.0.1:8600
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul;
}
--- check
SKIP: {
    skip "BIND runs on port $DnsPort (NGX_CONSUL_DNS_PORT), not 8600", 1 if $DnsPort != 8600;
    ok(wait_for_backends([6380]), 'discovered through 127.0.0.1:8600');
}
--- no_error_log
[error]



=== TEST 9: a registered but dead instance: retries skip it, no connection fails
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6389
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_log(qr/consul upstream "redis": 2 peers from/), 'both discovered');
is_tally(tally(10), {6380 => 10}, 'all connections end at 6380');
--- error_log
connect() failed (111: Connection refused) while connecting to upstream



=== TEST 10: max_fails=1 fail_timeout=30s: a dead instance is tried once only
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6389
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    max_fails=1 fail_timeout=30s;
}
--- check
ok(wait_for_log(qr/consul upstream "redis": 2 peers from/), 'both discovered');
is_tally(tally(20), {6380 => 20}, 'all connections end at 6380');
is(log_count(qr/connect\(\) failed .* upstream: "127\.0\.0\.1:6389"/), 1,
   'the dead peer was tried once in 20 connections');



=== TEST 11: max_fails=3: three failures before the peer is skipped
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6389
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    max_fails=3 fail_timeout=30s;
}
--- check
ok(wait_for_log(qr/consul upstream "redis": 2 peers from/), 'both discovered');
is_tally(tally(30), {6380 => 30}, 'all connections end at 6380');
is(log_count(qr/connect\(\) failed .* upstream: "127\.0\.0\.1:6389"/), 3,
   'the dead peer was tried 3 times in 30 connections');



=== TEST 12: fail_timeout expires: a revived instance gets traffic again
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    max_fails=1 fail_timeout=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
backend_stop(6381);
is_tally(tally(6), {6380 => 6}, '6381 down: all to 6380');
backend_start(6381);
ok(wait_for_backends([6380, 6381], timeout => 5), '6381 back within fail_timeout + a bit');
--- error_log
connect() failed (111: Connection refused) while connecting to upstream



=== TEST 13: priority 2 used only while every priority-1 instance is down
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 priority=1
instance redis.service.yunlu_office.consul 127.0.0.1:6381 priority=1
instance redis.service.yunlu_office.consul 127.0.0.1:6382 priority=2
--- backends: 6380 6381 6382
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    max_fails=1 fail_timeout=1s;
}
--- check
ok(wait_for_log(qr/consul upstream "redis": 3 peers from/), 'three peers');
is_tally(tally(20), {6380 => 10, 6381 => 10}, 'priority 1 only');
backend_stop(6380);
is_tally(tally(10), {6381 => 10}, 'one priority-1 instance left: still no priority 2');
backend_stop(6381);
is_tally(tally(10), {6382 => 10}, 'every priority-1 instance down: priority 2');
backend_start(6380, 6381);
ok(wait_for_backends([6380, 6381], only => 1, timeout => 5), 'back to priority 1');
--- error_log
connect() failed (111: Connection refused) while connecting to upstream



=== TEST 14: retries skip the peers a connection already tried, whatever their weight
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:20001 weight=3
instance redis.service.yunlu_office.consul 127.0.0.1:20002 weight=1
instance redis.service.yunlu_office.consul 127.0.0.1:6380 weight=1
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_fails=0;
}
--- stream_server_config
    proxy_pass redis;
    proxy_next_upstream_tries 3;
--- check
ok(wait_for_log(qr/consul upstream "redis": 3 peers from/), 'three peers');
# The weight-3 peer holds 3 of every 5 slots: a retry that took the next slot
# would often meet it again and run out of its three tries.
is_tally(tally(25), {6380 => 25}, 'every connection ends at the live peer within three tries');
my $tries = failed_tries();
ok(!grep({ grep { $_ > 1 } values %$_ } values %$tries), 'no connection tried a dead peer twice')
    or diag Test::More::explain($tries);
--- error_log
connect() failed (111: Connection refused) while connecting to upstream



=== TEST 15: more than 64 peers tried by one connection (the tried set outgrows its first word)
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:20000-20069
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT max_fails=0;
}
--- stream_server_config
    proxy_pass redis;
    proxy_next_upstream_tries 0;
--- check
ok(wait_for_log(qr/consul upstream "redis": 71 peers from/), '71 peers, 70 of them dead');
is_tally(tally(8), {6380 => 8}, 'every connection ends at the live peer');
my $tries = failed_tries();
my ($most) = sort { $b <=> $a } map { scalar keys %$_ } values %$tries;
ok($most > 64, "one connection tried $most dead peers");
ok(!grep({ grep { $_ > 1 } values %$_ } values %$tries), 'none of them twice')
    or diag Test::More::explain($tries);
--- error_log
connect() failed (111: Connection refused) while connecting to upstream
