# Spec for issue 17 (consul_upstream in http upstreams; design-17.md §8, its
# "042-http-methods"): written before the implementation. Until it lands every block
# fails at once with nginx -t's `"consul_upstream" directive is not allowed here`.
#
# nginx's http balancing methods over discovered peers, two workers, the http port with
# reuseport (a new connection may reach either worker): least_conn counted by both
# workers together (held requests), hash stable in both workers, hash consistent moving
# only the newcomer's share, random, random two least_conn, ip_hash with realip (IPv4 by
# /24, IPv6 whole address), the method line before and after consul_upstream.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::Http;
use Time::HiRes qw(time sleep);

$Test::Nginx::Util::ReusePort = 1;

our $NAME = 'api.service.yunlu_office.consul';
our $LOCATION = <<'_EOC_';
location /api/ {
    proxy_pass http://api;
    add_header X-Worker $pid always;
}
location = /pid {
    return 200 "$pid";
}
_EOC_

add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value('http_backends', '8081 8082 8083 8084') unless defined $block->http_backends;
    $block->set_value('config', $LOCATION) unless defined $block->config;
    $block->set_value('workers', 2) unless defined $block->workers;
});

# N requests held at the backends at once (each waits until the previous one is held);
# then released. Returns ({port => held}, [responses]).
sub held_spread {
    my ($n, @ports) = @_;
    http_backend_hold($_) for @ports;
    my @done;
    for my $i (1 .. $n) {
        push @done, http_get_background('/api/');
        wait_until(sub { my $a = backend_stats(); my $h = 0; $h += $a->{"127.0.0.1:$_"}{held} for @ports; $h == $i }, 5)
            or last;
    }
    my $a = backend_stats();
    my %held = map { $_ => $a->{"127.0.0.1:$_"}{held} } @ports;
    http_backend_release();
    return (\%held, [map { $_->() } @done]);
}

