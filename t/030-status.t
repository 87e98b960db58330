# consul_upstream_status: the http module of the same .so answers with what the
# stream balancer sees, as JSON and as Prometheus text (parsed here by the
# prometheus_client package's parser, t/lib/promparse.py).
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);
use IO::Select ();
use JSON::PP ();
use List::Util qw(first);

our $NAME = 'redis.service.yunlu_office.consul';

# Every connection to the http port may land on either worker (a fresh
# connection per request: the kernel spreads them over the workers' sockets).
$Test::Nginx::Util::ReusePort = 1;

# GET PATH on the http port, one connection: (status, {header => value}, body).
sub http_get {
    my ($path, $method) = @_;
    $method //= 'GET';
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $Test::Nginx::Util::ServerPort,
                                  Proto => 'tcp', Timeout => 3)
        or return (0, {}, "connect: $!");
    print $s "$method $path HTTP/1.0\r\nHost: localhost\r\n\r\n";
    my $sel = IO::Select->new($s);
    my $resp = '';
    my $deadline = time + 5;
    while (time < $deadline && $sel->can_read($deadline - time)) {
        my $n = sysread($s, $resp, 65536, length $resp);
        last unless $n;
    }
    close $s;
    return (0, {}, "no whole response: $resp")
        unless $resp =~ /\AHTTP\/1\.\d (\d+)[^\r\n]*\r\n(.*?)\r\n\r\n(.*)\z/s;
    my ($code, $head, $body) = ($1, $2, $3);
    my %h = map { /^([^:]+):\s*(.*)$/ ? (lc($1) => $2) : () } split /\r\n/, $head;
    return (0, \%h, "body of " . length($body) . " bytes, Content-Length $h{'content-length'}")
        if $method ne 'HEAD' && defined $h{'content-length'} && $h{'content-length'} != length $body;
    return ($code, \%h, $body);
}

# The JSON status document (dies unless a 200 with JSON).
sub status_doc {
    my ($code, $h, $body) = http_get('/status');
    die "GET /status: $code $body\n" unless $code == 200;
    die "GET /status: Content-Type $h->{'content-type'}\n" unless $h->{'content-type'} eq 'application/json';
    return JSON::PP->new->decode($body);
}

