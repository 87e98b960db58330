# api= lines and Consul's ACLs: the token from token_file (read by the master at
# start and on reload, so a worker running as another user needs no access),
# sent as X-Consul-Token and nowhere else — not in the log, the status page or
# the state file; 403 and ACL-filtered answers are errors under on_error, with
# Consul's words. Also: the state file of an API line, two workers, reloads.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::Api;
use Time::HiRes qw(time sleep);

our $API = "http://127.0.0.1:$ENV{TEST_NGINX_API_PORT}";
our $Q = "$API/v1/health/service/redis";
our $TOKEN = '3f1a9c2e-5b7d-4e8f-a0b1-c2d3e4f5a6b7';
our $OTHER = '9e8d7c6b-5a49-4838-2716-0504f3e2d1c0';

sub write_token {
    my ($text, $mode) = @_;
    my $f = "$TmpDir/consul.token";
    open my $fh, '>', $f or die "$f: $!";
    print $fh $text;
    close $fh;
    chmod $mode // 0600, $f;
    return $f;
}

$ENV{TEST_NGINX_TOKEN_FILE} = "$TmpDir/consul.token";
write_token("$TOKEN\n");

sub http_body {
    my $path = shift;
    return HTTP::Tiny->new(timeout => 5)->get("http://127.0.0.1:$Test::Nginx::Util::ServerPort$path")->{content};
}

run_tests();

__DATA__

=== TEST 1: default-deny ACLs: the token from token_file is sent, and shown nowhere else
--- consul_api
instance redis 127.0.0.1:6380
instance redis 127.0.0.1:6381
acl token=3f1a9c2e-5b7d-4e8f-a0b1-c2d3e4f5a6b7:redis
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT token_file=$TEST_NGINX_TOKEN_FILE state=$TEST_NGINX_CONSUL_TMP/acl.state;
}
--- config
location = /status { consul_upstream_status; }
location = /metrics { consul_upstream_status prometheus; }
--- check
ok(wait_for_backends([6380, 6381]), 'the token reads the service');
my $r = health_requests('redis');
is(scalar(grep { ($_->{token} // '') ne $TOKEN } @$r), 0, 'every request carries X-Consul-Token');
my $status = http_body('/status');
my $metrics = http_body('/metrics');
like($status, qr/"source":"api"/, 'the status page has the line');
unlike($status . $metrics, qr/\Q$TOKEN\E|3f1a9c2e/, 'the token is not in the status page or the metrics');
ok(wait_until(sub { -s "$TmpDir/acl.state" }, 5), 'the state file is written');
open my $fh, '<', "$TmpDir/acl.state" or die;
my $state = do { local $/; <$fh> };
like($state, qr/\Q$Q\E/, 'the state file names the line by its URL');
unlike($state, qr/3f1a9c2e|token/i, 'the state file has no token');
unlike(error_log_text(), qr/3f1a9c2e/, 'nor the error log (debug level)');
--- no_error_log
[error]
[warn]



=== TEST 2: an unknown token: 403 ACL not found, Consul's words in the warning and the status; on_error keeps or drops
--- consul_api
instance redis 127.0.0.1:6380
instance redis 127.0.0.1:6381
acl token=3f1a9c2e-5b7d-4e8f-a0b1-c2d3e4f5a6b7:redis
--- backends: 6380 6381 6382
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT token_file=$TEST_NGINX_TOKEN_FILE;
}
upstream failing {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT token_file=$TEST_NGINX_TOKEN_FILE on_error=fail;
    server 127.0.0.1:6382;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass failing;
}
--- config
location = /status { consul_upstream_status; }
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
ok(wait_for_backends([6380, 6381], port => 1990), 'both upstreams');
# the token is deleted in Consul: the next request is refused (a change ends
# the request that waits; a policy change alone does not)
api_acl(tokens => { $OTHER => ['redis'] });
api_check('redis', '127.0.0.1:6380', 'passing');
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": resolving \Q$Q\E failed: ACL: 127\.0\.0\.1:\d+ answered 403: ACL not found, keeping 2 peers/, 5),
   'the warning says ACL and gives Consul\'s text');
like(error_log_text(), qr/consul upstream "failing": resolving \Q$Q\E failed: ACL: 127\.0\.0\.1:\d+ answered 403: ACL not found, dropping 2 peers/,
     'on_error=fail drops');
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'on_error=keep: the set serves');
ok(wait_for_backends([6382], only => 1, port => 1990, first_set => 0), 'on_error=fail: the static server serves');
my $l = status_line('redis');
is($l->{streak}{kind}, 'error', 'the status: an error streak');
like($l->{streak}{reason}, qr/^ACL: 127\.0\.0\.1:\d+ answered 403: ACL not found$/, '... an ACL error, as such');
is(log_count(qr/consul upstream "redis": resolving/), 1, 'one warning for the streak');
# the token is back: the line asks again at the pace of failures, without a change
api_acl(tokens => { $TOKEN => ['redis'] });
ok(wait_for_log(qr/\[notice\] .*consul upstream "redis": agent recovered after \d+ failed attempts/, 15), 'recovery is said');
ok(wait_for_backends([6380, 6381], only => 1, port => 1990, first_set => 0), 'the dropped line serves again');



=== TEST 3: a token that may not read the service: Consul filters everything out silently; that is an ACL error, not "no instances"
--- consul_api
instance redis 127.0.0.1:6380
acl token=3f1a9c2e-5b7d-4e8f-a0b1-c2d3e4f5a6b7:other anonymous=
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT token_file=$TEST_NGINX_TOKEN_FILE;
}
upstream anonymous {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
--- check
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": resolving \Q$Q\E failed: ACL: 127\.0\.0\.1:\d+ left every instance out: the token may not read service "redis" \(X-Consul-Results-Filtered-By-ACLs\)/, 5),
   'with a token lacking service:read');
