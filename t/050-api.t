# api= lines: discovery from Consul's HTTP API (/v1/health/service/NAME) with
# blocking queries, against the Consul API double (t/lib/consul_api_double.py):
# configuration errors, the instances and their weights, health, tags, filter,
# datacenter, blocking-query rules as the agent sees them, DNS and API lines in
# one upstream, host-name addresses, a 3,000-instance service, the status page.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::Api;
use Time::HiRes qw(time sleep);

our $API = "http://127.0.0.1:$ENV{TEST_NGINX_API_PORT}";
our $Q = "$API/v1/health/service/redis";

# nginx -t on a stream block with one upstream line; returns its output.
sub t_line {
    my ($line, $extra) = @_;
    $extra //= '';
    my ($rc, $out) = nginx_t(<<"_EOC_");
load_module \$TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream redis {
        consul_upstream $line;
    }
$extra
    server { listen 127.0.0.1:1986; proxy_pass redis; }
}
_EOC_
    return ($rc, $out);
}

run_tests();

__DATA__

=== TEST 1: nginx -t: API parameters, and those of the other kind, in nginx's words
--- config
--- check
my $tok = "$TmpDir/token";
open my $fh, '>', $tok or die;
print $fh "  6d7e8f90-aaaa-bbbb-cccc-0123456789ab\n";
close $fh;
my $empty = "$TmpDir/empty-token";
open $fh, '>', $empty or die;
close $fh;
my $ca = api_ca();
my ($rc, $out) = t_line("service=redis tag=a tag=b datacenter=dc1 api=https://localhost:8501 token_file=$tok only_passing \"filter=Service.Meta.zone == a\" api_ca=$ca wait=1m timeout=2s interval=500ms resolver=127.0.0.1:8600 udp on_empty=fail on_error=fail max_stale=1m zone=128k state=$TmpDir/api.state max_fails=2 fail_timeout=5s slow_start=10s max_conns=3");
is($rc, 0, 'every API parameter together') or diag $out;
($rc, $out) = t_line("service=redis api=http://127.0.0.1:8500");
is($rc, 0, 'the shortest API line') or diag $out;
my @cases = (
    ['service=redis api=http://127.0.0.1:8500 domain=consul', '"domain=" cannot be used with "api="'],
    ['redis.service.consul api=http://127.0.0.1:8500', 'a query name and "api=" cannot both be given'],
    ['api=http://127.0.0.1:8500', '"api=" needs "service="'],
    ['service=redis api=http://127.0.0.1:8500 udp', '"udp" needs "resolver=" on an "api=" line'],
    ['redis.service.consul token_file=/x', '"token_file=" needs "api="'],
    ['redis.service.consul only_passing', '"only_passing" needs "api="'],
    ['redis.service.consul wait=1m', '"wait=" needs "api="'],
    ['redis.service.consul filter=x', '"filter=" needs "api="'],
    ['service=redis tag=a tag=b', 'duplicate parameter "tag"'],
    ['service=redis api=ftp://127.0.0.1', 'invalid API address "ftp://127.0.0.1"'],
    ['service=redis api=http://::1:8500', 'invalid API address "http://::1:8500"'],
    ['service=redis api=http://127.0.0.1 wait=11m', 'invalid parameter "wait=11m": from 1s to 10m is allowed'],
    ['service=redis api=http://127.0.0.1 api=http://127.0.0.2', 'duplicate parameter "api"'],
    ['service=a/b api=http://127.0.0.1', 'invalid parameter "service=a/b"'],
    ['service=redis api=http://127.0.0.1 api_ca=/x.pem', '"api_ca=" needs an "https://" address in "api="'],
    ['service=redis api=http://127.0.0.1 token_file=/nonexistent/token', 'cannot read token_file "/nonexistent/token" (No such file or directory)'],
    ["service=redis api=http://127.0.0.1 token_file=$empty", "invalid token in token_file \"$empty\": empty"],
    ['service=redis api=https://127.0.0.1 api_ca=/nonexistent/ca.pem', qr/cannot load certificates from "\/nonexistent\/ca\.pem" \(.+\)/],
    ['service=redis api=http://no-such-agent.invalid:8500', 'host not found in "api=http://no-such-agent.invalid:8500"'],
);
for my $c (@cases) {
    my ($line, $msg) = @$c;
    ($rc, $out) = t_line($line);
    my $re = ref $msg ? $msg : qr/\Q$msg\E/;
    ok($rc != 0 && $out =~ /\[emerg\] $re in \S+nginx\.conf:5$/m, "refused: $line") or diag $out;
}
# the token never shows, not even in an error about its file
($rc, $out) = t_line("service=redis api=http://127.0.0.1 token_file=$tok foo");
unlike($out, qr/6d7e8f90/, 'the token is not in nginx -t output');
# upstream-wide parameters belong on the first line, whichever its source
($rc, $out) = t_line("service=redis api=http://127.0.0.1:8500 zone=64k state=$TmpDir/w.state max_fails=3 fail_timeout=5s slow_start=1s max_conns=2;\n        consul_upstream redis.service.consul");
is($rc, 0, 'upstream-wide parameters on a first API line, a DNS line after it') or diag $out;
for my $w ('zone=64k', 'state=/tmp/w.state', 'max_fails=3', 'fail_timeout=5s', 'slow_start=1s', 'max_conns=2') {
    for my $first ('redis.service.consul', 'service=cache api=http://127.0.0.1:8500') {
        ($rc, $out) = t_line("$first;\n        consul_upstream service=redis api=http://127.0.0.1:8500 $w");
        ok($rc != 0 && $out =~ /\[emerg\] invalid parameter "\Q$w\E": it belongs on the first "consul_upstream" line of the upstream in \S+nginx\.conf:6$/m,
           "$w on an API line after \"$first\": refused") or diag $out;
    }
}
# two identical API lines are one line twice
($rc, $out) = t_line("service=redis api=http://127.0.0.1:8500;\n        consul_upstream service=redis api=http://127.0.0.1:8500");
like($out, qr/"consul_upstream" directive is duplicate/, 'the same API line twice') or diag $out;



