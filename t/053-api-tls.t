# api=https://: the agent verified with the OpenSSL nginx is linked with, against
# api_ca= (a CA and a certificate made for the run: 127.0.0.1 and localhost), by
# IP address or by host name; what a wrong CA, a wrong name, or plain HTTP on
# either side says — once per streak, never [crit] as nginx's own SSL layer would.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::Api;

our $PORT = $ENV{TEST_NGINX_API_TLS_PORT};
$ENV{TEST_NGINX_OTHER_CA} = api_cert() . '/other-ca.pem';

run_tests();

__DATA__

=== TEST 1: https with api_ca=, by IP address and by host name (localhost: ::1 refused, then 127.0.0.1)
--- consul_api
instance redis 127.0.0.1:6380
--- consul_api_tls
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=https://127.0.0.1:$TEST_NGINX_API_TLS_PORT api_ca=$TEST_NGINX_API_CA;
}
upstream named {
    consul_upstream service=redis api=https://localhost:$TEST_NGINX_API_TLS_PORT api_ca=$TEST_NGINX_API_CA;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass named;
}
--- check
ok(wait_for_backends([6380]), 'discovered over https (by IP address)');
ok(wait_for_backends([6380], port => 1990), 'and by host name');
ok(wait_until(sub { grep { $_->{index} > 0 } @{ health_requests('redis') } }, 5), 'blocking over TLS');
api_register('redis', '127.0.0.1:6381');
ok(wait_for_backends([6380, 6381], first_set => 0), 'a change follows');
ok(wait_for_backends([6380, 6381], port => 1990, first_set => 0), '... on both');
# The master asked each line once before it forked the workers, over TLS, on
# connections of its own (closed): the first two requests, without index.
my $r = health_requests('redis');
is(scalar(grep { $_->{index} == 0 } @$r[0, 1]), 2, "the master's requests over https");
my %master = map { $_->{conn} => 1 } @$r[0, 1];
my %conns = map { $_->{conn} => 1 } grep { !$master{ $_->{conn} } } @$r[2 .. $#$r];
ok(keys(%conns) <= 3, scalar(keys %conns) . ' connections for two lines: kept alive');
--- no_error_log
[error]
[warn]



=== TEST 2: a certificate the CA did not sign, plain HTTP on either side
--- consul_api
instance redis 127.0.0.1:6380
--- consul_api_tls
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream service=redis api=https://127.0.0.1:$TEST_NGINX_API_TLS_PORT api_ca=$TEST_NGINX_OTHER_CA;
}
upstream plain_to_tls {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_TLS_PORT timeout=1s;
}
upstream tls_to_plain {
    consul_upstream service=redis api=https://127.0.0.1:1984 api_ca=$TEST_NGINX_API_CA;
}
--- check
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": resolving \S+ failed: certificate of 127\.0\.0\.1:$PORT not accepted \((self-signed certificate in certificate chain|unable to get local issuer certificate|certificate signature failure)\)/, 5),
   'an unknown CA: the certificate is refused, with OpenSSL\'s reason');
ok(wait_for_log(qr/consul upstream "plain_to_tls": resolving \S+ failed: 127\.0\.0\.1:$PORT(?: closed the connection without answering|: Connection reset by peer| did not answer within 1s)/, 5),
   'http:// to a TLS port');
ok(wait_for_log(qr/consul upstream "tls_to_plain": resolving \S+ failed: TLS handshake with 127\.0\.0\.1:1984 failed \(.+\)/, 5),
   'https:// to nginx\'s plain http port');
unlike(error_log_text(), qr/SSL_do_handshake|\[crit\]/, 'nothing from nginx\'s own SSL layer');
is(log_count(qr/consul upstream "redis": resolving/), 1, 'once per streak');
--- no_error_log
[error]
[crit]



=== TEST 3: the certificate names 127.0.0.1 and localhost, not 127.0.0.2: a mismatch is refused
--- setup
Test::Nginx::Consul::Api::api_start(init => "instance redis 127.0.0.1:6380\n", tls => 1, addr => '127.0.0.2');
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream service=redis api=https://127.0.0.2:$TEST_NGINX_API_TLS_PORT api_ca=$TEST_NGINX_API_CA;
}
--- check
$ENV{TEST_NGINX_API_CA} //= api_ca();
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": resolving \S+ failed: certificate of 127\.0\.0\.2:$PORT not accepted \(IP address mismatch\)/, 5),
   'an IP address the certificate does not name');
--- no_error_log
[error]
[crit]
