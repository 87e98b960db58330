# Shapes of answers: addresses from ADDITIONAL, from Consul's hex target names,
# or from A queries; big answers (UDP truncation, TCP); answers larger than
# the zone; an answer BIND cannot even hold.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';

run_tests();

__DATA__

=== TEST 1: minimal-responses yes, node targets: addresses from A queries
--- dns_config
minimal-responses yes;
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 node=db1
instance redis.service.yunlu_office.consul 127.0.0.1:6381 node=db2
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
unlike(`dig \@127.0.0.1 -p $DnsPort +tcp SRV $NAME.`, qr/ADDITIONAL SECTION/, 'BIND sends no ADDITIONAL');
ok(wait_for_backends([6380, 6381]), 'both discovered');
is_tally(tally(20), {6380 => 10, 6381 => 10}, '10:10');
ok(dns_queries(qr/query: db1\.node\.yunlu_office\.consul IN A /) >= 1, 'A query for db1');
ok(dns_queries(qr/query: db2\.node\.yunlu_office\.consul IN A /) >= 1, 'A query for db2');
--- no_error_log
[error]
[warn]



=== TEST 2: node targets with ADDITIONAL: no A queries needed
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 node=db1
instance redis.service.yunlu_office.consul 127.0.0.1:6381 node=db2
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
sleep 1.2;
is(dns_queries(qr/\.node\.yunlu_office\.consul IN (?:A|AAAA) /), 0, 'no A/AAAA queries');
--- no_error_log
[error]
[warn]



=== TEST 3: hex .addr. targets without A records and without ADDITIONAL: decoded
--- dns_config
minimal-responses yes;
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 addr_record=0
instance redis.service.yunlu_office.consul 127.0.0.1:6381 addr_record=0
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
is(dns_queries(qr/\.addr\.yunlu_office\.consul IN (?:A|AAAA) /), 0, 'no A/AAAA queries');
--- no_error_log
[error]
[warn]



=== TEST 4: a target without any address is skipped, the others are used
--- dns_config
minimal-responses yes;
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 node=db1
instance redis.service.yunlu_office.consul 127.0.0.1:6381 node=ghost addr_record=0
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380]), '6380 discovered');
is_tally(tally(10), {6380 => 10}, 'only the instance with an address');
--- no_error_log
[error]



=== TEST 5: 40 instances over TCP (BIND truncates them over UDP): all 40 used
--- dns
instance redis.service.yunlu_office.consul 127.0.0.2-41:6390
--- backends: 127.0.0.2-41:6390
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_log(qr/consul upstream "redis": 40 peers from/), '40 peers');
my $t = tally(80, by => 'addr');
my @two = grep { $t->{$_} == 2 } keys %$t;
is(scalar(keys %$t), 40, '40 distinct backends') or diag tally_str($t);
is(scalar @two, 40, 'each used twice in 80 connections') or diag tally_str($t);
my ($udp, $tcp) = dns_queries_by_transport(qr/redis\.service\.yunlu_office\.consul IN SRV/);
ok($tcp >= 1 && $udp == 0, "every SRV query over TCP (the default): udp=$udp tcp=$tcp");
like(`dig \@127.0.0.1 -p $DnsPort +notcp +ignore SRV $NAME.`, qr/flags: qr aa tc/, 'BIND truncates it over UDP');
--- no_error_log
[error]
[warn]



=== TEST 6: 40 instances with udp: truncated answer retried over TCP, all 40 used
--- dns
instance redis.service.yunlu_office.consul 127.0.0.2-41:6390
--- backends: 127.0.0.2-41:6390
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT udp;
}
--- check
ok(wait_for_log(qr/consul upstream "redis": 40 peers from/), '40 peers');
my $t = tally(80, by => 'addr');
is(scalar(keys %$t), 40, '40 distinct backends') or diag tally_str($t);
my ($udp, $tcp) = dns_queries_by_transport(qr/redis\.service\.yunlu_office\.consul IN SRV/);
ok($udp >= 1, "queries over UDP ($udp)");
ok($tcp >= 1, "the truncated answer retried over TCP ($tcp)");
--- no_error_log
[error]
[warn]



=== TEST 7: udp with a small answer stays on UDP
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT udp;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
my ($udp, $tcp) = dns_queries_by_transport(qr/redis\.service\.yunlu_office\.consul IN SRV/);
ok($udp >= 1 && $tcp == 0, "only UDP: udp=$udp tcp=$tcp");
--- no_error_log
[error]
[warn]



=== TEST 8: 1,200 instances (about the most BIND sends whole over TCP) fit the default zone
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:20001-21199
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
is(scalar(dig_srv($NAME)), 1200, 'BIND sends 1,200 records over TCP');
ok(wait_for_log(qr/consul upstream "redis": 1200 peers from redis\.service\.yunlu_office\.consul/, 10),
   '1200 peers');
