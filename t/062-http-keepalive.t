# Spec for issue 17 (consul_upstream in http upstreams; design-17.md §4 and §8, its
# "041-http-keepalive"): written before the implementation. Until it lands every block
# with consul_upstream fails at once with nginx -t's `"consul_upstream" directive is
# not allowed here`.
#
# Upstream keepalive with discovered peers, counted at the backends: reuse with
# `keepalive 16`, in every directive order nginx accepts (with and without a method),
# the same as nginx's own upstreams in those orders; a deregistered peer gets no request
# although the cache still holds a connection to it, which keepalive_timeout closes; a
# peer that comes back reuses it; a killed peer with cached connections is passed over;
# nginx >= 1.29.7's keepalive by default (nginx_keepalive_by_default()), `keepalive 0`.
# The static baselines are in t/060-http-harness.t.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::Http;
use Time::HiRes qw(time sleep);

our $NAME = 'api.service.yunlu_office.consul';
our $KEEP = "proxy_http_version 1.1;\n    proxy_set_header Connection \"\";";
our $LOCATION = "location /api/ {\n    proxy_pass http://api;\n    $KEEP\n}\n";

# Directive orders in an upstream block (design-17.md §4), "C" standing for the
# consul_upstream line or, in the static twin, the server lines.
our @ORDERS = (
    ['C', 'keepalive 16;'],
    ['keepalive 16;', 'C'],
    ['least_conn;', 'C', 'keepalive 16;'],
    ['C', 'least_conn;', 'keepalive 16;'],
    ['keepalive 16;', 'C', 'least_conn;'],
    ['hash $request_uri;', 'keepalive 16;', 'C'],
    ['C', 'hash $request_uri consistent;', 'keepalive 16;'],
    ['keepalive 16;', 'C', 'hash $request_uri;'],
    ['keepalive 16;', 'hash $request_uri;', 'C'],
    ['random two least_conn;', 'keepalive 16;', 'C'],
    ['C', 'random;', 'keepalive 16;'],
    ['ip_hash;', 'C', 'keepalive 16;'],
);

sub order_text { my ($i, $c) = @_; join ' ', map { $_ eq 'C' ? $c // 'consul_upstream;' : $_ } @{ $ORDERS[$i] } }

# upstreams s0.. (static servers) and, with $consul, c0.. (consul_upstream), in every order
sub orders_http_config {
    my $consul = shift;
    my $text = '';
    for my $i (0 .. $#ORDERS) {
        for my $kind ($consul ? ('s', 'c') : ('s')) {
            my $c = $kind eq 's'
                ? "server 127.0.0.1:8081;\n    server 127.0.0.1:8082;"
                : 'consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;';
            $text .= "upstream $kind$i {\n" . join('', map { "    " . ($_ eq 'C' ? $c : $_) . "\n" } @{ $ORDERS[$i] }) . "}\n";
        }
    }
    return $text;
}

sub orders_config {
    my $consul = shift;
    return join '', map {
        my $i = $_;
        map { "location /$_$i/ {\n    proxy_pass http://$_$i;\n    $KEEP\n}\n" } $consul ? ('s', 'c') : ('s');
    } 0 .. $#ORDERS;
}

# N requests over one client connection; what the backends saw meanwhile:
# { acc => connections accepted, req => requests, used => backends that got requests, tally }
sub reuse_of {
    my ($path, $n) = @_;
    my $b = backend_stats();
    my $t = http_tally($n, $path, keepalive => 1);
    my $a = backend_stats();
    my %r = (acc => 0, req => 0, used => 0, tally => $t);
    for my $k (keys %$a) {
        my $dr = $a->{$k}{requests} - $b->{$k}{requests};
        $r{acc} += $a->{$k}{accepted} - $b->{$k}{accepted};
        $r{req} += $dr;
        $r{used}++ if $dr;
    }
    return \%r;
}

our %STATIC_REUSE;    # order index => 1|0, measured by TEST 2 on nginx alone

add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value('http_backends', '8081 8082 8083') unless defined $block->http_backends;
    $block->set_value('config', $LOCATION) unless defined $block->config;
});

run_tests();

__DATA__

=== TEST 1: keepalive 16 + HTTP/1.1: 200 requests, one upstream connection per backend
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    keepalive 16;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
http_backends_reset();
is_tally(http_tally(200, '/api/', keepalive => 1), {8081 => 100, 8082 => 100}, '100:100');
for my $p (8081, 8082) {
    my $s = backend_stats($p);
    is("$s->{accepted}/$s->{requests}", '1/100', "$p: 100 requests over 1 connection");
}
--- no_error_log
[error]
[warn]