# key => port for the keys, each asked on a new connection (either worker)
sub key_map {
    my ($keys, $path) = @_;
    my %m;
    for my $k (@$keys) {
        my $r = http_get(($path // '/api/') . "?k=$k");
        $m{$k} = $r->{status} == 200 ? $r->{backend_port} : "status $r->{status}";
    }
    return \%m;
}

sub ip_map {
    my ($ips, $path) = @_;
    my %m;
    for my $ip (@$ips) {
        my $r = http_get($path // '/api/', headers => { 'X-Real-IP' => $ip });
        $m{$ip} = $r->{status} == 200 ? $r->{backend_port} : "status $r->{status}";
    }
    return \%m;
}

# Client connections sorted by the worker that accepted them (asked with /pid; a
# keep-alive client connection stays with its worker), until two workers have at
# least N each: ([socket...], [socket...]).
sub conns_of_two_workers {
    my $n = shift;
    my %by;
    for (1 .. 200) {
        my $s = http_connect();
        http_send($s, '/pid');
        my $r = http_recv($s);
        die "GET /pid: $r->{status} $r->{error}\n" unless $r->{status} == 200;
        push @{ $by{ $r->{body} } }, $s;
        my @full = grep { @{ $by{$_} } >= $n } keys %by;
        return map { $by{$_} } @full[0, 1] if @full >= 2;
    }
    die "no two workers with $n connections each\n";
}

sub total_held {
    my $a = backend_stats();
    my $h = 0;
    $h += $_->{held} for values %$a;
    return $h;
}

sub has_realip { `$Test::Nginx::Consul::NginxBinary -V 2>&1` =~ /--with-http_realip_module/ ? 1 : 0 }

run_tests();

__DATA__

=== TEST 1: least_conn: both workers see each other's open requests
Worker A sends 2 requests that stay open (on two peers), then worker B one: counted
together it goes to the third peer (1 1 1); a worker that counted only its own would
take the first peer again (2 1 0), as nginx's least_conn without a zone does.
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
instance api.service.yunlu_office.consul 127.0.0.1:8083
--- http_config
upstream api {
    least_conn;
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(http_wait_for_backends([8081, 8082, 8083], path => '/api/'), 'all discovered');
my ($wa, $wb) = ::conns_of_two_workers(2);
http_backend_hold($_) for 8081 .. 8083;
my @sent;
for my $s (@$wa[0 .. 1], $wb->[0]) {
    http_send($s, '/api/');
    push @sent, $s;
    ok(wait_until(sub { ::total_held() == @sent }, 5), scalar(@sent) . ' requests held');
}
my $st = backend_stats();
my $held = join ' ', sort { $b <=> $a } map { $st->{"127.0.0.1:$_"}{held} } 8081 .. 8083;
is($held, '1 1 1', 'the fewest open requests, counted across workers');
http_backend_release();
my @done = map { http_recv($_) } @sent;
is(join(' ', map { $_->{status} } @done), '200 200 200', 'all answered once released');
my %w = map { ($_->{headers}{'x-worker'} // '?') => 1 } @done;
is(scalar(keys %w), 2, 'by both workers');
--- no_error_log
[error]



=== TEST 2: hash $arg_k: a key keeps its peer, whichever worker takes it
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
instance api.service.yunlu_office.consul 127.0.0.1:8083
--- http_config
upstream api {
    hash $arg_k;
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_log(qr/3 peers from/, 10), 'all discovered');
my @keys = map { "key$_" } 1 .. 30;
my $m1 = ::key_map(\@keys);
my $m2 = ::key_map(\@keys);
is_deeply($m2, $m1, 'the same peer for every key, twice over');
my %used = map { $_ => 1 } values %$m1;
is(join(' ', sort keys %used), '8081 8082 8083', 'the keys spread over every peer');
--- no_error_log
[error]



=== TEST 3: hash $arg_k consistent: a newcomer takes only its share of the keys
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
instance api.service.yunlu_office.consul 127.0.0.1:8083
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    hash $arg_k consistent;
}
--- check
ok(wait_for_log(qr/3 peers from/, 10), 'three discovered');
my @keys = map { "key$_" } 1 .. 80;
my $before = ::key_map(\@keys);
consul_register($::NAME, '127.0.0.1:8084');
ok(wait_for_log(qr/4 peers from/, 5), 'a fourth joins');
my $after = ::key_map(\@keys);
my @moved = grep { $before->{$_} ne $after->{$_} } @keys;
is(join(' ', grep { $after->{$_} ne '8084' } @moved), '', 'every key that moved went to the newcomer');
cmp_ok(scalar(@moved), '>', 0, 'the newcomer took some keys');
cmp_ok(scalar(@moved), '<=', 40, scalar(@moved) . ' of 80 keys moved (a quarter expected)');
--- no_error_log
[error]



=== TEST 4: random: every peer used, none more than half the time
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
instance api.service.yunlu_office.consul 127.0.0.1:8083
--- http_config
upstream api {
    random;
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(http_wait_for_backends([8081, 8082, 8083], path => '/api/'), 'all discovered');
my $t = http_tally(60, '/api/');
is($t->{fail} // 0, 0, 'no failure');
for my $p (8081 .. 8083) {
    cmp_ok($t->{$p} // 0, '>', 0, "$p used");
    cmp_ok($t->{$p} // 0, '<=', 30, "$p not more than half (" . tally_str($t) . ")");
}
--- no_error_log
[error]



=== TEST 5: random two least_conn: never more than 3 of 6 held requests at one peer
Of two peers drawn, the one with fewer open requests: a peer at 3 is never taken
while the other two hold 2 or fewer between them.
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
instance api.service.yunlu_office.consul 127.0.0.1:8083
--- http_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    random two least_conn;
}
--- check
ok(http_wait_for_backends([8081, 8082, 8083], path => '/api/'), 'all discovered');
my ($held, $done) = ::held_spread(6, 8081, 8082, 8083);
my $sum = 0;
$sum += $_ for values %$held;
is($sum, 6, 'six held');
cmp_ok((sort { $b <=> $a } values %$held)[0], '<=', 3, 'at most 3 at one peer (' . join(' ', map { $held->{$_} } 8081 .. 8083) . ')');
is(scalar(grep { $_->{status} == 200 } @$done), 6, 'all answered once released');
--- no_error_log
[error]



=== TEST 6: ip_hash (client address from X-Real-IP): one /24 on one peer; IPv6 by the whole address
--- skip_eval: 1: !main::has_realip()
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
instance api.service.yunlu_office.consul 127.0.0.1:8083
--- http_config
upstream api {
    ip_hash;
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- config
location /api/ {
    set_real_ip_from 127.0.0.1;
    real_ip_header X-Real-IP;
    proxy_pass http://api;
}
--- check
ok(wait_for_log(qr/3 peers from/, 10), 'all discovered');
my $same = ::ip_map(['10.0.1.5', '10.0.1.9', '10.0.1.5', '10.0.1.200', '10.0.1.9']);
is(scalar(keys %{{ map { $_ => 1 } values %$same }}), 1, '10.0.1.5, .9 and .200 on one peer: ' . join(' ', values %$same));
my $nets = ::ip_map([map { "10.0.$_.7" } 1 .. 30]);
cmp_ok(scalar(keys %{{ map { $_ => 1 } values %$nets }}), '>=', 2, 'thirty /24s spread over the peers');
my @v6 = map { "2001:db8::$_" } 1 .. 30;
my $v6a = ::ip_map(\@v6);
is_deeply(::ip_map(\@v6), $v6a, 'an IPv6 client keeps its peer');
cmp_ok(scalar(keys %{{ map { $_ => 1 } values %$v6a }}), '>=', 2, 'IPv6 clients of one /64 spread (the whole address is hashed)');
--- no_error_log
[error]



=== TEST 7: the method line before or after consul_upstream: the same behaviour
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:8081
instance api.service.yunlu_office.consul 127.0.0.1:8082
instance api.service.yunlu_office.consul 127.0.0.1:8083
--- http_config
upstream before {
    hash $arg_k;
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream after {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    hash $arg_k;
}
upstream lc_after {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    least_conn;
}
--- config
location /before/ { proxy_pass http://before; }
location /after/ { proxy_pass http://after; }
location /api/ { proxy_pass http://lc_after; }
--- check
ok(wait_for_log(qr/3 peers from/, 10, 3), 'every upstream has its peers');
my @keys = map { "key$_" } 1 .. 20;
is_deeply(::key_map(\@keys, '/after/'), ::key_map(\@keys, '/before/'), 'hash before and after: the same peer for every key');
my ($held) = ::held_spread(3, 8081, 8082, 8083);
is(join(' ', map { $held->{$_} } 8081 .. 8083), '1 1 1', 'least_conn after consul_upstream');
--- no_error_log
[error]
