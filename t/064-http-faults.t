# Spec for issue 17 (consul_upstream in http upstreams; design-17.md §8, its
# "043-http-faults"): written before the implementation. Until it lands every block
# fails at once with nginx -t's `"consul_upstream" directive is not allowed here`.
#
# Faults under a steady stream of requests (a client sending all the time over a
# keep-alive connection, two workers, upstream keepalive): Consul down across three
# reloads, a backend killed, a deregistration. The static baselines (0 failures across
# a reload, a killed backend passed over) are in t/060-http-harness.t.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::Http;
use Time::HiRes qw(time sleep);

our $NAME = 'api.service.yunlu_office.consul';
our $LOCATION = <<'_EOC_';
location /api/ {
    proxy_pass http://api;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_next_upstream error timeout;
}
_EOC_

add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value('http_backends', '8081 8082') unless defined $block->http_backends;
    $block->set_value('config', $LOCATION) unless defined $block->config;
    $block->set_value('workers', 2) unless defined $block->workers;
});

run_tests();

__DATA__

=== TEST 1: Consul down, three reloads 1 s apart under load: no failed request, the kept set serves
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
my $bg = http_tally_background('/api/', keepalive => 1, delay => 0.005);
sleep 0.5;
dns_stop();
for my $n (1 .. 3) {
    ok(nginx_reload(), "reload $n with Consul down");
    sleep 1;
}
my $t = $bg->();
is($t->{fail} // 0, 0, 'no failed request (' . tally_str($t) . ')')
    or diag($Test::Nginx::Consul::LastFailure);
cmp_ok($t->{8081} // 0, '>', 10, '8081 kept serving');
cmp_ok($t->{8082} // 0, '>', 10, '8082 kept serving');
--- no_error_log
[emerg]



=== TEST 2: a backend killed under load (proxy_next_upstream error): at most the request in flight fails
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
my $bg = http_tally_background('/api/', keepalive => 1, delay => 0.005);
sleep 0.5;
http_backend_kill(8082);
my $after = backend_stats(8081)->{requests};
sleep 1;
my $t = $bg->();
cmp_ok($t->{fail} // 0, '<=', 1, 'at most one failed request (' . tally_str($t) . ')')
    or diag($Test::Nginx::Consul::LastFailure);
cmp_ok(backend_stats(8081)->{requests} - $after, '>', 10, '8081 took the requests after the kill');
--- error_log eval
main::killed_peer_error(8082)



=== TEST 3: a deregistration under load: no failed request, none to the peer once it left
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
my $bg = http_tally_background('/api/', keepalive => 1, delay => 0.005);
sleep 0.5;
consul_deregister($::NAME, '127.0.0.1:8082');
ok(wait_for_log(qr/consul http upstream "api": 1 peer from/, 5), 'deregistration seen');
sleep 0.2;
my $left = backend_stats(8082)->{requests};
sleep 1;
is(backend_stats(8082)->{requests}, $left, 'no request to 8082 once it left');
my $t = $bg->();
is($t->{fail} // 0, 0, 'no failed request (' . tally_str($t) . ')')
    or diag($Test::Nginx::Consul::LastFailure);
--- no_error_log
[error]