=== TEST 2: nginx alone (no module): which directive orders reuse connections in its own upstreams
The reference for TEST 3: nginx's own balancers in the same orders (keepalive before a
method line is replaced by it, with nginx's "load balancing method redefined").
--- no_module
--- http_config eval
main::orders_http_config(0)
--- config eval
main::orders_config(0)
--- check
for my $i (0 .. $#::ORDERS) {
    my $r = ::reuse_of("/s$i/", 40);
    is($r->{tally}{fail} // 0, 0, "s$i: no failure");
    $::STATIC_REUSE{$i} = $r->{acc} < $r->{req} ? 1 : 0;
    diag(sprintf "nginx alone, %-50s %d connections for %d requests", ::order_text($i, 'server...;'), $r->{acc}, $r->{req})
        if $ENV{TEST_NGINX_VERBOSE};
}
is($::STATIC_REUSE{0}, 1, 'the plain order reuses');



=== TEST 3: every directive order nginx accepts reuses connections to discovered peers; static upstreams as without the module
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config eval
main::orders_http_config(1)
--- config eval
main::orders_config(1)
--- check
ok(wait_for_log(qr/2 peers from/, 10, scalar @::ORDERS), 'every consul upstream has its peers');
for my $i (0 .. $#::ORDERS) {
    my $o = ::order_text($i);
    my $c = ::reuse_of("/c$i/", 40);
    is($c->{tally}{fail} // 0, 0, "c$i ($o): no failure");
    is($c->{acc}, $c->{used}, "c$i ($o): one connection per backend used ($c->{req} requests)");
    my $s = ::reuse_of("/s$i/", 40);
    is($s->{acc} < $s->{req} ? 1 : 0, $::STATIC_REUSE{$i}, "s$i ($o): static servers reuse as without the module");
}
--- no_error_log
[error]



=== TEST 4: a deregistered peer gets no request while its cached connection stays open; back, it reuses that connection
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    keepalive 16;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
http_tally(20, '/api/', keepalive => 1);
my $a = backend_stats(8081);
is("$a->{accepted} $a->{open}", '1 1', '8081: one connection, cached');
consul_deregister($::NAME, '127.0.0.1:8081');
ok(wait_for_log(qr/consul http upstream "api": 1 peer from/, 5), 'deregistration seen');
is_tally(http_tally(200, '/api/', keepalive => 1), {8082 => 200}, 'every request to 8082');
my $s = backend_stats(8081);
is($s->{requests}, $a->{requests}, '8081 got no request');
is($s->{open}, 1, 'although its idle connection is still cached (until keepalive_timeout)');
consul_register($::NAME, '127.0.0.1:8081');
ok(wait_for_log(qr/consul http upstream "api": 2 peers from/, 5, 2), 're-registration seen');
is_tally(http_tally(20, '/api/', keepalive => 1), {8081 => 10, 8082 => 10}, 'served again');
is(backend_stats(8081)->{accepted}, 1, 'over the connection cached before');
--- no_error_log
[error]



=== TEST 5: keepalive_timeout 2s closes the idle connection to a deregistered peer
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    keepalive 16;
    keepalive_timeout 2s;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
http_tally(20, '/api/', keepalive => 1);
my $before = backend_stats(8081)->{requests};
consul_deregister($::NAME, '127.0.0.1:8081');
ok(wait_for_log(qr/consul http upstream "api": 1 peer from/, 5), 'deregistration seen');
my $bg = http_tally_background('/api/', keepalive => 1, delay => 0.05);
ok(wait_until(sub { backend_stats(8081)->{open} == 0 }, 15), "8081's idle connection closed");
my $t = $bg->();
is_tally($t, {8082 => $t->{8082}}, 'meanwhile every request to 8082');
is(backend_stats(8081)->{requests}, $before, '8081 got no request');
--- no_error_log
[error]



=== TEST 6: a killed peer with cached connections is passed over (proxy_next_upstream error): no failure
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    keepalive 16;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
is_tally(http_tally(10, '/api/', keepalive => 1), {8081 => 5, 8082 => 5}, 'both used, connections cached');
http_backend_kill(8082);
is_tally(http_tally(20, '/api/', keepalive => 1), {8081 => 20}, 'all 20 answered by 8081');
--- error_log
connect() failed (111: Connection refused)



=== TEST 7: two workers, a new client connection per request: at most 2 (workers x 1) upstream connections per backend
--- workers: 2
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    keepalive 16;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
http_backends_reset();
my $t = http_tally(200, '/api/');
is(($t->{fail} // 0), 0, 'no failure');
for my $p (8081, 8082) {
    my $s = backend_stats($p);
    cmp_ok($s->{accepted}, '<=', 2, "$p: at most 2 connections for $s->{requests} requests");
}
--- no_error_log
[error]



=== TEST 8: no keepalive line: reuse exactly when nginx's own upstream reuses (nginx >= 1.29.7: keepalive by default)
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream api_static {
    server 127.0.0.1:8081;
    server 127.0.0.1:8082;
}
--- config eval
"$::LOCATION" . $::LOCATION =~ s{/api/}{/static/}r =~ s{http://api;}{http://api_static;}r
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
my $want = nginx_keepalive_by_default();
my $s = ::reuse_of('/static/', 40);
my $c = ::reuse_of('/api/', 40);
is($s->{acc} < $s->{req} ? 1 : 0, $want, "nginx's own upstream: " . ($want ? 'reuse' : 'a connection per request')
   . " on nginx " . nginx_version_num());
is($c->{acc} < $c->{req} ? 1 : 0, $want, 'consul_upstream: the same');
if ($want) { cmp_ok($c->{acc}, '<=', 2, "consul_upstream: $c->{acc} connections for 40 requests") }
else { is($c->{acc}, 40, 'consul_upstream: a connection per request') }
--- no_error_log
[error]



=== TEST 9: keepalive 0 (nginx >= 1.29.7) turns the default off
--- skip_eval: 1: !Test::Nginx::Consul::Http::nginx_keepalive_by_default()
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    keepalive 0;
}
--- check
ok(http_wait_for_backends([8081, 8082], path => '/api/'), 'both discovered');
my $c = ::reuse_of('/api/', 40);
is($c->{acc}, 40, 'a connection per request');
--- no_error_log
[error]
