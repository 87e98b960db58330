# consul_upstream behind every *_pass but proxy_pass (issue 17: "every `*_pass` that
# takes an upstream"; proxy_pass is 061-064's): fastcgi_pass, grpc_pass, uwsgi_pass,
# scgi_pass, memcached_pass, each to two discovered backends that speak its protocol
# (t/lib/http_backend.py's fastcgi:/h2c:/uwsgi:/scgi:/memcached: listeners). Each
# block checks what a user sees: the body comes from a backend, the requests are shared
# by both (counted by the body and at the backends), a deregistered backend gets no
# further request; with `keepalive` (fastcgi with fastcgi_keep_conn on, grpc, memcached)
# one upstream connection per backend carries every request, and the deregistered
# backend's cached connection stays idle. scgi and uwsgi cannot keep connections
# (nginx's modules close them): one connection per request there.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::Http;

# The same backends in every block (reset between blocks): two per protocol.
add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value('http_backends', 'fastcgi:127.0.0.1:9001-9002 h2c:127.0.0.1:9011-9012 '
        . 'uwsgi:127.0.0.1:9021-9022 scgi:127.0.0.1:9031-9032 memcached:127.0.0.1:11311-11312')
        unless defined $block->http_backends;
});

# Why a block cannot run on this nginx ('' when it can): its *_pass is not compiled in
# (grpc_pass needs the http_v2 module; the others are in every default build). Said
# once per directive (Test::Nginx evaluates --- skip_eval twice).
my %Missing;
sub missing_directive {
    my $directive = shift;
    return $Missing{$directive} //= do {
        my ($rc, $out) = Test::Nginx::Consul::nginx_t(
            "events { }\nhttp {\nserver {\nlisten 127.0.0.1:1;\nlocation / { $directive }\n}\n}\n");
        my ($emerg) = $out =~ /(\[emerg\].*)/;
        my $why = $rc == 0 ? '' : "this nginx has no \"$directive\": " . ($emerg // $out);
        Test::More::diag("skipped: $why") if $why;
        $why;
    };
}

# The checks of every block. %o: service (the upstream's name too), path, ports (the
# two backends), keepalive (1: one upstream connection per backend, nginx has 1 worker).
sub check_pass {
    my %o = @_;
    my ($p1, $p2) = @{ $o{ports} };
    my $name = "$o{service}.service.yunlu_office.consul";
    ok(http_wait_for_backends([$p1, $p2], path => $o{path}), 'both backends discovered and answering');

    my $r = http_get($o{path});
    like("$r->{status} $r->{body}", qr/^200 127\.0\.0\.1 (?:$p1|$p2) conn=\d+ req=\d+\n\z/,
         'the body is the backend\'s');

    my $before = backend_stats();
    is_tally(http_tally(20, $o{path}, keepalive => 1), {$p1 => 10, $p2 => 10}, '10:10 by the bodies');
    my $after = backend_stats();
    my %got = map { $_ => $after->{"127.0.0.1:$_"}{requests} - $before->{"127.0.0.1:$_"}{requests} } $p1, $p2;
    is("$got{$p1} $got{$p2}", '10 10', '10:10 counted at the backends');

    my ($s1, $s2) = map { backend_stats($_) } $p1, $p2;
    if ($o{keepalive}) {
        is("$s1->{accepted} $s2->{accepted}", '1 1', "one connection per backend carried $s1->{requests} + $s2->{requests} requests");
    } else {
        is("$s1->{accepted} $s2->{accepted}", "$s1->{requests} $s2->{requests}", 'one connection per request');
    }

    consul_deregister($name, "127.0.0.1:$p1");
    ok(wait_for_log(qr/consul http upstream "$o{service}": 1 peer from /, 10), "$p1 deregistered");
    is_tally(http_tally(20, $o{path}, keepalive => 1), {$p2 => 20}, "every request to $p2");
    my $gone = backend_stats($p1);
    is($gone->{requests}, $s1->{requests}, "$p1 got no further request");
    is($gone->{open}, 1, "although its idle connection is still cached") if $o{keepalive};
    return 1;
}

run_tests();

__DATA__

=== TEST 1: fastcgi_pass, fastcgi_keep_conn on and keepalive: two discovered FastCGI backends
--- dns
instance fcgi.service.yunlu_office.consul 127.0.0.1:9001
instance fcgi.service.yunlu_office.consul 127.0.0.1:9002
--- http_config
upstream fcgi {
    consul_upstream fcgi.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    keepalive 8;
}
--- config
location /fcgi/ {
    fastcgi_pass fcgi;
    fastcgi_keep_conn on;
    fastcgi_param SCRIPT_NAME $uri;
}
--- check
check_pass(service => 'fcgi', path => '/fcgi/', ports => [9001, 9002], keepalive => 1);
--- no_error_log
[error]



=== TEST 2: grpc_pass (h2c) and keepalive: two discovered HTTP/2 backends
--- skip_eval: 1: main::missing_directive('grpc_pass grpc://127.0.0.1:1;')
--- dns
instance h2.service.yunlu_office.consul 127.0.0.1:9011
instance h2.service.yunlu_office.consul 127.0.0.1:9012
--- http_config
upstream h2 {
    consul_upstream h2.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    keepalive 8;
}
--- config
location /h2/ {
    grpc_pass grpc://h2;
}
--- check
check_pass(service => 'h2', path => '/h2/', ports => [9011, 9012], keepalive => 1);
--- no_error_log
[error]



=== TEST 3: uwsgi_pass: two discovered uwsgi backends
--- dns
instance uw.service.yunlu_office.consul 127.0.0.1:9021
instance uw.service.yunlu_office.consul 127.0.0.1:9022
--- http_config
upstream uw {
    consul_upstream uw.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- config
location /uw/ {
    uwsgi_pass uw;
    uwsgi_param PATH_INFO $uri;
}
--- check
check_pass(service => 'uw', path => '/uw/', ports => [9021, 9022]);
--- no_error_log
[error]



=== TEST 4: scgi_pass: two discovered SCGI backends
--- dns
instance sc.service.yunlu_office.consul 127.0.0.1:9031
instance sc.service.yunlu_office.consul 127.0.0.1:9032
--- http_config
upstream sc {
    consul_upstream sc.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- config
location /sc/ {
    scgi_pass sc;
    scgi_param REQUEST_URI $request_uri;
}
--- check
check_pass(service => 'sc', path => '/sc/', ports => [9031, 9032]);
--- no_error_log
[error]



=== TEST 5: memcached_pass and keepalive: two discovered memcached backends
--- dns
instance mc.service.yunlu_office.consul 127.0.0.1:11311
instance mc.service.yunlu_office.consul 127.0.0.1:11312
--- http_config
upstream mc {
    consul_upstream mc.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    keepalive 8;
}
--- config
location /mc/ {
    set $memcached_key $uri;
    memcached_pass mc;
}
--- check
check_pass(service => 'mc', path => '/mc/', ports => [11311, 11312], keepalive => 1);
--- no_error_log
[error]