sub upstream_in {
    my ($doc, $name) = @_;
    return first { $_->{name} eq ($name // 'redis') } @{ $doc->{upstreams} };
}

sub peer_in {
    my ($u, $addr) = @_;
    return first { $_->{address} eq $addr } @{ $u->{peers} };
}

# Polls the status until COND(upstream, doc) holds; returns the upstream (undef on timeout).
sub wait_status {
    my ($cond, $timeout, $name) = @_;
    my $found;
    wait_until(sub {
        my $doc = status_doc();
        my $u = upstream_in($doc, $name);
        $found = $u if $u && $cond->($u, $doc);
        return $found;
    }, $timeout // 6, 0.1);
    return $found;
}

# Prometheus text -> { families => { name => {type, help} }, samples => [[name, {labels}, value, family]] }
# through prometheus_client's parser (dies if it refuses the text).
sub prom_parse {
    my $text = shift;
    my $in = "$TmpDir/metrics-" . int(rand(1e9)) . ".txt";
    open my $fh, '>', $in or die "$in: $!";
    print $fh $text;
    close $fh;
    my $out = `python3 $Test::Nginx::Consul::RootDir/t/lib/promparse.py < $in 2>&1`;
    die "promparse refused the metrics: $out\n" if $?;
    unlink $in;
    return JSON::PP->new->decode($out);
}

# The value of the sample NAME with exactly these labels (undef if absent).
sub prom_value {
    my ($p, $name, %labels) = @_;
    my $want = join ',', map { "$_=$labels{$_}" } sort keys %labels;
    for my $s (@{ $p->{samples} }) {
        next unless $s->[0] eq $name;
        my $got = join ',', map { "$_=$s->[1]{$_}" } sort keys %{ $s->[1] };
        return $s->[2] if $got eq $want;
    }
    return undef;
}

sub metrics {
    my ($code, $h, $body) = http_get('/metrics');
    die "GET /metrics: $code $body\n" unless $code == 200;
    return ($body, $h);
}

run_tests();

__DATA__

=== TEST 1: directive errors in nginx's words
--- config
--- check
my $conf = sub {
    my $server = shift;
    return "load_module $ENV{TEST_NGINX_CONSUL_MODULE};\nevents {}\nhttp {\n    server {\n        listen 127.0.0.1:1999;\n        $server\n    }\n}\n";
};
my @cases = (
    ['location = /s { consul_upstream_status yaml; }', qr/\[emerg\] invalid parameter "yaml" in \S+nginx\.conf:6$/m],
    ['location = /s { consul_upstream_status json x; }',
     qr/\[emerg\] invalid number of arguments in "consul_upstream_status" directive in \S+nginx\.conf:6$/m],
    ['location = /s { consul_upstream_status; consul_upstream_status prometheus; }',
     qr/\[emerg\] "consul_upstream_status" directive is duplicate in \S+nginx\.conf:6$/m],
    ['consul_upstream_status;', qr/\[emerg\] "consul_upstream_status" directive is not allowed here in \S+nginx\.conf:6$/m],
);
for my $c (@cases) {
    my ($rc, $out) = nginx_t($conf->($c->[0]));
    isnt($rc, 0, "refused: $c->[0]");
    like($out, $c->[1], 'with the message');
}
my ($rc, $out) = nginx_t($conf->('location = /m { consul_upstream_status prometheus; }'));
is($rc, 0, 'accepted without stream {}') or diag $out;



=== TEST 2: without stream upstreams: an empty report, every metric family declared
--- main_config
load_module $TEST_NGINX_CONSUL_MODULE;
--- config
location = /status { consul_upstream_status json; }
location = /metrics { consul_upstream_status prometheus; }
--- check
my $doc = status_doc();
is_deeply($doc->{upstreams}, [], 'no upstreams');
ok(abs($doc->{time} - time) < 5, 'the time is now');
my ($text, $h) = metrics();
is($h->{'content-type'}, 'text/plain; version=0.0.4; charset=utf-8', 'Prometheus text 0.0.4');
my $p = prom_parse($text);
is(scalar(keys %{ $p->{families} }), 30, '30 families') or diag(Test::More::explain([sort keys %{ $p->{families} }]));
is(scalar(@{ $p->{samples} }), 0, 'no samples');
is($p->{families}{nginx_consul_peer_connections}{type}, 'counter', 'counters are counters');
my ($code) = http_get('/status?x=1');
is($code, 200, 'arguments are ignored');
my ($hcode, $hh, $hbody) = http_get('/metrics', 'HEAD');
ok($hcode == 200 && $hbody eq '' && $hh->{'content-length'} == length($text), 'HEAD: the headers only');
($code) = http_get('/metrics', 'POST');
is($code, 405, 'POST: 405');
# Two pipelined GETs on one connection: both answered in full (nginx marks the
# first as pipelined; a misread bit-field once took that for HEAD).
my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $Test::Nginx::Util::ServerPort,
                              Proto => 'tcp', Timeout => 3) or die "connect: $!";
print $s "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\nGET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
my ($all, $sel, $deadline) = ('', IO::Select->new($s), time + 5);
while (time < $deadline && $sel->can_read($deadline - time)) {
    last unless sysread($s, $all, 65536, length $all);
}
close $s;
my @bodies;
while ($all =~ /\G HTTP\/1\.1\ 200[^\r]*\r\n(.*?)\r\n\r\n/sxgc) {
    my ($len) = $1 =~ /^Content-Length:\s*(\d+)/mi;
    push @bodies, substr($all, pos($all), $len);
    pos($all) += $len;
}
is_deeply([map { length } @bodies], [length($text), length($text)], 'pipelined GETs: two whole bodies');
--- no_error_log
[error]



=== TEST 3: JSON follows registration, weight change and deregistration; counters are exact
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s max_stale=1h;
}
--- config
location = /status { consul_upstream_status; }
--- check
ok(wait_for_backends([6380]), 'discovered');
my $u = wait_status(sub { @{ $_[0]{peers} } == 1 });
ok($u, 'one peer in the status');
my $l = $u->{lines}[0];
is($l->{query}, $::NAME, 'query');
is_deeply($l->{resolvers}, ["127.0.0.1:$DnsPort"], 'resolvers');
is($l->{set}, 'live', 'live set');
ok($l->{lookups}{ok} >= 1 && $l->{lookups}{error} == 0, 'lookups counted');
is($l->{streak}, undef, 'no failure streak');
ok(abs($l->{last_success} - time) <= 3, 'last success just now');
ok($l->{max_stale_left_s} > 3590 && $l->{max_stale_left_s} <= 3600, "max_stale left: $l->{max_stale_left_s} s");
my $p = $u->{peers}[0];
is_deeply([@$p{qw(address ip port weight priority query state)}],
          ['127.0.0.1:6380', '127.0.0.1', 6380, 1, 1, $::NAME, 'up'], 'the peer');
is($u->{usable_peers}, 1, 'one usable');
is_deeply($u->{tiers}, [{priority => 1, peers => 1, usable => 1}], 'one tier');
ok($u->{fallback}{servers} == 0 && !$u->{fallback}{serving}, 'no fallback servers');
my $gen1 = $u->{generation};
my $since = $p->{since};

# Exact connection counts, whichever worker proxied them.
my $before = $p->{connections};
is_tally(tally(10), {6380 => 10}, '10 connections');
$u = wait_status(sub { peer_in($_[0], '127.0.0.1:6380')->{active} == 0 });
ok($u, 'no connection open afterwards');
is(peer_in($u, '127.0.0.1:6380')->{connections} - $before, 10, '10 more connections counted');
is(peer_in($u, '127.0.0.1:6380')->{failures}, 0, 'no failure');

consul_register($::NAME, '127.0.0.1:6381');
$u = wait_status(sub { @{ $_[0]{peers} } == 2 });
ok($u, 'registration: two peers');
ok($u->{generation} > $gen1, 'a new generation');
ok($u->{lines}[0]{last_change} >= $since, 'the change is dated');
is(peer_in($u, '127.0.0.1:6381')->{connections}, 0, 'the newcomer starts at 0');
is(peer_in($u, '127.0.0.1:6380')->{since}, $since, 'the other keeps its slot');

# One update: the set goes from weight 1 to weight 3 with no step between.
sleep 1 while int(time) <= $u->{lines}[0]{last_change};
my $tw = int(time);
nsupdate("update delete $::NAME. SRV 1 1 6381 7f000001.addr.yunlu_office.consul.",
         "update add $::NAME. 0 IN SRV 1 3 6381 7f000001.addr.yunlu_office.consul.");
$u = wait_status(sub { my $q = peer_in($_[0], '127.0.0.1:6381'); $q && $q->{weight} == 3 });
ok($u, 'weight change shown');
is(scalar @{ $u->{peers} }, 2, 'still two peers');
ok($u->{lines}[0]{last_change} >= $tw, 'the weight change is dated');
my $c6380 = peer_in($u, '127.0.0.1:6380')->{connections};
ok($c6380 >= $before + 10, 'counters kept across the change');

consul_deregister($::NAME, '127.0.0.1:6380');
$u = wait_status(sub { @{ $_[0]{peers} } == 1 });
ok($u && !peer_in($u, '127.0.0.1:6380'), 'deregistration: 6380 gone');
consul_register($::NAME, '127.0.0.1:6380');
$u = wait_status(sub { peer_in($_[0], '127.0.0.1:6380') });
ok($u, '6380 back');
my $back = peer_in($u, '127.0.0.1:6380');
is($back->{connections}, 0, 'a peer that returns starts afresh');
ok($back->{since} > $since, 'with a new start time');
--- no_error_log
[error]
[warn]



=== TEST 4: DNS outage: the failure streak is shown, the set kept; recovery clears it
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s max_stale=1h;
}
--- config
location = /status { consul_upstream_status; }
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
my $u = wait_status(sub { @{ $_[0]{peers} } == 2 });
my $ok_before = $u->{lines}[0]{lookups}{ok};
my $success = $u->{lines}[0]{last_success};
my $t0 = int(time);
dns_stop();
$u = wait_status(sub { my $s = $_[0]{lines}[0]{streak}; $s && $s->{count} >= 3 }, 10);
ok($u, 'a streak of 3 failures shown');
my $l = $u->{lines}[0];
is($l->{streak}{kind}, 'error', 'kind error');
like($l->{streak}{reason}, qr/^cannot connect to 127\.0\.0\.1:$DnsPort$/, 'the reason');
ok($l->{streak}{since} >= $t0 - 1 && $l->{streak}{since} <= time + 1, 'since the outage');
ok($l->{lookups}{error} >= 3, 'errors counted');
is($l->{set}, 'kept', 'the set is kept');
is($l->{peers}, 2, 'two peers kept');
is(scalar @{ $u->{peers} }, 2, 'and published');
ok($l->{last_success} <= $t0 + 1, 'no success since');
my $left = 3600 - (time - $l->{last_success});
ok(abs($l->{max_stale_left_s} - $left) <= 2, "max_stale left $l->{max_stale_left_s} s (about $left)");
my $t = tally(4);
ok(!$t->{fail} && ($t->{6380} // 0) + ($t->{6381} // 0) == 4, 'and serving: ' . tally_str($t));
dns_start(records => "instance $::NAME 127.0.0.1:6380\ninstance $::NAME 127.0.0.1:6381\n");
$u = wait_status(sub { !defined $_[0]{lines}[0]{streak} }, 15);
ok($u, 'recovered: no streak');
is($u->{lines}[0]{set}, 'live', 'live again');
ok($u->{lines}[0]{lookups}{ok} > $ok_before, 'answers counted');
ok($u->{lines}[0]{last_success} > $success, 'a new success');
--- no_error_log
[error]



=== TEST 5: a backend that refuses connections is marked down until fail_timeout, failures counted
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:20001
--- backends: 6380
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s fail_timeout=30s;
}
--- stream_server_config
    proxy_pass redis;
    proxy_connect_timeout 1s;
--- config
location = /status { consul_upstream_status; }
location = /metrics { consul_upstream_status prometheus; }
--- check
ok(wait_for_log(qr/2 peers from/, 5), 'two peers discovered');
my $t = tally(6);
is_tally($t, {6380 => 6}, 'every connection served by 6380');
my $u = upstream_in(status_doc());
my $dead = peer_in($u, '127.0.0.1:20001');
is($dead->{state}, 'down', 'the refusing peer is down');
ok($dead->{failures} >= 1 && $dead->{fails} >= 1, "failures counted ($dead->{failures})");
ok($dead->{down_until} > time + 25 && $dead->{down_until} <= time + 31,
   'down for fail_timeout: ' . ($dead->{down_until} - time) . ' s left');
is(peer_in($u, '127.0.0.1:6380')->{state}, 'up', 'the other is up');
is(peer_in($u, '127.0.0.1:6380')->{failures}, 0, 'without failures');
is($u->{usable_peers}, 1, 'one usable peer');
is_deeply($u->{tiers}, [{priority => 1, peers => 2, usable => 1}], 'tier counts');
my $p = prom_parse((metrics())[0]);
my %dead = (upstream => 'redis', protocol => 'stream', peer => '127.0.0.1:20001');
is(prom_value($p, 'nginx_consul_peer_up', %dead), 0, 'metrics: down');
is(prom_value($p, 'nginx_consul_peer_failures_total', %dead), $dead->{failures}, 'metrics: failures');
is(prom_value($p, 'nginx_consul_peer_down_until_timestamp_seconds', %dead), $dead->{down_until},
   'metrics: down until');
is(prom_value($p, 'nginx_consul_peer_down_until_timestamp_seconds', upstream => 'redis', protocol => 'stream', peer => '127.0.0.1:6380'),
   undef, 'no down_until for a peer that is up');
is(prom_value($p, 'nginx_consul_upstream_usable_peers', upstream => 'redis', protocol => 'stream'), 1, 'metrics: one usable');
--- error_log
connect() failed (111: Connection refused)



=== TEST 6: Prometheus text, parsed by prometheus_client, says what the JSON says, whichever worker answers
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 weight=3
instance redis.service.yunlu_office.consul 127.0.0.1:6381 priority=2
--- backends: 6380 6381 6382
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1h;
    server 127.0.0.1:6382 backup;
}
--- config
location = /status { consul_upstream_status; add_header X-Worker $pid always; }
location = /metrics { consul_upstream_status prometheus; add_header X-Worker $pid always; }
--- check
ok(wait_for_backends([6380], only => 1), 'discovered (interval=1h: one lookup)');
is_tally(tally(12), {6380 => 12}, 'priority 1 serves');
my $u = wait_status(sub { !grep { $_->{active} } @{ $_[0]{peers} } });
ok($u, 'no connection open');

