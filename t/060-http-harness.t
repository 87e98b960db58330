# The http harness itself (issue 17), with nginx's own static `server` lines and no
# module: t/lib/http_backend.py and Test::Nginx::Consul::Http. These are the baselines
# the consul_upstream http tests (061-064) are compared to: round robin by count,
# upstream keepalive counted at the backends, a killed backend passed over, memcached_pass,
# a reload under load without a failed request.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::Http;
use Time::HiRes qw(time sleep);

# "Without keepalive" on nginx >= 1.29.7, which keeps upstream connections by default.
our $NO_KEEPALIVE = nginx_keepalive_by_default() ? 'keepalive 0;' : '';

run_tests();

__DATA__

=== TEST 1: the backends alone: who answered, connection and request numbers, stats
--- no_module
--- http_backends: 8081 8082 127.0.0.2-3:8090 memcached:11311
--- check
my $r = http_get('/x', port => 8081);
is($r->{status}, 200, 'direct request answered');
is($r->{backend}, '127.0.0.1:8081', 'body names the listener');
is($r->{headers}{'x-backend'}, '127.0.0.1:8081', 'X-Backend header');
is(http_get('/x', host => '127.0.0.3', port => 8090)->{backend}, '127.0.0.3:8090', 'range 127.0.0.2-3:8090');
is(http_get('/x?status=503', port => 8082)->{status}, 503, 'status=503 answers 503');
# five requests over one keep-alive connection: one connection, req=1..5
my $c = Test::Nginx::Consul::Http::_client(keepalive => 1, port => 8082);
my @r = map { $c->('/k') } 1 .. 5;
is(join(' ', map { $_->{req} } @r), '1 2 3 4 5', 'req counts requests on the connection');
is(scalar(keys %{{ map { $_->{conn} => 1 } @r }}), 1, 'one connection');
my $s = backend_stats('8082');
is("$s->{accepted} $s->{requests} $s->{open}", '2 6 1', 'stats: accepted 2, requests 6, open 1 (the kept one)');
is(backend_stats('127.0.0.2:8090')->{accepted}, 0, 'other listeners untouched');
--- no_error_log
[error]



=== TEST 2: kill resets connections and refuses new ones; start listens again; slow; hold/release
--- no_module
--- http_backends: 8081 8082
--- check
my $c = Test::Nginx::Consul::Http::_client(keepalive => 1, port => 8081);
is($c->('/a')->{req}, 1, 'a kept connection');
http_backend_kill('8081');
ok(!backend_stats('8081')->{listening}, 'stats: not listening');
my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => 8081, Proto => 'tcp', Timeout => 1);
ok(!$sock, 'connect refused after kill');
my $r = http_get('/b', port => 8081);
like($r->{error}, qr/connect/, 'http_get reports the refused connection');
http_backend_start('8081');
is(http_get('/c', port => 8081)->{status}, 200, 'answers again after start');
http_backend_slow('8082', 400);
my $t0 = time;
is(http_get('/d', port => 8082)->{status}, 200, 'slow backend answers');
cmp_ok(time - $t0, '>=', 0.35, 'slow 400 ms: the answer took 400 ms or more');
http_backend_slow('8082', 0);
http_backend_hold('8082');
my $pid = fork() // die;
if (!$pid) { $Test::Nginx::Util::InSubprocess = 1; http_get('/held', port => 8082, timeout => 10); POSIX::_exit(0) }
ok(wait_until(sub { backend_stats('8082')->{held} == 1 }, 5), 'one request held');
ok(!waitpid($pid, POSIX::WNOHANG()), 'held request not answered');
http_backend_release();
ok(wait_until(sub { waitpid($pid, POSIX::WNOHANG()) == $pid }, 5), 'released: answered');
is(backend_stats('8082')->{held}, 0, 'none held');
--- no_error_log
[error]