=== TEST 2: instances, Weights.Passing, Service.Address before Node.Address, the start and change lines
--- consul_api
instance redis 127.0.0.1:6380 weight=3
instance redis 127.0.0.1:6381 node=web2 node_addr=10.255.255.1 svc_addr=127.0.0.1
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
is_tally(tally(40), {6380 => 30, 6381 => 10}, 'Weights.Passing 3 and 1: 30:10');
like(error_log_text(), qr/\[info\] .*consul upstream "redis": watching \Q$Q\E \(blocking queries, wait=300000ms\), zone=256k holds \d+ peers/,
     'the start line');
like(error_log_text(), qr/\[notice\] .*consul upstream "redis": 2 peers from \Q$Q\E \(generation 1\)/, 'the set line');
--- no_error_log
[error]
[warn]



=== TEST 3: blocking queries: index carried, wait sent, one keep-alive connection, a change in one round trip
--- consul_api
instance redis 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
ok(wait_until(sub { @{ health_requests('redis') } >= 2 }, 5), 'the second request blocks');
my $r = health_requests('redis');
# The first request is the master's, before it forks the workers (a
# connection of its own, closed); worker 0 goes on from its answer.
is($r->[0]{index}, 0, 'the first request has no index (answers at once)');
is($r->[0]{query}, '', '... nor wait');
my $first = api_state()->{index};
ok($r->[1]{index} >= 1 && $r->[1]{index} <= $first, "then index=$r->[1]{index} (the answer's X-Consul-Index)");
like($r->[1]{wait}, qr/^(\d+)ms$/, "and wait=$r->[1]{wait}");
my ($w) = $r->[1]{wait} =~ /^(\d+)/;
ok($w >= 281_250 && $w <= 300_000, "wait within 1/16 below 5m ($w ms)");
isnt($r->[1]{conn}, $r->[0]{conn}, "worker 0's on a connection of its own");
ok(!defined $r->[0]{token}, 'no token without token_file');
# a registration reaches nginx within one round trip
my $t0 = time;
api_register('redis', '127.0.0.1:6381');
ok(wait_for_backends([6381], timeout => 5, first_set => 0), 'the new instance gets connections');
my $dt = time - $t0;
ok($dt < 2, sprintf('within %.3f s (blocking query; no interval)', $dt));
$r = health_requests('redis');
ok(@$r >= 3, scalar(@$r) . ' requests');
is(scalar(grep { $_->{conn} != $r->[1]{conn} } @$r[1 .. $#$r]), 0, "every request of worker 0 on one connection");
ok($r->[-1]{index} > $r->[1]{index}, 'the next request waits on the new index');
api_deregister('redis', '127.0.0.1:6381');
ok(wait_until(sub { my $t = tally(6); !$t->{6381} }, 5), 'a deregistration too');
--- no_error_log
[error]
[warn]



=== TEST 4: nothing changes: one request per wait, no more
--- consul_api
instance redis 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT wait=2s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
api_clear_requests();
sleep 7;
my $n = @{ health_requests('redis') };
ok($n >= 3 && $n <= 5, "$n requests in 7 s with wait=2s (one per wait: 3 to 5)");
my $r = health_requests('redis');
is(scalar(grep { $_->{index} == 0 } @$r), 0, 'each one blocks (index > 0)');
is(log_count(qr/peers? from/), 1, 'an unchanged answer is not a change');
--- no_error_log
[error]
[warn]



=== TEST 5: health: any critical check leaves an instance out, node checks and maintenance too; warning weighs Weights.Warning
--- consul_api
instance redis 127.0.0.1:6380 weight=3 warning_weight=1
instance redis 127.0.0.1:6381 weight=1
instance redis 127.0.0.2:6390 status=critical
instance redis 127.0.0.3:6390 node_status=critical
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
--- config
location = /status { consul_upstream_status; }
--- check
ok(wait_for_backends([6380, 6381], only => 1), 'critical instances (service or node check) are out');
is(status_line()->{peers}, 2, 'two peers');
is_tally(tally(40), {6380 => 30, 6381 => 10}, 'passing: Weights.Passing');
api_check('redis', '127.0.0.1:6380', 'warning');
ok(wait_until(sub { my $t = tally(20); ($t->{6380} // 0) == 10 }, 5), 'warning: Weights.Warning (1:1)');
api_node_check('127.0.0.1', 'critical');
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": \Q$Q\E has no healthy instances \(empty answer\), keeping 2 peers/, 5),
   'a failing node check takes every instance of the node out: nothing healthy, the set is kept');
api_node_check('127.0.0.1', 'passing');
ok(wait_for_backends([6380, 6381], first_set => 0), 'passing again: both serve');
# Consul's maintenance mode: a critical check _service_maintenance:ID
Test::Nginx::Consul::Api::_put('/register', {
    Node => 'node-127.0.0.1', Address => '127.0.0.1',
    Checks => [{ CheckID => '_service_maintenance:redis-127.0.0.1-6380', ServiceID => 'redis-127.0.0.1-6380', Status => 'critical' }],
});
ok(wait_for_backends([6381], only => 1, first_set => 0), 'maintenance takes 6380 out');
--- no_error_log
[error]



=== TEST 6: only_passing leaves warning instances out (Consul's passing parameter)
--- consul_api
instance redis 127.0.0.1:6380
instance redis 127.0.0.1:6381 status=warning
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT only_passing;
}
--- check
ok(wait_for_backends([6380], only => 1), 'only the passing instance');
ok(!grep({ $_->{query} !~ /(^|&)passing=1(&|$)/ } @{ health_requests('redis') }), 'passing=1 sent every time');
api_check('redis', '127.0.0.1:6381', 'passing');
ok(wait_for_backends([6380, 6381], first_set => 0), 'passing again: back');
--- no_error_log
[error]
[warn]



=== TEST 7: tags all required, filter= URL-encoded, datacenter=
--- consul_api
instance redis 127.0.0.1:6380 tags=primary,v2
instance redis 127.0.0.1:6381 tags=primary
instance redis 127.0.0.1:6382 tags=v2
--- backends: 6380 6381 6382
--- stream_config
upstream tagged {
    consul_upstream service=redis tag=primary tag=v2 datacenter=yunlu_office api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
upstream filtered {
    consul_upstream service=redis "filter=v2 in Service.Tags" api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
upstream redis {
    consul_upstream service=redis datacenter=elsewhere api=http://127.0.0.1:$TEST_NGINX_API_PORT;
    server 127.0.0.1:6381;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass tagged;
}
server {
    listen 127.0.0.1:1991;
    proxy_pass filtered;
}
--- check
ok(wait_for_backends([6380], only => 1, port => 1990), 'tag=primary tag=v2: both required');
ok(wait_for_backends([6380, 6382], only => 1, port => 1991), 'filter: v2 in Service.Tags');
my @q = map { $_->{query} } @{ health_requests('redis') };
ok((grep { /^dc=yunlu_office&tag=primary&tag=v2(&|$)/ } @q), 'dc and both tags sent') or diag Test::More::explain \@q;
ok((grep { /(^|&)filter=v2%20in%20Service\.Tags(&|$)/ } @q), 'the filter URL-encoded') or diag Test::More::explain \@q;
ok(wait_for_log(qr/consul upstream "redis": resolving \Q${API}\E\/v1\/health\/service\/redis\?dc=elsewhere failed: 127\.0\.0\.1:\d+ answered 500: No path to datacenter/, 5),
   'an unknown datacenter: Consul\'s 500 and its text');
is_tally(tally(4), {6381 => 4}, 'the static server serves meanwhile');



=== TEST 8: index rules: backwards resets to 0, 0 is never blocked on, no index is paced
--- consul_api
instance redis 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT interval=1s;
}
--- config
location = /status { consul_upstream_status; }
--- check
ok(wait_for_backends([6380]), 'discovered');
ok(wait_until(sub { @{ health_requests('redis') } >= 2 }, 5), 'blocking');
my $high = api_state()->{index};
# a snapshot restore: the service's index goes back
api_clear_requests();
api_set_index('redis', 3);
api_register('other', '127.0.0.1:6399');   # wakes the blocked query up (any write)
api_set_index('redis', 3);
ok(wait_until(sub { grep { $_->{index} == 0 } @{ health_requests('redis') } }, 5),
   'an index lower than the one sent: the next request starts over without index');
ok(wait_until(sub { grep { $_->{index} == 3 } @{ health_requests('redis') } }, 5),
   'then it blocks on the new index') or diag Test::More::explain health_requests('redis');
is(status_line()->{index}, 3, 'the status shows the index');
# X-Consul-Index: 0 (a Consul bug of old): block on 1, do not spin
api_clear_requests();
api_mode('index_zero');
api_register('redis', '127.0.0.1:6380', weight => 2);
ok(wait_until(sub { grep { $_->{index} == 1 } @{ health_requests('redis') } }, 5), 'index 0 answered: the next request blocks on 1');
sleep 2;
my $n = @{ health_requests('redis') };
ok($n <= 4, "$n requests in 2+ s: no tight loop");
# no X-Consul-Index at all: every answer comes at once; the pace is one per interval
api_mode('no_index');
api_clear_requests();
sleep 4;
$n = @{ health_requests('redis') };
ok($n >= 2 && $n <= 7, "$n requests in 4 s without an index (paced: 2 at once, then 1 per interval)");
api_mode('ok');
--- no_error_log
[error]
[warn]



=== TEST 9: an empty answer keeps the set (on_empty=keep), or drops it (on_empty=fail)
--- consul_api
instance redis 127.0.0.1:6380
instance redis 127.0.0.1:6381
--- backends: 6380 6381 6382
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
upstream failing {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT on_empty=fail;
    server 127.0.0.1:6382;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass failing;
}
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
ok(wait_for_backends([6380, 6381], port => 1990), 'both upstreams');
api_node_check('127.0.0.1', 'critical');    # both instances' node: one change
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": \Q$Q\E has no healthy instances \(empty answer\), keeping 2 peers/, 5), 'keep: said once');
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'keep: the last set serves');
ok(wait_for_backends([6382], only => 1, port => 1990, first_set => 0), 'fail: the static server serves');
like(error_log_text(), qr/consul upstream "failing": \Q$Q\E has no healthy instances \(empty answer\), dropping 2 peers/, 'fail: said so');
api_node_check('127.0.0.1', 'passing');
api_deregister('redis', '127.0.0.1:6380');
ok(wait_for_backends([6381], only => 1, first_set => 0), 'instances again: they serve');
is(log_count(qr/consul upstream "redis": .*has no healthy instances/), 1, 'one warning per streak');



=== TEST 10: DNS and API lines in one upstream; the status says which is which
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- consul_api
instance redis 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
--- config
location = /status { consul_upstream_status; }
location = /metrics { consul_upstream_status prometheus; }
--- check
ok(wait_for_backends([6380, 6381]), 'both lines serve');
my ($dns, $u) = status_line('redis', qr/\.consul$/);
my ($api) = status_line('redis', qr/^http/);
is($dns->{source}, 'dns', 'the DNS line');
is($api->{source}, 'api', 'the API line');
is($api->{api}, $API, '... its agent');
is($api->{query}, $Q, '... its query');
is_deeply($api->{resolvers}, [], '... no resolver');
ok($api->{index} > 0, "... its index ($api->{index})");
is($api->{set}, 'live', '... live');
is($api->{lookups}{ok} >= 1 ? 1 : 0, 1, '... lookups counted');
my %by = map { $_->{address} => $_->{query} } @{ $u->{peers} };
is($by{'127.0.0.1:6381'}, $Q, 'the peer names its line');
my $m = HTTP::Tiny->new->get("http://127.0.0.1:$Test::Nginx::Util::ServerPort/metrics")->{content};
like($m, qr/^nginx_consul_line_index\{upstream="redis",protocol="stream",query="\Q$Q\E"\} $api->{index}$/m, 'nginx_consul_line_index');
like($m, qr/^nginx_consul_line_info\{upstream="redis",protocol="stream",query="\Q$Q\E",source="api",resolvers="",transport="tcp",api="\Q$API\E"\} 1$/m, 'line_info of the API line');
like($m, qr/^nginx_consul_line_info\{upstream="redis",protocol="stream",query="redis\.service\.yunlu_office\.consul",source="dns",/m, 'line_info of the DNS line');
--- no_error_log
[error]
[warn]



=== TEST 11: host-name addresses: resolved through resolver=, else left out with a warning
--- dns
db1.example.consul. IN A 127.0.0.1
--- consul_api
instance redis 127.0.0.1:6380 svc_addr=db1.example.consul
instance redis 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream unresolved {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass unresolved;
}
--- check
ok(wait_for_log(qr/consul upstream "redis": 2 peers from/, 10), 'the host name is resolved');
ok(wait_for_backends([6380, 6381]), 'with resolver=: both serve');
ok(wait_for_backends([6381], only => 1, port => 1990), 'without: left out');
like(error_log_text(), qr/\[warn\] .*consul upstream "unresolved": ignored instances of the answer: 1 with a host name and no "resolver=" to resolve it \(db1\.example\.consul\)/,
     'with a warning');
is(log_count(qr/ignored instances of the answer/), 1, 'once, not per answer');
--- no_error_log
[error]



=== TEST 12: a 3,000-instance service fits a zone sized for it; a small zone says what it needs
--- consul_api
instance redis 127.0.0.1:20000-22999
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT zone=1m;
}
upstream small {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT zone=32k;
}
--- config
location = /status { consul_upstream_status; }
--- check
ok(wait_for_log(qr/consul upstream "redis": 3000 peers from \Q$Q\E \(generation 1\)/, 20), '3,000 peers in one answer');
my ($l, $u) = status_line('redis');
is($u->{peers_total}, 3000, 'all in the zone');
ok(wait_for_log(qr/\[error\] .*consul upstream "small": 3000 peers do not fit in zone=32k \(max \d+ peers\), zone=\d+k needed/, 10),
   'the small zone: capacity and the size needed');
--- no_error_log
[warn]



=== TEST 13: a host name the resolver answers without an address (REFUSED, NXDOMAIN) leaves only its instance out, as an SRV target does
BIND has recursion off: a name outside its zones is REFUSED, as a Consul agent
without recursors answers.
--- dns
db1.example.consul. IN A 127.0.0.1
--- consul_api
instance redis 127.0.0.1:6380 svc_addr=db1.example.consul
instance redis 127.0.0.2:6390 svc_addr=db2.example.org
instance redis 127.0.0.3:6390 svc_addr=gone.example.consul
instance redis 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
like(`dig \@127.0.0.1 -p $ENV{TEST_NGINX_DNS_PORT} +tcp A db2.example.org.`, qr/status: REFUSED/, 'BIND refuses the foreign name');
ok(wait_for_log(qr/consul upstream "redis": 2 peers from/, 10), 'the other two are the set');
ok(wait_for_backends([6380, 6381], only => 1), 'and serve');
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": ignored instances of the answer: 2 with a host name that has no address \((?:db2\.example\.org|gone\.example\.consul)\)/, 2),
   'a warning names them');
--- no_error_log
[error]
resolving



=== TEST 14: Weights.Warning = 0: an instance in warning is weight 0 (round robin, least_conn): it serves only when no weighted peer can; the status shows 0
--- consul_api
instance redis 127.0.0.1:6380 warning_weight=0
instance redis 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT fail_timeout=2s;
}
upstream least {
    least_conn;
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT fail_timeout=2s;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass least;
}
--- config
location = /status { consul_upstream_status; }
location = /metrics { consul_upstream_status prometheus; }
--- check
ok(wait_for_backends([6380, 6381]), 'round robin: both passing, both serve');
ok(wait_for_backends([6380, 6381], port => 1990), 'least_conn: both serve');
my $weight = sub {
    my ($up) = @_;
    my (undef, $u) = status_line($up);
    my ($p) = grep { $_->{address} eq '127.0.0.1:6380' } @{ $u->{peers} || [] };
    return $p ? $p->{weight} : -1;
};
api_check('redis', '127.0.0.1:6380', 'warning');
ok(wait_until(sub { $weight->('redis') == 0 && $weight->('least') == 0 }, 5),
   'warning with Weights.Warning = 0: weight 0 in both upstreams\' zones');
my $m = HTTP::Tiny->new->get("http://127.0.0.1:$Test::Nginx::Util::ServerPort/metrics")->{content};
like($m, qr/^nginx_consul_peer_weight\{upstream="least",protocol="stream",peer="127\.0\.0\.1:6380"\} 0$/m, 'Prometheus: weight 0');
is_tally(tally(20), {6381 => 20}, 'round robin: the weighted peer takes every connection while it can');
is_tally(tally(20, port => 1990), {6381 => 20}, 'least_conn: the same');
my $held = hold_connections(3, port => 1990);
is(join(' ', map { $_->[1] } @$held), '6381 6381 6381', 'least_conn: open connections do not move a weight-0 peer up');
close_held($held);
backend_stop(6381);
is_tally(tally(8), {6380 => 8}, 'the weighted peer down: the weight-0 peer serves (round robin)');
is_tally(tally(8, port => 1990), {6380 => 8}, '... and least_conn');
backend_start(6381);
api_check('redis', '127.0.0.1:6380', 'passing');
ok(wait_until(sub { $weight->('redis') == 1 && $weight->('least') == 1 }, 5), 'passing again: weight 1');
ok(wait_for_backends([6380, 6381], first_set => 0), 'both serve again');
--- error_log
connect() failed (111: Connection refused)



=== TEST 15: upstream-wide parameters of a first API line hold for every line's peers
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- consul_api
instance redis 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT zone=64k max_conns=1 max_fails=2 fail_timeout=5s;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- config
location = /status { consul_upstream_status; }
--- check
ok(wait_for_backends([6380, 6381]), 'both lines serve');
my (undef, $u) = status_line('redis');
is_deeply([@$u{qw(max_conns max_fails fail_timeout_ms)}], [1, 2, 5000], 'max_conns, max_fails and fail_timeout of the API line');
my ($cap) = error_log_text() =~ /consul upstream "redis": watching \S+ \(blocking queries, wait=\d+ms\), zone=64k holds (\d+) peers/;
ok($cap && $u->{capacity} == $cap, "zone=64k of the API line (holds $u->{capacity} peers)");
my $held = hold_connections(2);
is(join(' ', sort map { $_->[1] } @$held), '6380 6381', 'max_conns=1: one connection on each line\'s peer');
my ($ap, $why) = probe_backend();
ok(!defined $ap, "a third finds every peer full ($why)");
close_held($held);
ok(wait_for_log(qr/no live upstreams while connecting to upstream/, 2), 'nginx says so');
--- error_log
no live upstreams while connecting to upstream