my (%by_worker, @series);
for my $i (1 .. 24) {
    my ($text, $h) = metrics();
    push @{ $by_worker{ $h->{'x-worker'} } }, $text;
}
my @workers = sort keys %by_worker;
is(scalar @workers, 2, 'both workers answered: ' . join(' ', map { "$_ x" . @{ $by_worker{$_} } } @workers));
my %texts = map { $_ => 1 } map { @$_ } values %by_worker;
is(scalar keys %texts, 1, 'every scrape, from either worker, the same text');

my $p = prom_parse((keys %texts)[0]);
my %f = %{ $p->{families} };
is(scalar keys %f, 30, '30 families');
for my $name (sort keys %f) {
    my $want = $f{$name}{type} eq 'counter' ? "${name}_total" : $name;
    my @other = grep { $_->[3] eq $name && $_->[0] ne $want } @{ $p->{samples} };
    is(scalar @other, 0, "$name: $f{$name}{type}, samples named $want");
}
my @unlabelled = grep { ($_->[1]{upstream} // '') ne 'redis' || ($_->[1]{protocol} // '') ne 'stream' } @{ $p->{samples} };
is(scalar @unlabelled, 0, 'every series has upstream="redis" and protocol="stream"')
    or diag explain $unlabelled[0];
my @order = grep { !/^#/ && !/^\w+\{upstream="redis",protocol="stream"[,}]/ } split /\n/, (keys %texts)[0];
is(scalar @order, 0, 'protocol comes right after upstream') or diag $order[0];
is($u->{protocol}, 'stream', 'JSON: the protocol');
my %l = (upstream => 'redis', protocol => 'stream', query => $::NAME);
my %a = (upstream => 'redis', protocol => 'stream', peer => '127.0.0.1:6380');
my %b = (upstream => 'redis', protocol => 'stream', peer => '127.0.0.1:6381');
my $ja = peer_in($u, '127.0.0.1:6380');
is(prom_value($p, 'nginx_consul_peer_connections_total', %a), $ja->{connections}, 'connections as in JSON');
ok($ja->{connections} >= 12, 'at least the 12 counted');
is(prom_value($p, 'nginx_consul_peer_connections_total', %b), 0, 'the priority-2 peer took none');
is(prom_value($p, 'nginx_consul_peer_weight', %a), 3, 'weight');
is(prom_value($p, 'nginx_consul_peer_priority', %b), 2, 'priority');
is(prom_value($p, 'nginx_consul_peer_up', %a), 1, 'up');
is(prom_value($p, 'nginx_consul_peer_info', %a, query => $::NAME), 1, 'the query it came from');
is(prom_value($p, 'nginx_consul_peer_start_timestamp_seconds', %a), $ja->{since}, 'start time as in JSON');
is(prom_value($p, 'nginx_consul_upstream_peers', upstream => 'redis', protocol => 'stream', priority => 1), 1, 'tier 1: one peer');
is(prom_value($p, 'nginx_consul_upstream_peers', upstream => 'redis', protocol => 'stream', priority => 2), 1, 'tier 2: one peer');
is(prom_value($p, 'nginx_consul_upstream_generation', upstream => 'redis', protocol => 'stream'), $u->{generation}, 'generation');
is(prom_value($p, 'nginx_consul_upstream_fallback_servers', upstream => 'redis', protocol => 'stream'), 1, 'one static server');
is(prom_value($p, 'nginx_consul_upstream_fallback_active', upstream => 'redis', protocol => 'stream'), 0, 'not serving');
is(prom_value($p, 'nginx_consul_line_lookups_total', %l, outcome => 'ok'), $u->{lines}[0]{lookups}{ok}, 'lookups ok');
is(prom_value($p, 'nginx_consul_line_lookups_total', %l, outcome => 'error'), 0, 'no lookup error');
is(prom_value($p, 'nginx_consul_line_set', %l, set => 'live'), 1, 'live set');
is(prom_value($p, 'nginx_consul_line_streak', %l, kind => 'none'), 1, 'no streak');
is(prom_value($p, 'nginx_consul_line_interval_seconds', %l), 3600, 'interval in seconds');
is(prom_value($p, 'nginx_consul_line_info', %l, source => 'dns', resolvers => "127.0.0.1:$DnsPort", transport => 'tcp'), 1, 'line info');
is(prom_value($p, 'nginx_consul_line_last_success_timestamp_seconds', %l), $u->{lines}[0]{last_success}, 'last success');
--- no_error_log
[error]
[warn]



=== TEST 7: under 2 workers and 8 reloads the endpoint answers every time; counters stay monotonic
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- config
location = /metrics { consul_upstream_status prometheus; }
location = /status { consul_upstream_status; }
--- check
ok(wait_for_backends([6380]), 'discovered');
is_tally(tally(5), {6380 => 5}, 'served');
my $first = prom_parse((metrics())[0]);
my %a = (upstream => 'redis', protocol => 'stream', peer => '127.0.0.1:6380');
my %l = (upstream => 'redis', protocol => 'stream', query => $::NAME, outcome => 'ok');

# Scrapes in a child process until told to stop: "ok N", then any failure.
my $file = "$TmpDir/scrapes";
my $stop = "$file.stop";
my $pid = fork();
die "fork: $!" unless defined $pid;
if ($pid == 0) {
    $Test::Nginx::Util::InSubprocess = 1;
    my ($n, @bad) = (0);
    while (!-e $stop) {
        my ($code, $h, $body) = http_get('/metrics');
        if ($code == 200 && $body =~ /^nginx_consul_peer_connections_total\{upstream="redis",protocol="stream",peer="127\.0\.0\.1:6380"\} \d+$/m) {
            $n++;
        } else {
            push @bad, sprintf '%.3f %s %s', time, $code, substr($body, 0, 200);
        }
        sleep 0.02;
    }
    open my $fh, '>', $file;
    print $fh "ok $n\n", map { "$_\n" } @bad;
    close $fh;
    POSIX::_exit(0);
}
my $bg = tally_background(delay => 0.02);
for my $i (1 .. 8) {
    ok(nginx_reload(), "reload $i");
}
sleep 0.5;
open my $sfh, '>', $stop;
close $sfh;
waitpid($pid, 0);
my $t = $bg->();
open my $fh, '<', $file or die "$file: $!";
my ($ok) = <$fh> =~ /^ok (\d+)/;
my @bad = <$fh>;
ok($ok >= 20, "$ok scrapes answered during the reloads");
is(scalar @bad, 0, 'none failed') or diag join '', @bad[0 .. ($#bad < 4 ? $#bad : 4)];
ok(!$t->{fail}, 'connections served meanwhile: ' . tally_str($t));
my $last = prom_parse((metrics())[0]);
for my $m (['nginx_consul_peer_connections_total', %a], ['nginx_consul_line_lookups_total', %l]) {
    my ($name, %labels) = @$m;
    my ($v0, $v1) = (prom_value($first, $name, %labels), prom_value($last, $name, %labels));
    ok($v1 > $v0, "$name grew across the reloads ($v0 -> $v1)");
}
is(prom_value($last, 'nginx_consul_peer_connections_total', %a)
   - prom_value($first, 'nginx_consul_peer_connections_total', %a), $t->{6380},
   'every connection made during the reloads counted once');
--- no_error_log
[error]



=== TEST 8: an http and a stream upstream named "api": two entries with their protocol, peers and zones; both survive a reload
The http upstream (issue 17) is listed after the stream one; Prometheus tells them
apart by the protocol label; each keeps its own zone (its peers and counters) across a
reload with Consul down.
--- workers: 1
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:6380
instance web.service.yunlu_office.consul 127.0.0.1:6381
instance web.service.yunlu_office.consul 127.0.0.2:6381
--- backends: 6380
--- stream_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- stream_server_config
    proxy_pass api;
--- http_config
upstream api {
    consul_upstream web.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- config
location = /status { consul_upstream_status; }
location = /metrics { consul_upstream_status prometheus; }
--- check
my $both = sub {
    my $doc = status_doc();
    my @api = grep { $_->{name} eq 'api' } @{ $doc->{upstreams} };
    return @api == 2 && @{ $api[0]{peers} } == 1 && @{ $api[1]{peers} } == 2 ? \@api : undef;
};
my $api;
ok(wait_until(sub { $api = $both->() }, 6, 0.1), 'two upstreams named "api", each with its peers');
is(join(' ', map { $_->{protocol} } @$api), 'stream http', 'stream first, then http');
is(join(' ', map { $_->{address} } @{ $api->[0]{peers} }), '127.0.0.1:6380', 'the stream one: its peer');
is(join(' ', sort map { $_->{address} } @{ $api->[1]{peers} }), '127.0.0.1:6381 127.0.0.2:6381', 'the http one: its peers');
is($api->[1]{lines}[0]{query}, 'web.service.yunlu_office.consul', 'the http one: its query');
is_tally(tally(4), {6380 => 4}, 'the stream upstream serves');
my $p = prom_parse((metrics())[0]);
is(prom_value($p, 'nginx_consul_upstream_peers', upstream => 'api', protocol => 'stream', priority => 1), 1,
   'metrics: the stream one has 1 peer');
is(prom_value($p, 'nginx_consul_upstream_peers', upstream => 'api', protocol => 'http', priority => 1), 2,
   'metrics: the http one has 2');
is(prom_value($p, 'nginx_consul_peer_connections_total', upstream => 'api', protocol => 'stream', peer => '127.0.0.1:6380'),
   $api->[0]{peers}[0]{connections} + 4, 'metrics: the stream peer counted its connections');
is(prom_value($p, 'nginx_consul_peer_connections_total', upstream => 'api', protocol => 'http', peer => '127.0.0.1:6381'),
   0, 'metrics: the http peer none');
my @gen = map { $_->{generation} } @$api;
dns_stop();
ok(nginx_reload(), 'reload with Consul down');
my $after;
ok(wait_until(sub { $after = $both->() }, 6, 0.1), 'after the reload: both, with their peers');
is(join(' ', map { $_->{protocol} } @$after), 'stream http', 'in the same order');
is(join(' ', map { $_->{generation} } @$after), join(' ', @gen), 'each zone kept (generations unchanged)');
is($after->[0]{peers}[0]{connections}, 4 + $api->[0]{peers}[0]{connections}, 'and its counters');
is_tally(tally(2), {6380 => 2}, 'the stream upstream still serves');
--- no_error_log
[error]
[emerg]



=== TEST 9: http {} before stream {} and back: an http and a stream upstream named "api", each listed once with its protocol
nginx.conf is rewritten between the orders (stream.conf's include moved after http {}
or back before it): a fresh start with http {} first, a reload to stream {} first, a
reload back. In each order the status page answers, JSON and Prometheus list both
upstreams once each (stream, then http), with their own peers, and nothing twice.
--- workers: 2
--- dns
instance api.service.yunlu_office.consul 127.0.0.1:6380
instance web.service.yunlu_office.consul 127.0.0.1:6381
instance web.service.yunlu_office.consul 127.0.0.2:6381
--- backends: 6380
--- stream_config
upstream api {
    consul_upstream api.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- stream_server_config
    proxy_pass api;
--- http_config
upstream api {
    consul_upstream web.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    keepalive 4;
}
--- config
location = /status { consul_upstream_status; }
location = /metrics { consul_upstream_status prometheus; }
--- check
my $conf_file = $Test::Nginx::Util::ConfFile;
# Moves the include of stream.conf after http {} (http first) or before it.
my $order = sub {
    my ($http_first) = @_;
    open my $fh, '<', $conf_file or die "$conf_file: $!";
    my $text = do { local $/; <$fh> };
    close $fh;
    my ($inc) = $text =~ /^(include \S+\/stream\.conf;\n)/m or die "no include of stream.conf in $conf_file";
    $text =~ s/^\Q$inc\E//m;
    if ($http_first) {
        $text .= $inc;
    } else {
        $text =~ s/^(http \{)/$inc$1/m or die "no http {} in $conf_file";
    }
    open $fh, '>', $conf_file or die "$conf_file: $!";
    print $fh $text;
    close $fh;
    my ($h, $s) = map { index($text, $_) } "\nhttp {", $inc;
    return $http_first ? $h < $s : $s < $h;
};
my $both = sub {
    my $doc = eval { status_doc() } or return undef;
    my @u = @{ $doc->{upstreams} };
    return @u == 2 && @{ $u[0]{peers} } == 1 && @{ $u[1]{peers} } == 2 ? \@u : undef;
};
my $check = sub {
    my ($what) = @_;
    my $u;
    ok(wait_until(sub { $u = $both->() }, 8, 0.1), "$what: the status page lists two upstreams with their peers")
        or diag explain(eval { status_doc() } // $@);
    $u //= [];
    is(join(' ', map { "$_->{name}/$_->{protocol}" } @$u), 'api/stream api/http', "$what: stream api, then http api");
    is(join(' ', map { $_->{address} } @{ $u->[0]{peers} // [] }), '127.0.0.1:6380', "$what: the stream one's peer");
    is(join(' ', sort map { $_->{address} } @{ $u->[1]{peers} // [] }), '127.0.0.1:6381 127.0.0.2:6381',
       "$what: the http one's peers");
    my $p = prom_parse((metrics())[0]);
    my %seen;
    my @dups;
    for my $s (@{ $p->{samples} }) {
        my $key = join ',', $s->[0], map { "$_=$s->[1]{$_}" } sort keys %{ $s->[1] };
        push @dups, $key if $seen{$key}++;
    }
    is(scalar @dups, 0, "$what: no sample twice") or diag join "\n", @dups;
    my @peers = sort map { "$_->[1]{protocol}=$_->[2]" }
        grep { $_->[0] eq 'nginx_consul_upstream_peers' && $_->[1]{upstream} eq 'api' } @{ $p->{samples} };
    is("@peers", 'http=2 stream=1', "$what: metrics: the peers of each, once");
    is_tally(tally(3), {6380 => 3}, "$what: the stream upstream serves");
};
ok($order->(1), 'nginx.conf: http {} first');
ok(nginx_restart(), 'started with http {} first');
$check->('http first');
ok($order->(0), 'nginx.conf: stream {} first');
ok(nginx_reload(), 'reloaded into stream {} first');
$check->('reloaded, stream first');
ok($order->(1), 'nginx.conf: http {} first again');
ok(nginx_reload(), 'reloaded into http {} first');
$check->('reloaded, http first');
--- no_error_log
[error]
[emerg]
[alert]