--- no_error_log
[error]
[warn]



=== TEST 9: more peers than zone= holds: error logged once with the size needed, which works
--- workers: 1
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=2s zone=32k;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
my ($holds) = error_log_text() =~ /zone=32k holds (\d+) peers/;
ok($holds, "the info line says what zone=32k holds: $holds peers");
# Right after a query, so that the next one sees all 1,200 at once
# (an update message holds ~1,000 records: three of them).
my $q0 = dns_queries(qr/$NAME IN SRV/);
wait_until(sub { dns_queries(qr/$NAME IN SRV/) > $q0 }, 3);
my @rr = map { "update add $NAME. 0 IN SRV 1 1 $_ 7f000001.addr.yunlu_office.consul." } 20003 .. 21200;
nsupdate(@rr[0 .. 399], 'send', @rr[400 .. 799], 'send', @rr[800 .. $#rr]);
is(scalar(dig_srv($NAME)), 1200, 'BIND now has 1,200');
ok(wait_for_log(qr/\[error\] .*consul upstream "redis": 1200 peers do not fit in zone=32k \(max $holds peers\), zone=\d+k needed, keeping 2 peers/, 5),
   'error logged, with the capacity the info line gave');
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'previous set kept');
sleep 2.5;
is(log_count(qr/peers do not fit in zone/), 1, 'logged once, not every interval');
# The size it asks for is enough.
my ($need) = error_log_text() =~ /zone=(\d+)k needed/;
stream_config_set(<<"_EOC_");
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:\$TEST_NGINX_DNS_PORT
                    interval=2s zone=${need}k;
}
_EOC_
ok(nginx_reload(), "reloaded with zone=${need}k");
ok(wait_for_log(qr/1200 peers from redis\.service\.yunlu_office\.consul/, 6), "zone=${need}k holds the 1,200");
--- error_log
do not fit in zone=32k



=== TEST 10: an answer too big for one TCP message (BIND: TC over TCP): warned, set kept
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
my @rr = map { "update add $NAME. 0 IN SRV 1 1 $_ 7f000001.addr.yunlu_office.consul." } 20003 .. 21400;
nsupdate(@rr[0 .. 399], 'send', @rr[400 .. 799], 'send', @rr[800 .. 1199], 'send', @rr[1200 .. $#rr]);
like(`dig \@127.0.0.1 -p $DnsPort +tcp SRV $NAME.`, qr/flags: qr aa tc.*ANSWER: 0/, 'BIND: TC and no answer over TCP');
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": resolving redis\.service\.yunlu_office\.consul failed: .+, keeping \d+ peers/, 5),
   'a clear warning');
my $t = tally(10);
ok(!$t->{fail}, 'connections still served: ' . tally_str($t));
sleep 1.5;
is(log_count(qr/resolving redis\.service\.yunlu_office\.consul failed/), 1, 'warned once');



=== TEST 11: 10,000 SRV records in one name: BIND cannot even load them (SERVFAIL); no crash
--- dns_zone_may_fail
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:10000-19999
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_until(sub { `dig \@127.0.0.1 -p $DnsPort +tcp SRV $NAME.` =~ /status: SERVFAIL/ }, 5),
   'BIND answers SERVFAIL (zone not loaded: RRset too large)');
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": resolving redis\.service\.yunlu_office\.consul failed: .+/, 5),
   'a clear warning');
my $t0 = time;
is_tally(tally(3), {fail => 3}, 'no peers: connections fail');
ok(time - $t0 < 2, 'fast');
--- error_log
no live upstreams



=== TEST 12: IPv6 instances: AAAA in ADDITIONAL, and Consul's 32-hex .addr. names decoded
--- dns
instance redis.service.yunlu_office.consul [::1]:6380 node=v6node
instance redis.service.yunlu_office.consul [::1]:6381 addr_record=0
instance redis.service.yunlu_office.consul 127.0.0.1:6382
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
SKIP: {
    skip 'no IPv6 loopback here', 4
        unless IO::Socket::IP->new(Listen => 1, LocalHost => '::1', LocalPort => 0);
    backend_start('[::1]:6380', '[::1]:6381', '6382');
    ok(wait_for_backends([6380, 6381, 6382]), 'all three discovered');
    is_tally(tally(30, by => 'addr'), {'::1:6380' => 10, '::1:6381' => 10, '127.0.0.1:6382' => 10},
             'IPv6 and IPv4 peers share the traffic');
    is(dns_queries(qr/ IN (?:A|AAAA) /), 0, 'no follow-up A/AAAA queries');
    ok(wait_for_log(qr/consul upstream "redis": 3 peers from/, 1), 'the set is logged');
}
--- no_error_log
[error]