=== TEST 3: the backend process goes when the process that started it is killed
--- no_module
--- http_backends: 8081
--- check
my $pidfile = "$TmpDir/orphan.pid";
my $mid = fork() // die;
if (!$mid) {
    $Test::Nginx::Util::InSubprocess = 1;
    my $kid = fork() // die;
    if (!$kid) {
        open STDERR, '>', '/dev/null';
        exec 'python3', "$Test::Nginx::Consul::RootDir/t/lib/http_backend.py",
             '--control', "$TmpDir/orphan.sock", '18099';
    }
    open my $fh, '>', $pidfile; print $fh "$kid\n"; close $fh;
    sleep 60;
    POSIX::_exit(0);
}
ok(wait_until(sub { -S "$TmpDir/orphan.sock" }, 10), 'orphan-to-be is ready');
my $kid = do { open my $fh, '<', $pidfile; <$fh> } + 0;
ok(kill(0, $kid), "backend process $kid runs");
kill 'KILL', $mid;
waitpid($mid, 0);
ok(wait_until(sub { !kill(0, $kid) || Test::Nginx::Consul::_cmdline($kid) eq '' }, 5),
   'the backend process exited with its parent');
--- no_error_log
[error]



=== TEST 4: round robin over 2 backends is 50:50 by count; without keepalive one connection per request
--- no_module
--- http_backends: 8081 8082
--- http_config eval
"upstream api {
    server 127.0.0.1:8081;
    server 127.0.0.1:8082;
    $::NO_KEEPALIVE
}"
--- config
location /api/ { proxy_pass http://api; }
--- check
is_tally(http_tally(20, '/api/'), {8081 => 10, 8082 => 10}, '10:10 over 20 requests');
is_tally(http_tally(20, '/api/', keepalive => 1), {8081 => 10, 8082 => 10}, '10:10 over one client connection');
for my $p (8081, 8082) {
    my $s = backend_stats($p);
    is("$s->{accepted}/$s->{requests}", '20/20', "$p: one upstream connection per request");
}
--- no_error_log
[error]



=== TEST 5: keepalive 16 + HTTP/1.1: 200 requests over one client connection, one upstream connection per backend
--- no_module
--- workers: 2
--- http_backends: 8081 8082
--- http_config
upstream api {
    server 127.0.0.1:8081;
    server 127.0.0.1:8082;
    keepalive 16;
}
--- config
location /api/ {
    proxy_pass http://api;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
}
--- check
is_tally(http_tally(200, '/api/', keepalive => 1), {8081 => 100, 8082 => 100}, '100:100 over one client connection');
for my $p (8081, 8082) {
    my $s = backend_stats($p);
    is($s->{requests}, 100, "$p: 100 requests");
    is($s->{accepted}, 1, "$p: over 1 connection (one worker served the client)");
}
--- no_error_log
[error]



=== TEST 6: keepalive 16, 2 workers, a new client connection per request: at most 2 (workers x 1) connections per backend
--- no_module
--- workers: 2
--- http_backends: 8081 8082
--- http_config
upstream api {
    server 127.0.0.1:8081;
    server 127.0.0.1:8082;
    keepalive 16;
}
--- config
location /api/ {
    proxy_pass http://api;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
}
--- check
my $t = http_tally(200, '/api/');
is($t->{fail} // 0, 0, 'no failure');
is(($t->{8081} // 0) + ($t->{8082} // 0), 200, '200 answered');
for my $p (8081, 8082) {
    my $s = backend_stats($p);
    cmp_ok($s->{accepted}, '<=', 2, "$p: at most 2 connections for $s->{requests} requests");
    cmp_ok($s->{accepted}, '>=', 1, "$p: used");
}
--- no_error_log
[error]



=== TEST 7: the same without keepalive: one upstream connection per request
--- no_module
--- workers: 2
--- http_backends: 8081 8082
--- http_config eval
"upstream api {
    server 127.0.0.1:8081;
    server 127.0.0.1:8082;
    $::NO_KEEPALIVE
}"
--- config
location /api/ {
    proxy_pass http://api;
}
--- check
my $t = http_tally(200, '/api/', keepalive => 1);
is($t->{fail} // 0, 0, 'no failure');
for my $p (8081, 8082) {
    my $s = backend_stats($p);
    is($s->{accepted}, $s->{requests}, "$p: $s->{requests} requests, as many connections");
}
is(backend_stats(8081)->{requests} + backend_stats(8082)->{requests}, 200, '200 requests in all');
--- no_error_log
[error]



=== TEST 8: a killed backend is passed over (proxy_next_upstream error), with cached connections to it
--- no_module
--- http_backends: 8081 8082
--- http_config
upstream api {
    server 127.0.0.1:8081;
    server 127.0.0.1:8082;
    keepalive 16;
}
--- config
location /api/ {
    proxy_pass http://api;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_next_upstream error;
    add_header X-Upstream-Addr $upstream_addr always;
}
--- check
is_tally(http_tally(10, '/api/', keepalive => 1), {8081 => 5, 8082 => 5}, 'both used, connections cached');
http_backend_kill('8082');
my $seen;
my $t = {};
for (1 .. 20) {
    my $r = http_get('/api/');
    $seen = $r->{headers}{'x-upstream-addr'} if ($r->{headers}{'x-upstream-addr'} // '') =~ /,/;
    $t->{ $r->{status} == 200 ? $r->{backend_port} : 'fail' }++;
}
is_tally($t, {8081 => 20}, 'all 20 answered by 8081');
is($seen, '127.0.0.1:8082, 127.0.0.1:8081', '$upstream_addr shows the try on 8082, then 8081');
--- error_log eval
main::killed_peer_error(8082)



=== TEST 9: memcached_pass to the memcached listener, with keepalive
--- no_module
--- http_backends: memcached:11311
--- http_config
upstream mc {
    server 127.0.0.1:11311;
    keepalive 4;
}
--- config
location /mc {
    set $memcached_key $arg_k;
    memcached_pass mc;
}
--- check
is_tally(http_tally(10, '/mc?k=one', keepalive => 1), {11311 => 10}, '10 answers from the memcached listener');
my $s = backend_stats('11311');
is("$s->{accepted}/$s->{requests}", '1/10', 'one connection for 10 gets (keepalive)');
is(http_get('/mc?k=missing1')->{status}, 404, 'a miss is a 404');
--- request
GET /mc?k=two
--- response_body_like: ^127\.0\.0\.1 11311 conn=1 req=12$
--- no_error_log
[error]



=== TEST 10: a client sending all the time sees no failure across a reload (keepalive both sides)
--- no_module
--- workers: 2
--- http_backends: 8081 8082
--- http_config
upstream api {
    server 127.0.0.1:8081;
    server 127.0.0.1:8082;
    keepalive 16;
}
--- config
location /api/ {
    proxy_pass http://api;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
}
--- check
my $bg = http_tally_background('/api/', keepalive => 1, delay => 0.005);
sleep 1;
ok(nginx_reload(), 'reloaded');
sleep 1;
my $t = $bg->();
is($t->{fail} // 0, 0, 'no failed request across the reload')
    or diag($Test::Nginx::Consul::LastFailure);
cmp_ok($t->{8081} // 0, '>', 10, '8081 served');
cmp_ok($t->{8082} // 0, '>', 10, '8082 served');
diag("reload under load: " . tally_str($t)) if $ENV{TEST_NGINX_VERBOSE};
--- no_error_log
[error]



=== TEST 11: the background client counts failures: a backend killed under proxy_next_upstream off gives 502s
--- no_module
--- workers: 2
--- http_backends: 8081 8082
--- http_config
upstream api {
    server 127.0.0.1:8081;
    server 127.0.0.1:8082;
}
--- config
location /api/ {
    proxy_pass http://api;
    proxy_next_upstream off;
}
--- check
my $bg = http_tally_background('/api/', delay => 0.005);
sleep 0.5;
http_backend_kill('8082');
sleep 0.5;
my $t = $bg->();
cmp_ok($t->{fail} // 0, '>=', 1, 'the background client counts the 502s of the dead backend');
like($Test::Nginx::Consul::LastFailure, qr/status 502/, 'and says why');
--- error_log eval
qr/connect\(\) failed \(111: Connection refused\)/



=== TEST 12: "# emerg:" in --- http_config expects nginx's error with http.conf:LINE
--- no_module
--- http_config
upstream api {
    server 127.0.0.1:8081 weight=0;   # emerg: invalid parameter "weight=0"
}