ok(wait_for_log(qr/\[warn\] .*consul upstream "anonymous": resolving \Q$Q\E failed: ACL: .*left every instance out/, 5),
   'without a token (anonymous, default deny)');
unlike(error_log_text(), qr/has no healthy instances/, 'not called "no healthy instances"');
api_acl(tokens => { $TOKEN => ['redis'] });
ok(wait_for_log(qr/consul upstream "redis": 1 peer from/, 15), 'read allowed: served');



=== TEST 4: token_file is read again on reload; a bad one fails the reload and the old token goes on
--- consul_api
instance redis 127.0.0.1:6380
acl token=3f1a9c2e-5b7d-4e8f-a0b1-c2d3e4f5a6b7:redis token=9e8d7c6b-5a49-4838-2716-0504f3e2d1c0:redis
--- backends: 6380 6381
--- workers: 2
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT token_file=$TEST_NGINX_TOKEN_FILE;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
write_token("$OTHER\n");
ok(nginx_reload(), 'reload');
api_register('redis', '127.0.0.1:6381');
ok(wait_for_backends([6380, 6381], first_set => 0), 'the new workers follow changes');
ok(wait_until(sub { my $r = health_requests('redis'); ($r->[-1]{token} // '') eq $OTHER }, 5),
   'requests after the reload carry the new token');
write_token("");
my $mark = log_mark();
nginx_reload();
ok(wait_until(sub { error_log_since($mark) =~ /invalid token in token_file "\Q$ENV{TEST_NGINX_TOKEN_FILE}\E": empty/ }, 5),
   'an empty token file fails the reload, said in nginx\'s words');
api_deregister('redis', '127.0.0.1:6381');
ok(wait_until(sub { my $t = tally(6); !$t->{6381} }, 5), 'the running configuration goes on');
is(health_requests('redis')->[-1]{token}, $OTHER, '... with its token');
write_token("$TOKEN\n");
--- no_error_log
[warn]



=== TEST 5: the state file of an API line: a restart while the agent is down serves the saved set
--- consul_api
instance redis 127.0.0.1:6380
instance redis 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT state=$TEST_NGINX_CONSUL_TMP/api-restart.state;
}
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
ok(wait_until(sub { -s "$TmpDir/api-restart.state" }, 5), 'saved');
api_stop();
ok(nginx_restart(), 'nginx restarted');
ok(wait_for_log(qr/consul upstream "redis": 2 peers from state file "\Q$TmpDir\E\/api-restart\.state" \(generation 1\)/, 5),
   'the set from the state file');
is_tally(tally(10), {6380 => 5, 6381 => 5}, 'serves while the agent is down');
ok(wait_for_log(qr/\[warn\] .*consul upstream "redis": resolving \Q$Q\E failed: cannot connect to 127\.0\.0\.1:\d+ \(Connection refused\), keeping 2 peers/, 5),
   'the agent is down: said once');
--- no_error_log
[error]



=== TEST 6: two workers: one process watches, over one connection; the other only reads the zone
--- consul_api
instance redis 127.0.0.1:6380
--- backends: 6380 6381
--- workers: 2
--- stream_listen_options
reuseport
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
api_register('redis', '127.0.0.1:6381');
ok(wait_for_backends([6380, 6381], first_set => 0), 'every worker follows');
# The first request is the master's, before it forked the workers, on a
# connection of its own (closed); worker 0's go on one connection.
my $r = health_requests('redis');
is($r->[0]{index}, 0, "the master's request");
my %conns = map { $_->{conn} => 1 } @$r[1 .. $#$r];
is(scalar(keys %conns), 1, 'one connection to the agent');
ok(!$conns{ $r->[0]{conn} }, "not the master's");
--- no_error_log
[error]
[warn]



=== TEST 7: reloads that add and remove an API line: the removed line's peers leave at once
--- consul_api
instance redis 127.0.0.1:6380
instance other 127.0.0.1:6381
--- backends: 6380 6381
--- workers: 2
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
--- check
ok(wait_for_backends([6380]), 'one line');
my $two = <<'_EOC_';
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
    consul_upstream service=other api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
_EOC_
my $one = <<'_EOC_';
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
_EOC_
stream_config_set($two);
ok(nginx_reload(), 'reload adding a line');
ok(wait_for_backends([6380, 6381], first_set => 0), 'both lines serve');
stream_config_set($one);
ok(nginx_reload(), 'reload removing it');
ok(wait_for_backends([6380], only => 1, first_set => 0, timeout => 3), 'within 3 s only the configured line serves');
like(error_log_text(), qr/consul upstream "redis": dropping 1 peer of removed "consul_upstream" lines, 1 peer in all/, 'said so');
--- no_error_log
[error]
[warn]



=== TEST 8: workers running as another user: the master read the token file, which they cannot
--- setup
$Test::Nginx::Util::WorkerUser = 'nobody nogroup';
write_token("$TOKEN\n", 0600);
--- consul_api
instance redis 127.0.0.1:6380
acl token=3f1a9c2e-5b7d-4e8f-a0b1-c2d3e4f5a6b7:redis
--- backends: 6380
--- workers: 1
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT token_file=$TEST_NGINX_TOKEN_FILE;
}
--- check
my ($w) = nginx_worker_pids();
my $uid = (stat("/proc/$w"))[4];
is($uid, scalar getpwnam('nobody'), 'the worker runs as nobody');
ok(wait_for_backends([6380]), 'discovered with the token');
is(health_requests('redis')->[-1]{token}, $TOKEN, 'the token the master read');
$Test::Nginx::Util::WorkerUser = undef;
--- no_error_log
[error]
[warn]
