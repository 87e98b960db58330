# Answers that must not route traffic where it does not belong: instances at
# addresses that take no connection or at nginx's own listening socket, `.addr.`
# names outside Consul's domain, RFC 2782's "no service" target, and A/AAAA
# follow-ups that are refused (that instance is left out; a follow-up that fails
# for a while keeps the set: 008-consul-answers.t).
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';

# The SRV and A records of an instance whose target is NODE (no ADDITIONAL
# section when BIND runs with minimal-responses).
sub node_instance {
    my ($node, $port, $addr) = @_;
    return ("$::NAME. 0 IN SRV 1 1 $port $node.node.yunlu_office.consul.",
            "$node.node.yunlu_office.consul. 0 IN A $addr");
}

run_tests();

__DATA__

=== TEST 1: an instance registered at 0.0.0.0 is not proxied to (Linux would reach this host)
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
redis.service.yunlu_office.consul. 0 IN SRV 1 1 6381 00000000.addr.yunlu_office.consul.
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380], only => 1), 'only the real instance serves');
is_tally(tally(10), {6380 => 10}, 'nothing goes to 0.0.0.0:6381');
--- error_log
[warn]
ignored records of the answer: 1 with an address that takes no connections (0.0.0.0:6381)
--- no_error_log
[error]



=== TEST 2: multicast, broadcast and :: instances are left out too
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
redis.service.yunlu_office.consul. 0 IN SRV 1 1 6381 e0000001.addr.yunlu_office.consul.
redis.service.yunlu_office.consul. 0 IN SRV 1 1 6382 ffffffff.addr.yunlu_office.consul.
redis.service.yunlu_office.consul. 0 IN SRV 1 1 6383 00000000000000000000000000000000.addr.yunlu_office.consul.
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380], only => 1), 'only the real instance serves');
ok(wait_for_log(qr/consul upstream "redis": 1 peer from redis\.service\.yunlu_office\.consul/, 3), 'a set of 1 peer');
--- error_log
ignored records of the answer: 3 with an address that takes no connections
--- no_error_log
[error]



=== TEST 3: an instance at nginx's own listening socket is not a peer (no proxy loop)
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:$TEST_NGINX_STREAM_PORT
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- setup
$ENV{TEST_NGINX_STREAM_PORT} = $Test::Nginx::Util::ServerPort + 1;
--- check
ok(wait_for_backends([6380], only => 1), 'the real instance serves');
my $mark = log_mark();
is_tally(tally(10), {6380 => 10}, 'ten connections');
my $t = worker_tally($mark);
my %ports = map { %$_ } values %$t;
is_deeply([sort keys %ports], [6380], 'nginx connected to 6380 only, never to itself')
    or diag Test::More::explain($t);
--- error_log eval
qr/ignored records of the answer: 1 pointing at nginx's own listening socket \(127\.0\.0\.1:\d+\)/
--- no_error_log
worker_connections are not enough



=== TEST 4: an .addr. name outside Consul's domain is not decoded into an address
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
nsupdate("update add $::NAME. 0 SRV 1 1 6381 7f000001.addr.dc.evil.example.");
ok(wait_for_log(qr/\[warn\] .*ignored records of the answer: 1 with targets that have no address \(7f000001\.addr\.dc\.evil\.example:6381: 127\.0\.0\.1:\d+ answered REFUSED\)/, 4),
   'the foreign name is looked up (and this DNS server refuses it): that instance is left out');
is_tally(tally(10), {6380 => 10}, 'nothing goes to 127.0.0.1:6381');
--- no_error_log
[error]



=== TEST 5: SRV target "." means "no service": no A query for the root
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
redis.service.yunlu_office.consul. 0 IN SRV 1 1 6381 .
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380], only => 1), 'the real instance serves');
sleep 1.5;
is(dns_queries(qr/query: \. IN (A|AAAA) /), 0, 'no A or AAAA query for "."');
--- error_log
ignored records of the answer: 1 with target "." (no service)
--- no_error_log
[warn]



=== TEST 6: a target whose A lookup is refused is left out, the others serve (a timeout or SERVFAIL keeps the set: 008 TEST 3)
--- dns_config
minimal-responses yes;
--- dns eval
CORE::join "\n", main::node_instance('node1', 6380, '127.0.0.1'), main::node_instance('node2', 6381, '127.0.0.1')
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered through A queries');
# node2 moves to a name this DNS server refuses (a Consul agent without
# recursors refuses every name outside its domain).
nsupdate("update delete $::NAME. SRV 1 1 6381 node2.node.yunlu_office.consul.",
         "update add $::NAME. 0 SRV 1 1 6381 node2.node.elsewhere.");
ok(wait_for_log(qr/\[warn\] .*ignored records of the answer: 1 with targets that have no address \(node2\.node\.elsewhere:6381: 127\.0\.0\.1:\d+ answered REFUSED\)/, 4),
   'the refused target is left out, said once');
ok(wait_for_backends([6380], only => 1), 'the other instance serves');
is(log_count(qr/resolving redis\.service\.yunlu_office\.consul failed/), 0, 'the answer did not fail');
nsupdate("update delete $::NAME. SRV 1 1 6381 node2.node.elsewhere.",
         "update add $::NAME. 0 SRV 1 1 6381 node2.node.yunlu_office.consul.");
ok(wait_for_backends([6380, 6381]), 'back when it resolves again');
--- no_error_log
[error]



=== TEST 7: AAAA follow-ups: a node target with an IPv6 address only
--- dns_config
minimal-responses yes;
--- dns
redis.service.yunlu_office.consul. 0 IN SRV 1 1 6390 node6.node.yunlu_office.consul.
node6.node.yunlu_office.consul. 0 IN AAAA ::1
--- backends: [::1]:6390
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_log(qr/1 peer from redis\.service\.yunlu_office\.consul/, 5), 'discovered');
is_tally(tally(4, by => 'addr'), {'::1:6390' => 4}, 'the AAAA address is used');
ok(dns_queries(qr/query: node6\.node\.yunlu_office\.consul IN AAAA /) >= 1, 'an AAAA query was made');
--- no_error_log
[error]
[warn]
