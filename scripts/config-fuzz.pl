#!/usr/bin/env perl
# Configuration fuzzer: generates nginx configurations around consul_upstream,
# valid and invalid mixed (parameters, balancing methods, nginx's `zone`, static
# and backup servers, several lines and upstreams, directive orders, 1 or 2
# workers; stream and http upstreams, an http one sometimes named like a stream
# one, http {} before or after stream {}; in http ones keepalive, ip_hash, the
# proxy_* lines http users write), runs `nginx -t` on each, starts the accepted
# ones against the harness's scripted DNS server
# (t/lib/Test/Nginx/Consul/HostileDns.pm: answers like Consul's agent, or
# misbehaves on purpose), sends connections through every stream upstream and
# HTTP requests through every http one while the DNS answers change, checks
# that the status page lists each upstream once, sometimes reloads into another
# accepted configuration (connections going on meanwhile) or kills a worker,
# then stops nginx. Lines are DNS lines and `api=` lines (Consul's HTTP API:
# the harness's API double, t/lib/consul_api_double.py, with instances,
# health states and misbehaviours switched per phase).
#
# A failure is: `nginx -t` killed by a signal or hanging; a refusal without an
# [emerg] message; nginx failing to start after `nginx -t` accepted it; any
# process exiting on a signal or dumping core; [alert], [crit] or "panicked" in
# the error log; a connection, a request, a reload or the shutdown that hangs;
# a request through an http upstream that gets no whole HTTP answer; a status
# page that misses an upstream or lists one twice. Each case
# is generated from its own seed, printed with the configuration on failure,
# and replayed with `--seed SEED --count 1`.
#
#   scripts/config-fuzz.pl                       # 2000 configurations (the long run, about 25 min)
#   scripts/config-fuzz.pl --count 60            # the smoke run of scripts/test.sh (about 1 min)
#   scripts/config-fuzz.pl --seed 1234 --count 1 --keep    # replay one case, keep its files
#
# Options: --count N, --seed S (first case's seed; default from the clock),
# --run-all / --run-fraction F (share of accepted cases that are started;
# default 1), --keep (keep the work directory), --dir DIR, --nginx BIN,
# --module SO, --verbose. Environment: NGX_CONSUL_PROFILE (debug|release: which
# build), NGX_CONSUL_EXTRA_MODULES (modules loaded first, e.g. Debian's
# ngx_stream_module.so), NGX_CONSUL_HOSTILE_PORT (the DNS server's port, 8653).
# The API double listens on 127.0.0.1:8654 (its control port: 8655).
#
# It runs in a private network namespace (unshare -n, loopback up) so that its
# fixed loopback ports (DNS 8653, backends 7600-7605, nginx 7700-7800) collide with nothing; it
# re-executes itself there (NGX_CONSUL_CONFIG_FUZZ_NETNS=host: not, as
# scripts/test.sh does under NGX_CONSUL_NETNS=0).
use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(make_path remove_tree);
use Getopt::Long qw(GetOptions);
use IO::Select;
use IO::Socket::INET;
use HTTP::Tiny ();
use JSON::PP ();
use POSIX qw(WNOHANG setsid);
use Time::HiRes qw(time sleep);

my $Root;
BEGIN { $Root = abs_path(dirname(abs_path(__FILE__)) . '/..') }
use lib "$Root/t/lib";

# --- options and the private network namespace -----------------------------

my %opt = (count => 2000, run_fraction => 1);
my @Args = @ARGV;
GetOptions(\%opt, 'count=i', 'seed=i', 'run-fraction=f', 'keep', 'dir=s', 'nginx=s',
           'module=s', 'verbose', 'help')
    or die "usage: $0 [--count N] [--seed S] [--run-fraction F] [--keep] [--dir DIR]\n";
if ($opt{help}) {
    open my $fh, '<', __FILE__ or die;
    while (<$fh>) { last unless /^#/; next if $. == 1; s/^# ?//; print }
    exit 0;
}

if (!$ENV{NGX_CONSUL_CONFIG_FUZZ_NETNS}) {
    $ENV{NGX_CONSUL_CONFIG_FUZZ_NETNS} = 1;
    exec 'unshare', '-n', 'sh', '-c', 'ip link set lo up && exec "$@"', 'sh', $^X, __FILE__, @Args;
    die "config-fuzz: cannot run in a private network namespace (unshare -n: $!); run as root\n";
}

my $Profile = $ENV{NGX_CONSUL_PROFILE} || 'debug';
my $Target = $ENV{CARGO_TARGET_DIR} ? abs_path($ENV{CARGO_TARGET_DIR}) : "$Root/target";
my $Nginx = $opt{nginx} // $ENV{TEST_NGINX_BINARY} // "$Target/$Profile/nginx";
my $Module = $opt{module} // $ENV{NGX_CONSUL_MODULE}
    // "$Target/$Profile/libngx_stream_consul_upstream_module.so";
-x $Nginx or die "config-fuzz: no nginx at $Nginx (cargo build first, or --nginx)\n";
-f $Module or die "config-fuzz: no module at $Module (cargo build first, or --module)\n";
($Nginx, $Module) = map { abs_path($_) } $Nginx, $Module;
my @Extra = split ' ', $ENV{NGX_CONSUL_EXTRA_MODULES} // '';
my $NginxV = `$Nginx -V 2>&1`;
my $HasSsl = $NginxV =~ /--with-stream_ssl_module/ || grep { /stream/ } @Extra;

my $Work = $opt{dir} // "/tmp/ngx-consul-config-fuzz-$$";
{ no warnings 'once'; $Test::Nginx::Consul::TmpDir = $Work; }    # where HostileDns keeps its files
require Test::Nginx::Consul::HostileDns;
Test::Nginx::Consul::HostileDns->import;
remove_tree($Work);
make_path($Work);
my $DnsPort = hostile_port();

# Fixed loopback ports (a private network namespace: nothing else uses them).
my @BACKENDS = (7600 .. 7605);          # the backends' process answers "b<port>"
my @DEAD = (7690, 7691);                 # nothing listens
my $PROXY_BASE = 7700;                   # one listening port per upstream
my $HTTP_PROXY_BASE = 7750;              # one listening port per http upstream
my $HTTP_PORT = 7800;                    # consul_upstream_status
my $API_PORT = 8654;                     # the Consul HTTP API double
my $API_CONTROL_PORT = 8655;             # ...and its control port

my $HANG_CONNECTION = 20;                # seconds: a connection that takes longer hangs
my $HANG_T = 60;                         # nginx -t
my $HANG_STOP = 15;                      # from QUIT to the master's exit

# --- the generator ----------------------------------------------------------

sub pick { $_[int rand @_] }
sub chance { rand() < $_[0] }
sub shuffle { my @a = @_; for (my $i = @a; --$i > 0;) { my $j = int rand($i + 1); @a[$i, $j] = @a[$j, $i] } @a }

my @SERVICES = qw(redis api cache db);

# How often one choice is made invalid on purpose: about half the
# configurations pass nginx -t.
my $BAD = 0.02;
sub bad { chance($BAD) }

sub a_time {
    return pick('1s1s', '30s1m', '0', 'abc', '-1s', '1y', '25d', '1.5s', '', 'ms', '99999999999999999999s')
        if bad();
    return pick('1m 30s', '1m30', '2 ', '1w') if chance(0.02);              # nginx's odd but valid times
    return pick('200ms', '300ms', '500ms', '1s', '2', '1s500ms', '700ms', '1500ms');
}

sub a_size {
    return pick('1k', '2048m', 'abc', '0', '31k', '1g', '') if bad();
    return pick('32k', '64k', '128k', '256k', '1m', '1m', '8m', '64m', '1024m');
}

# A query, as written on the line, and the SRV name it asks for (undef if invalid).
sub a_query {
    my $svc = pick(@SERVICES);
    if (bad()) {
        return pick([$svc, undef], ["$svc..service.consul", undef], ["s\$vc.service.consul", undef],
                    ["service=$svc.x", undef], ['x' x 70 . '.service.consul', undef])->@*;
    }
    my $r = rand;
    return ("$svc.service.consul", "$svc.service.consul") if $r < 0.35;
    return ("$svc.service.dc1.consul", "$svc.service.dc1.consul") if $r < 0.5;
    return ("primary.$svc.service.consul", "primary.$svc.service.consul") if $r < 0.6;
    return ("_${svc}._tcp.service.consul", "_${svc}._tcp.service.consul") if $r < 0.65;
    return (ucfirst($svc) . ".Service.Consul.", "$svc.service.consul") if $r < 0.7;
    my ($tag, $dc) = (chance(0.3) ? 'primary' : undef, chance(0.4) ? 'dc1' : undef);
    my @w = ("service=$svc");
    push @w, "tag=$tag" if $tag;
    push @w, "datacenter=$dc" if $dc;
    push @w, 'domain=consul' if chance(0.2);
    my $name = join '.', grep { defined } $tag, $svc, 'service', $dc, 'consul';
    return (join(' ', @w), $name);
}

# An api= line's query: ([words], undef, service name or undef). Most ask the
# API double; some a dead port, https of a plain HTTP agent (a failing TLS
# handshake) or the agent by host name.
sub an_api_query {
    my ($case) = @_;
    my $svc = pick(@SERVICES);
    my $agent = "http://127.0.0.1:$API_PORT";
    if (bad()) {
        return (pick(["$svc.service.consul", "api=$agent"], ["api=$agent"],
                     ["service=$svc", "api=ftp://127.0.0.1:$API_PORT"], ["service=$svc", "api=$agent", 'domain=consul'],
                     ["service=$svc", "api=$agent", 'wait=11m'], ["service=$svc", "api=$agent", "api_ca=$case/ca.pem"],
                     ["service=$svc", 'only_passing'], ["service=$svc", "api=$agent", "token_file=$case/missing"],
                     ["service=a/b", "api=$agent"], ["service=$svc", "api=$agent", 'only_passing=1']),
                undef, undef);
    }
    my $r = rand;
    $agent = "http://127.0.0.1:$DEAD[0]" if $r < 0.05;
    $agent = "https://127.0.0.1:$API_PORT" if $r >= 0.05 && $r < 0.08;
    $agent = "http://localhost:$API_PORT" if $r >= 0.08 && $r < 0.15;
    my @w = ("service=$svc", "api=$agent");
    push @w, 'tag=primary' if chance(0.25);
    push @w, 'tag=v2' if chance(0.05);
    push @w, 'datacenter=' . pick('yunlu_office', 'yunlu_office', 'dc1') if chance(0.2);
    push @w, 'only_passing' if chance(0.3);
    push @w, 'filter=' . pick('Service.Port != 7604', '"primary" in Service.Tags', 'Node.Node == node-127.0.0.1',
                              'Service.Nope == 1')
        if chance(0.15);
    push @w, 'wait=' . pick('1s', '2s', '10s', '1m', '5m') if chance(0.3);
    push @w, "token_file=$case/token" if chance(0.15);
    return (\@w, undef, $svc);
}

# One consul_upstream line: (text, SRV name or undef, API service or undef).
sub a_line {
    my ($first, $case) = @_;
    my ($q, $name, $api) = chance(0.2) ? an_api_query($case) : a_query();
    my @p;
    my $r = rand;
    if ($api && chance(0.7)) {
        # No resolver: an API line needs one only for host names in answers.
    } elsif ($r < 0.75) {
        push @p, "resolver=127.0.0.1:$DnsPort";
    } elsif ($r < 0.85) {
        push @p, 'resolver=127.0.0.1:1', "resolver=127.0.0.1:$DnsPort";    # a dead one first
    } elsif ($r < 0.9) {
        push @p, 'resolver=127.0.0.1:1';
    } elsif ($r < 0.93) {
        push @p, "resolver=[::1]:$DnsPort";
    } elsif ($r < 0.95 && bad()) {
        push @p, pick('resolver=localhost', 'resolver=300.1.1.1', 'resolver=', 'resolver=1.2.3.4:0');
    } else {
        push @p, "resolver=127.0.0.1:$DnsPort", "resolver=127.0.0.2:$DnsPort";
    }
    push @p, 'interval=' . a_time() if chance(0.8);
    push @p, 'timeout=' . a_time() if chance(0.5);
    push @p, pick('tcp', 'udp') if chance(0.3) && (!$api || grep { /^resolver=/ } @p);
    push @p, pick('tcp', 'udp') if bad();
    push @p, 'on_empty=' . (bad() ? 'drop' : pick('keep', 'fail')) if chance(0.3);
    push @p, 'on_error=' . pick('keep', 'fail') if chance(0.3);
    push @p, 'max_stale=' . (chance(0.2) ? 'off' : a_time()) if chance(0.2);
    if ($first || bad()) {
        push @p, 'zone=' . a_size() if chance(0.4);
        if (chance(0.2)) {
            my $file = pick('st/a.state', 'st/b.state', 'st/c.state', 'st/d.state', 'missing/x.state',
                            bad() ? pick('./st/sub/../a.state', 'st//b.state', 'link/a.state', 'st') : ());
            push @p, "state=$case/$file";
        }
        push @p, 'max_fails=' . (bad() ? pick('+1', 'x', '') : pick(0, 1, 3)) if chance(0.2);
        push @p, 'fail_timeout=' . a_time() if chance(0.2);
        push @p, 'slow_start=' . a_time() if chance(0.1);
        push @p, 'max_conns=' . (bad() ? pick('+1', 'x', '-1', '') : pick(0, 1, 2, 10)) if chance(0.15);
    }
    if (bad()) {                                         # mutations
        my $i = int rand @p;
        if (@p) {
            my $m = rand;
            if ($m < 0.3) { push @p, $p[$i] }                                  # a duplicate
            elsif ($m < 0.5) { $p[$i] =~ s/=.*//s }                             # no value
            elsif ($m < 0.7) { $p[$i] =~ s/=/==/ }
            else { push @p, pick('weight=2', 'backup', 'down', '""', "\xc3\xa9t\xc3\xa9", '=') }
        }
    }
    my @q = ref $q ? @$q : split(' ', $q);
    my @words = shuffle(@q, @p);
    @words = (@q, @p) if chance(0.5);                      # the usual order
    my $text = 'consul_upstream ' . join(' ', map { / |^$|"/ ? "'$_'" : $_ } @words) . ';';
    return ($text, $name, $api);
}

sub a_server {
    my ($plain, $http) = @_;
    my $addr = bad() ? pick('127.0.0.1', 'nowhere.invalid:7600')
             : chance(0.9) ? '127.0.0.1:' . pick(@BACKENDS, @DEAD) : pick('localhost:7600', '[::1]:7600');
    my @p;
    push @p, 'weight=' . pick(1, 2, 5) if chance(0.2);
    push @p, 'max_fails=' . pick(0, 1, 2) if chance(0.1);
    push @p, 'fail_timeout=' . pick('1s', '10s') if chance(0.1);
    push @p, 'max_conns=' . pick(1, 10) if chance($http ? 0.1 : 0.05);
    push @p, 'slow_start=' . pick('10s', '30s') if $http && bad();    # NGINX Plus only
    push @p, 'backup' if chance($plain ? 0.1 : 0.35);
    push @p, 'down' if chance(0.08);
    return join(' ', 'server', $addr, @p) . ';';
}

sub a_method {
    my ($http) = @_;
    return pick('hash;', 'random three;', 'least_conn x;', $http ? ('ip_hash x;', 'least_time header;') : ())
        if bad();
    return pick('least_conn;', 'hash $request_uri;', 'hash $request_uri consistent;', 'hash $remote_addr;',
                'random;', 'random two;', 'random two least_conn;', 'ip_hash;', 'ip_hash;')
        if $http;
    return pick('least_conn;', 'hash $remote_addr;', 'hash $remote_addr consistent;', 'random;',
                'random two;', 'random two least_conn;', 'hash $remote_port;');
}

# keepalive and its companions in an http upstream.
sub keepalive_directives {
    return pick('keepalive;', 'keepalive 0;', 'keepalive x;', 'keepalive_timeout abc;') if bad();
    my @d = ('keepalive ' . pick(1, 2, 4, 16, 32) . ';');
    push @d, 'keepalive_requests ' . pick(2, 10, 1000) . ';' if chance(0.2);
    push @d, 'keepalive_timeout ' . pick('1s', '5s', '60s') . ';' if chance(0.2);
    return @d;
}

my @ZONE_NAMES = qw(z0 z1 z2);

# The name of a consul_upstream upstream's zone (core/src/key.rs), with the zone
# layout's version as core/src/zone/layout.rs states it.
my $OUR_ZONE = do {
    open my $fh, '<', "$Root/core/src/zone/layout.rs" or die "core/src/zone/layout.rs: $!\n";
    my ($layout) = map { /^pub const LAYOUT: u32 = (\d+);/ ? $1 : () } <$fh>;
    die "config-fuzz: no LAYOUT in core/src/zone/layout.rs\n" unless $layout;
    "consul_upstream:v$layout:";
};

# One upstream block: (text, [SRV names], [API services], whether it has
# consul_upstream lines). PROTOCOL: stream or http.
sub an_upstream {
    my ($name, $case, $all_names, $protocol) = @_;
    my $http = $protocol eq 'http';
    my $plain = chance(0.12);
    my (@lines, @names, @api);
    if (!$plain) {
        my $n = chance(0.25) ? 2 + int rand 2 : 1;
        for my $i (0 .. $n - 1) {
            my ($t, $srv, $svc) = a_line($i == 0, $case);
            push @lines, $t;
            push @names, $srv if defined $srv;
            push @api, $svc if defined $svc;
        }
        push @lines, $lines[0] if bad();                     # the same line twice
    }
    my @directives = @lines;
    push @directives, a_method($http) if chance(0.5);
    push @directives, a_method($http) if bad();
    push @directives, keepalive_directives() if $http && chance(0.6);
    if (chance(0.35)) {
        my $z = rand;
        my $zname = bad() ? $OUR_ZONE . pick('stream:', 'http:') . pick(@$all_names) : pick(@ZONE_NAMES);
        my $size = bad() ? pick('', '16k', 'x') : pick('64k', '128k', '1m');
        push @directives, "zone $zname" . (length $size ? " $size" : '') . ';';
    }
    my $servers = $plain ? 1 + int rand 3 : (chance(0.5) ? 0 : 1 + int rand 3);
    push @directives, a_server($plain, $http) for 1 .. $servers;
    push @directives, ($http ? pick('least_time header;', 'hash $request_uri consistent x;', 'sticky cookie s;')
                             : pick('keepalive 4;', 'least_time connect;', 'ip_hash;'))
        if bad();
    if (chance(0.6)) {
        # Any order, but the consul_upstream lines keep theirs (the first one
        # carries the upstream-wide parameters).
        my @order = shuffle(0 .. $#directives);
        my @slots = sort { $a <=> $b } grep { $order[$_] < @lines } 0 .. $#order;
        my @shuffled = @directives[@order];
        @shuffled[@slots] = @lines;
        @directives = @shuffled;
    }
    my $text = "    upstream $name {\n" . join('', map { "        $_\n" } @directives) . "    }\n";
    return ($text, \@names, \@api, scalar @lines);
}

# A whole configuration: { text, ports => [stream proxy ports], http_ports =>
# [http proxy ports], names => [SRV names], api => [API services], http (the
# status location is there), listed => ["protocol/name" of every upstream with
# consul_upstream lines, as the status page lists them] }. Upstreams: 0 to 3
# stream ones and 0 to 2 http ones (at least one); an http one may have the
# name of a stream one; http {} before or after stream {}.
sub a_config {
    my ($case) = @_;
    my $workers = pick(1, 2);
    my $n_stream = int rand 4;
    my $n_http = int rand 3;
    $n_stream = 1 if $n_stream + $n_http == 0;
    my @unames = map { "u$_" } 0 .. $n_stream - 1;
    my @hnames = map { @unames && chance(0.4) ? pick(@unames) : "h$_" } 0 .. $n_http - 1;
    my %hseen;
    @hnames = map { $hseen{$_}++ ? "h$_" : $_ } @hnames;      # two http upstreams "u0": nginx refuses
    my (@blocks, @hblocks, @names, @api, @ports, @hports, %listed);
    for my $i (0 .. $#unames) {
        my ($t, $names, $api, $lines) = an_upstream($unames[$i], $case, [@unames, @hnames], 'stream');
        push @blocks, $t;
        push @names, @$names;
        push @api, @$api;
        push @{ $listed{stream} }, "stream/$unames[$i]" if $lines;
    }
    for my $i (0 .. $#hnames) {
        my ($t, $names, $api, $lines) = an_upstream($hnames[$i], $case, [@unames, @hnames], 'http');
        push @hblocks, $t;
        push @names, @$names;
        push @api, @$api;
        push @{ $listed{http} }, "http/$hnames[$i]" if $lines;
    }
    my $servers = '';
    for my $i (0 .. $#unames) {
        my $port = $PROXY_BASE + $i;
        push @ports, $port;
        my @d = ("listen 127.0.0.1:$port" . (chance(0.2) && $workers > 1 ? ' reuseport' : '') . ';',
                 "proxy_pass $unames[$i];", 'proxy_connect_timeout 1s;', 'proxy_timeout 3s;');
        push @d, 'proxy_next_upstream ' . pick('on', 'off') . ';' if chance(0.3);
        push @d, 'proxy_next_upstream_tries ' . pick(1, 2, 5) . ';' if chance(0.2);
        push @d, 'proxy_next_upstream_timeout 5s;' if chance(0.2);
        push @d, 'proxy_ssl on;' if $HasSsl && chance(0.05);
        $servers .= "    server { " . join(' ', @d) . " }\n";
    }
    my $hservers = '';
    for my $i (0 .. $#hnames) {
        my $port = $HTTP_PROXY_BASE + $i;
        push @hports, $port;
        my @d = ("proxy_pass http://$hnames[$i];", 'proxy_connect_timeout 1s;', 'proxy_read_timeout 3s;');
        push @d, 'proxy_http_version 1.1;', 'proxy_set_header Connection "";' if chance(0.6);
        push @d, 'proxy_next_upstream ' . pick('error timeout', 'error timeout http_502 http_503', 'off',
                                              'error non_idempotent', 'http_404') . ';'
            if chance(0.3);
        push @d, 'proxy_next_upstream_tries ' . pick(0, 1, 2, 5) . ';' if chance(0.2);
        push @d, 'proxy_next_upstream_timeout ' . pick('0', '5s') . ';' if chance(0.2);
        push @d, 'add_header X-Upstream $upstream_addr;' if chance(0.2);
        push @d, pick('proxy_http_version 3;', 'proxy_next_upstream sometimes;') if bad();
        $hservers .= "    server {\n        listen 127.0.0.1:$port" . (chance(0.2) && $workers > 1 ? ' reuseport' : '')
            . ";\n        location / { " . join(' ', @d) . " }\n    }\n";
    }
    my $status = @hnames || chance(0.3);
    my $stream = @unames ? join('', "stream {\n", @blocks, $servers, "}\n") : '';
    my $http = $status || @hnames
        ? join('', "http {\n    access_log off;\n", @hblocks, $hservers,
               ($status ? "    server {\n        listen 127.0.0.1:$HTTP_PORT;\n"
                    . "        location = /status { consul_upstream_status; }\n"
                    . "        location = /metrics { consul_upstream_status prometheus; }\n    }\n" : ()),
               "}\n")
        : '';
    my $text = join '',
        (map { "load_module $_;\n" } @Extra, $Module),
        "worker_processes $workers;\n",
        "master_process on;\n",
        "daemon off;\n",
        "error_log logs/error.log info;\n",
        "pid logs/nginx.pid;\n",
        "events { worker_connections 4096; }\n",
        chance(0.5) ? ($stream, $http) : ($http, $stream);
    # The status page: stream upstreams first, then http ones, each in configuration order.
    my @listed = map { @{ $listed{$_} // [] } } 'stream', 'http';
    return { text => $text, ports => \@ports, http_ports => \@hports, names => \@names, api => \@api,
             http => $status, listed => \@listed };
}

# DNS instances for the SRV names: some have none (NXDOMAIN), some peers refuse.
sub instances_for {
    my ($names) = @_;
    my %seen;
    my $text = '';
    for my $name (grep { !$seen{$_}++ } @$names) {
        next if chance(0.2);
        for (1 .. 1 + int rand 4) {
            my $addr = chance(0.1) ? '127.0.0.' . (2 + int rand 3) : '127.0.0.1';
            my $port = chance(0.15) ? pick(@DEAD) : pick(@BACKENDS);
            $text .= "instance $name $addr:$port weight=" . pick(0, 1, 1, 2, 5) . ' priority=' . pick(1, 1, 1, 2) . "\n";
        }
    }
    return $text;
}

my @MODES = (('ok') x 12, ('consul') x 3, 'flap', 'flap', 'slow:0.05', 'never', 'random', 'wrong_id',
             'long_prefix', 'lying_counts', 'ptr_loop', 'wrong_question', 'other_name', 'many',
             'count_10k', 'close_mid', 'servfail', 'nxdomain');

# --- the backends -------------------------------------------------------------

# One process of the fuzzer's own answers on each backend port: not nginx's
# own listening sockets, which the module leaves out of every answer
# (instances there would never be discovered peers). What a client sends first
# tells the protocol: an HTTP request gets "HTTP/1.1 200" with the body
# "b<port> N", N the request's rank on its connection (keep-alive unless the
# request says close: nginx's upstream keepalive reuses it), anything else (the fuzzer's stream
# clients send "s\n", proxy_ssl a ClientHello) "b<port>\n" and the close.
my $BackendsPid;

sub backends_start {
    my @socks = map {
        IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $_, Proto => 'tcp', Listen => 1024,
                              ReuseAddr => 1)
            or die "config-fuzz: cannot listen on 127.0.0.1:$_: $!\n"
    } @BACKENDS;
    $BackendsPid = fork // die "fork: $!";
    if (!$BackendsPid) {
        setsid();
        $SIG{PIPE} = 'IGNORE';
        my %listener = map { $_ => 1 } @socks;
        my %buf;                                   # client socket => what it sent so far
        my %port;                                  # client socket => the backend port
        my %served;                                # client socket => HTTP requests answered on it
        my $sel = IO::Select->new(@socks);
        my $drop = sub { my $c = shift; $sel->remove($c); delete @$_{$c} for \%buf, \%port, \%served; close $c };
        while (1) {
            for my $h ($sel->can_read) {
                if ($listener{$h}) {
                    my $c = $h->accept or next;
                    $sel->add($c);
                    ($buf{$c}, $port{$c}) = ('', $h->sockport);
                    next;
                }
                my $n = sysread $h, $buf{$h}, 65536, length $buf{$h};
                if (!$n) { $drop->($h); next }
                if ($buf{$h} !~ /^[A-Z]/) {             # not HTTP
                    syswrite $h, "b$port{$h}\n";
                    $drop->($h);
                    next;
                }
                my $close = 0;
                while ($buf{$h} =~ s/\A(.*?)\r\n\r\n//s) {
                    my $head = $1;
                    my ($version) = $head =~ m{\A\S+ \S+ HTTP/(1\.[01])\r\n};
                    $close = !defined $version || $head =~ /^Connection:\s*close/mi
                        || ($version eq '1.0' && $head !~ /^Connection:\s*keep-alive/mi);
                    my $body = "b$port{$h} " . ++$served{$h} . "\n";    # the request's rank on its connection
                    syswrite $h, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                        . length($body) . "\r\n" . ($close ? "Connection: close\r\n" : '') . "\r\n$body";
                    last if $close;
                }
                $drop->($h) if $close || length $buf{$h} > 65536;
            }
        }
    }
    close $_ for @socks;
}

sub backends_stop {
    return unless $BackendsPid;
    kill 'KILL', $BackendsPid;
    waitpid($BackendsPid, 0);
    undef $BackendsPid;
}

# --- the Consul HTTP API double (t/lib/consul_api_double.py) ------------------

my $Http = HTTP::Tiny->new(timeout => 10);
my $Json = JSON::PP->new->canonical;
my $ApiPid;
my @API_NODES = map { "127.0.0.$_" } 1 .. 4;

sub api_put {
    my ($path, $data) = @_;
    my $r = $Http->request('PUT', "http://127.0.0.1:$API_CONTROL_PORT$path",
                           { content => $Json->encode($data) });
    die "config-fuzz: API double: PUT $path: $r->{status} $r->{content}\n" unless $r->{success};
}

sub api_start {
    $ApiPid = fork // die "fork: $!";
    if (!$ApiPid) {
        setsid();
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', "$Work/api-double.log";
        open STDERR, '>&', \*STDOUT;
        exec('python3', "$Root/t/lib/consul_api_double.py", '--port', $API_PORT,
             '--control-port', $API_CONTROL_PORT) or POSIX::_exit(127);
    }
    for (1 .. 200) {
        return 1 if $Http->get("http://127.0.0.1:$API_CONTROL_PORT/state")->{success};
        die "config-fuzz: the API double exited (see $Work/api-double.log)\n"
            if waitpid($ApiPid, WNOHANG) == $ApiPid;
        sleep 0.05;
    }
    die "config-fuzz: the API double did not start (see $Work/api-double.log)\n";
}

sub api_stop {
    return unless $ApiPid;
    kill 'KILL', -$ApiPid;
    waitpid($ApiPid, 0);
    undef $ApiPid;
}

# How the double's health answers misbehave (t/lib/consul_api_double.py).
my @API_MODES = (('ok') x 12, 'no_leader', 'permission_denied', 'close', 'truncated', 'close_mid_body',
                 'malformed', 'wrong_types', 'object', 'index_zero', 'no_index', 'gzip', 'http10',
                 'bad_chunk', 'drop_keepalive', 'silent');

# The double's catalog: random instances of the API lines' services (some on
# dead ports, some not passing, some services with none).
sub api_instances {
    my ($services) = @_;
    api_put('/deregister', { Node => "node-$_" }) for @API_NODES;
    my %seen;
    for my $svc (grep { !$seen{$_}++ } @$services) {
        next if chance(0.15);
        for (1 .. 1 + int rand 4) {
            my $addr = chance(0.1) ? pick(@API_NODES[1 .. 3]) : $API_NODES[0];
            my $port = chance(0.15) ? pick(@DEAD) : pick(@BACKENDS);
            my $id = "$svc-$addr-$port";
            api_put('/register', {
                Node => "node-$addr", Address => $addr,
                Service => { ID => $id, Service => $svc, Port => 0 + $port, Address => '',
                             Tags => [chance(0.5) ? ('primary') : ()],
                             Weights => { Passing => pick(1, 1, 2, 5), Warning => pick(0, 1, 1) } },
                Checks => [
                    { CheckID => 'serfHealth', Name => 'Serf Health Status',
                      Status => chance(0.05) ? 'critical' : 'passing' },
                    { CheckID => "service:$id", Name => "Service '$svc' check", ServiceID => $id,
                      Status => pick(('passing') x 6, 'warning', 'critical') },
                ],
            });
        }
    }
}

# --- running nginx ----------------------------------------------------------

sub write_file {
    my ($file, $text) = @_;
    open my $fh, '>', $file or die "$file: $!\n";
    print $fh $text;
    close $fh;
}

sub read_file {
    my $file = shift;
    open my $fh, '<', $file or return '';
    local $/;
    return <$fh> // '';
}

# Runs a command with a time limit: (status string, output). Status: "exit N",
# "signal N" or "hang".
sub run_limited {
    my ($limit, @cmd) = @_;
    pipe(my $r, my $w) or die "pipe: $!";
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        close $r;
        open STDOUT, '>&', $w;
        open STDERR, '>&', $w;
        setsid();
        exec(@cmd) or POSIX::_exit(127);
    }
    close $w;
    my ($out, $sel, $deadline) = ('', IO::Select->new($r), time + $limit);
    while (1) {
        my $left = $deadline - time;
        last if $left <= 0;
        next unless $sel->can_read($left);
        my $n = sysread $r, $out, 65536, length $out;
        last unless $n;
    }
    my $status;
    for (1 .. 100) {
        last if waitpid($pid, WNOHANG) == $pid && defined($status = $?);
        last if time > $deadline;
        sleep 0.01;
    }
    if (!defined $status) {
        kill 'KILL', -$pid;
        waitpid($pid, 0);
        return ('hang', $out);
    }
    return ($status & 127 ? 'signal ' . ($status & 127) : 'exit ' . ($status >> 8), $out);
}

# One connection through nginx: "b<port>", "closed", "reset", "refused" or "hang".
sub connect_once {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 3)
        or return 'refused';
    local $SIG{PIPE} = 'IGNORE';
    syswrite $s, "s\n";                          # what tells the backend this is no HTTP
    my ($buf, $sel, $deadline) = ('', IO::Select->new($s), time + $HANG_CONNECTION);
    while (1) {
        my $left = $deadline - time;
        if ($left <= 0) { close $s; return 'hang' }
        next unless $sel->can_read($left);
        my $n = sysread $s, $buf, 4096, length $buf;
        if (!defined $n) { close $s; return 'reset' }
        last if $n == 0;
    }
    close $s;
    return $buf =~ /^(b\d+)/ ? $1 : 'closed';
}

# HTTP/1.1 requests for PATHS on one client connection, one after the other
# (keep-alive, the last one Connection: close): a list of [status code, body],
# or, where it went wrong, ["refused", "reset", "bad" (no whole response) or
# "hang"] as the last item. A response with "Connection: close" ends the list
# early (nginx may close a kept-alive connection; that is no failure).
sub http_requests {
    my ($port, @paths) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 3)
        or return (['refused', '']);
    local $SIG{PIPE} = 'IGNORE';
    my ($buf, $sel, @out) = ('', IO::Select->new($s));
    for my $i (0 .. $#paths) {
        my $last = $i == $#paths;
        syswrite $s, "GET $paths[$i] HTTP/1.1\r\nHost: x\r\nConnection: " . ($last ? 'close' : 'keep-alive')
            . "\r\n\r\n";
        my $deadline = time + $HANG_CONNECTION;
        my ($code, $head, $length, $eof);
        while (1) {
            if (!defined $code && $buf =~ s{\AHTTP/1\.1 (\d{3})[^\r\n]*\r\n(.*?)\r\n\r\n}{}s) {
                ($code, $head) = ($1, $2);
                ($length) = $head =~ /^Content-Length:\s*(\d+)/mi;
            }
            last if defined $code && defined $length && length $buf >= $length;
            last if $eof;
            my $left = $deadline - time;
            if ($left <= 0) { close $s; return (@out, ['hang', '']) }
            next unless $sel->can_read($left);
            my $n = sysread $s, $buf, 65536, length $buf;
            if (!defined $n) { close $s; return (@out, ['reset', '']) }
            $eof = 1 if $n == 0;
        }
        # Without Content-Length a response ends with the connection (the last one only).
        if (!defined $code || (defined $length ? length $buf < $length : !$eof)) {
            close $s;
            return (@out, ['bad', $buf]);
        }
        push @out, [$code, substr($buf, 0, $length // length $buf, '')];
        last if $head =~ /^Connection:\s*close/mi || $eof;
    }
    close $s;
    return @out;
}

# One request (Connection: close): (status code or what went wrong, body).
sub http_request { my ($port, $path) = @_; return @{ (http_requests($port, $path))[-1] } }

sub http_get { my ($code, $body) = http_request($HTTP_PORT, @_); return wantarray ? ($code, $body) : $code }

sub worker_pids {
    my ($master) = @_;
    my @w;
    for my $dir (glob '/proc/[0-9]*') {
        my ($pid) = $dir =~ /(\d+)$/;
        open my $fh, '<', "$dir/stat" or next;
        my $stat = <$fh> // next;
        my ($ppid) = $stat =~ /\) \S+ (\d+)/ or next;
        next unless $ppid == $master;
        my $cmd = read_file("$dir/cmdline");
        push @w, $pid if $cmd =~ /worker process/ && $cmd !~ /shutting down/;
    }
    @w = sort { $a <=> $b } @w;
    return @w;
}

sub worker_count { my @w = worker_pids(@_); return scalar @w }

# What the fuzzer did, with the time, in the case's logs/actions (to read
# beside nginx's error log).
sub action {
    my ($case, $what) = @_;
    open my $fh, '>>', "$case/logs/actions" or return;
    my ($s, $us) = Time::HiRes::gettimeofday();
    my @t = localtime $s;
    printf $fh "%04d/%02d/%02d %02d:%02d:%02d.%03d %s\n", $t[5] + 1900, $t[4] + 1, @t[3, 2, 1, 0], $us / 1000, $what;
}

# What nginx's processes are doing (for a hang): their titles and states, and
# their stacks when gdb is there (full output in the case's logs/stacks).
sub diagnose {
    my ($case, $master) = @_;
    my @pids = ($master);
    for my $dir (glob '/proc/[0-9]*') {
        my ($pid) = $dir =~ /(\d+)$/;
        my $stat = read_file("$dir/stat");
        push @pids, $pid if $stat =~ /\) \S+ $master /;
    }
    my $text = '';
    for my $pid (@pids) {
        my ($state) = read_file("/proc/$pid/stat") =~ /\) (\S+) /;
        my $title = read_file("/proc/$pid/cmdline") =~ tr/\0/ /r;
        my $wchan = read_file("/proc/$pid/wchan");
        $text .= "\n    $pid ($title) state " . ($state // "?") . " wchan $wchan";
        my $gdb = `gdb -batch -p $pid -ex bt 2>/dev/null` // '';
        open my $fh, '>>', "$case/logs/stacks";
        print $fh "--- $pid ($title)\n$gdb\n";
        my @frames = grep { /^#\d+/ } split /\n/, $gdb;
        $text .= "\n      $_" for @frames[0 .. ($#frames < 7 ? $#frames : 7)];
    }
    return $text;
}

# The nginx being run (its own process group), stopped if the fuzzer is.
our $Running;
END { kill 'KILL', -$Running if $Running; api_stop(); backends_stop() }

# --- one case -----------------------------------------------------------------

my %stats = (cases => 0, accepted => 0, refused => 0, started => 0, with_api => 0, reloads => 0,
             kills => 0, connections => 0, answered => 0, with_http => 0, requests => 0, requests_answered => 0,
             requests_reused => 0, requests_client_kept => 0);
my %refusals;
my %statuses;                                   # HTTP requests through http upstreams, by status
my @failures;

sub fail {
    my ($seed, $case, $why, $conf, $log) = @_;
    push @failures, $seed;
    my $lines = join "\n", grep { /\[(alert|crit|emerg)\]|exited on signal|panicked|core dumped/ } split /\n/, $log // '';
    print "\nconfig-fuzz: FAILED seed=$seed: $why\n";
    print "--- configuration ($case/conf/nginx.conf)\n$conf";
    print "--- error log (alert, crit, emerg, signals)\n$lines\n" if length $lines;
    print "--- replay: scripts/config-fuzz.pl --seed $seed --count 1 --keep\n\n";
    return 0;
}

sub nginx_t {
    my ($case) = @_;
    return run_limited($HANG_T, $Nginx, '-t', '-p', "$case/", '-c', 'conf/nginx.conf', '-e', 'logs/t.log');
}

sub run_case {
    my ($seed) = @_;
    srand($seed);
    my $case = "$Work/case-$seed";
    remove_tree($case);
    make_path("$case/conf", "$case/logs", "$case/st/sub");
    symlink("$case/st", "$case/link");
    write_file("$case/token", "6d7e8f90-1c2b-4a3d-9e8f-0a1b2c3d4e5f\n");
    my $cfg = a_config($case);
    write_file("$case/conf/nginx.conf", $cfg->{text});
    $stats{cases}++;

    my ($st, $out) = nginx_t($case);
    if ($st eq 'hang' || $st =~ /^signal/ || $out =~ /panicked/) {
        return fail($seed, $case, "nginx -t: $st", $cfg->{text}, $out);
    }
    if ($st ne 'exit 0') {
        my ($msg) = $out =~ /\[emerg\] (.*?)(?: in \S+:\d+)?$/m;
        return fail($seed, $case, "nginx -t refused it without an [emerg] message", $cfg->{text}, $out)
            unless defined $msg;
        $msg =~ s/"[^"]*"/"…"/g;
        $msg =~ s{ /\S+:\d+}{ FILE:LINE}g;
        $refusals{$msg}++;
        $stats{refused}++;
        remove_tree($case) unless $opt{keep};
        return 1;
    }
    $stats{accepted}++;
    if (rand() >= $opt{run_fraction}) {
        remove_tree($case) unless $opt{keep};
        return 1;
    }
    return start_and_use($seed, $case, $cfg) && do { remove_tree($case) unless $opt{keep}; 1 };
}

sub start_and_use {
    my ($seed, $case, $cfg) = @_;
    $stats{started}++;
    $stats{with_api}++ if @{ $cfg->{api} };
    $stats{with_http}++ if @{ $cfg->{http_ports} };
    hostile_mode('ok');
    hostile_instances(instances_for($cfg->{names}));
    api_put('/mode', { mode => 'ok' });
    api_instances($cfg->{api});
    my $log_file = "$case/logs/error.log";
    my $master = fork // die "fork: $!";
    $Running = $master;
    if (!$master) {
        setsid();
        open STDOUT, '>', "$case/logs/stdout";
        open STDERR, '>&', \*STDOUT;
        exec($Nginx, '-p', "$case/", '-c', 'conf/nginx.conf') or POSIX::_exit(127);
    }
    my $texts = $cfg->{text};
    my $finish = sub {
        my ($why) = @_;
        $why .= diagnose($case, $master) if $why =~ /hung|within|did not/;
        kill 'KILL', -$master;
        waitpid($master, 0);
        undef $Running;
        return fail($seed, $case, $why, $texts, read_file($log_file) . read_file("$case/logs/stdout"));
    };
    # Started: the workers are up.
    my $deadline = time + 15;
    my ($workers) = $cfg->{text} =~ /worker_processes (\d)/;
    while (time < $deadline && worker_count($master) < $workers) {
        if (waitpid($master, WNOHANG) == $master) {
            my $st = $? & 127 ? 'signal ' . ($? & 127) : 'exit ' . ($? >> 8);
            kill 'KILL', -$master;
            undef $Running;
            return fail($seed, $case, "nginx did not start after nginx -t accepted it ($st)", $texts,
                        read_file($log_file) . read_file("$case/logs/stdout"));
        }
        sleep 0.05;
    }
    return $finish->('nginx started no workers within 15 s') if worker_count($master) < $workers;

    my %killed;                                              # workers this run killed
    my $phases = 1 + int rand 3;
    for my $phase (1 .. $phases) {
        my $mode = pick(@MODES);
        hostile_mode($mode);
        my $api_mode = pick(@API_MODES);
        api_put('/mode', { mode => $api_mode });
        $mode .= ", API mode $api_mode";
        action($case, "phase $phase: DNS mode $mode");
        hostile_instances(instances_for($cfg->{names})) if chance(0.4);
        api_instances($cfg->{api}) if chance(0.4);
        sleep(0.2 + rand 0.8);
        for my $port (@{ $cfg->{ports} }) {
            for (1 .. 1 + int rand 3) {
                my $r = connect_once($port);
                $stats{connections}++;
                $stats{answered}++ if $r =~ /^b/;
                return $finish->("a connection to port $port hung (DNS mode $mode)") if $r eq 'hang';
            }
        }
        for my $port (@{ $cfg->{http_ports} }) {
            # 1 to 3 client connections of 1 to 3 requests (a client's keep-alive)
            for (1 .. 1 + int rand 3) {
                my @paths = map { pick('/', '/a', '/b?x=1', '/' . int rand 1000) } 1 .. (chance(0.3) ? 2 + int rand 2 : 1);
                my @answers = http_requests($port, @paths);
                $stats{requests_client_kept} += @answers - 1;
                for my $r (@answers) {
                    my ($code, $body) = @$r;
                    $stats{requests}++;
                    $stats{requests_answered}++ if $code eq '200' && $body =~ /^b\d+ \d+$/;
                    $stats{requests_reused}++ if $code eq '200' && $body =~ /^b\d+ ([2-9]|\d\d+)$/;
                    $statuses{$code}++;
                    # nginx answers every request (502, 504 when no peer can): no answer is a failure
                    return $finish->("GET @paths on port $port: $code (DNS mode $mode)") if $code !~ /^\d+$/;
                }
            }
        }
        if ($cfg->{http}) {
            for my $path ('/status', '/metrics') {
                my ($code, $body) = http_get($path);
                return $finish->("GET $path: $code (DNS mode $mode)") if $code ne '200';
                next unless $path eq '/status';
                my $doc = eval { $Json->decode($body) };
                return $finish->("GET /status: not JSON: " . substr($body, 0, 200)) unless $doc;
                my $got = join ' ', map { "$_->{protocol}/$_->{name}" } @{ $doc->{upstreams} };
                my $want = join ' ', @{ $cfg->{listed} };
                return $finish->("GET /status lists \"$got\", not \"$want\"") if $got ne $want;
            }
        }
        if (chance(0.1)) {                                    # a worker killed (as by the OOM killer)
            my @w = worker_pids($master);
            if (@w) {
                my $victim = pick(@w);
                action($case, "SIGKILL to worker $victim");
                $killed{$victim} = 1;
                $stats{kills}++;
                kill 'KILL', $victim;
                my $until = time + 15;
                # The victim gone first: until then it may still count as a worker.
                sleep 0.05 while time < $until && (kill(0, $victim) || worker_count($master) < $workers);
                return $finish->("no worker replaced the killed one ($victim) within 15 s")
                    if worker_count($master) < $workers;
            }
        }
        if (chance(0.25)) {                                   # reload into another accepted configuration
            my $next = a_config($case);
            $next->{text} =~ s/worker_processes \d/worker_processes $workers/;
            write_file("$case/conf/next.conf", $next->{text});
            my ($st) = run_limited($HANG_T, $Nginx, '-t', '-p', "$case/", '-c', 'conf/next.conf', '-e', 'logs/t.log');
            return $finish->("nginx -t (reload candidate): $st") if $st eq 'hang' || $st =~ /^signal/;
            next unless $st eq 'exit 0';
            my @before = worker_pids($master);
            write_file("$case/conf/nginx.conf", $next->{text});
            $texts .= "--- reloaded into:\n$next->{text}";
            # Connections all along the reload, from another process.
            my $stop = "$case/stop-connections";
            unlink $stop;
            my @ports = @{ $cfg->{ports} };
            my @http_ports = @{ $cfg->{http_ports} };
            my $client = fork // die "fork: $!";
            if (!$client) {
                my $hung = 0;
                while (!-e $stop && !$hung) {
                    $hung = grep { connect_once($_) eq 'hang' } @ports;
                    $hung ||= grep { (http_request($_, '/'))[0] eq 'hang' } @http_ports;
                }
                POSIX::_exit($hung ? 1 : 0);
            }
            action($case, 'reload');
            kill 'HUP', $master;
            $stats{reloads}++;
            my $until = time + 15;
            my %old = map { $_ => 1 } @before;
            while (time < $until) {
                my @now = worker_pids($master);
                last if @now >= $workers && !grep { $old{$_} } @now;
                sleep 0.05;
            }
            my @now = worker_pids($master);
            write_file($stop, '');
            my $client_done = time + $HANG_CONNECTION + 5;
            sleep 0.05 while time < $client_done && waitpid($client, WNOHANG) != $client;
            my $client_status = kill(0, $client) ? -1 : $?;
            if ($client_status == -1) {
                kill 'KILL', $client;
                waitpid($client, 0);
            }
            return $finish->('the reload did not replace the workers within 15 s')
                if @now < $workers || grep { $old{$_} } @now;
            return $finish->('a connection during the reload hung') if $client_status != 0;
            $cfg = $next;
            hostile_instances(instances_for($cfg->{names}));
            api_instances($cfg->{api});
        }
        return $finish->('the master process died') if waitpid($master, WNOHANG) == $master;
    }

    # Stop: QUIT, as a reload-free shutdown would.
    action($case, 'QUIT');
    kill 'QUIT', $master;
    my $until = time + $HANG_STOP;
    my $status;
    while (time < $until) {
        if (waitpid($master, WNOHANG) == $master) { $status = $?; last }
        sleep 0.05;
    }
    return $finish->("nginx did not stop within $HANG_STOP s of QUIT") unless defined $status;
    kill 'KILL', -$master;                                     # nothing of it may be left
    undef $Running;
    my $log = read_file($log_file) . read_file("$case/logs/stdout");
    my @bad = grep {
        /exited on signal|core dumped|panicked|\[(?:alert|crit)\]/
            # what killing a worker brings: its death, and the lock it may have held
            && !(/worker process (\d+) exited on signal 9$/ && $killed{$1})
            && !(/shared memory zone "[^"]+" was locked by (\d+)$/ && $killed{$1})
    } split /\n/, $log;
    return fail($seed, $case, 'the error log says: ' . $bad[0], $texts, $log) if @bad;
    return fail($seed, $case, 'the master exited on signal ' . ($status & 127), $texts, $log) if $status & 127;
    return 1;
}

# --- main -----------------------------------------------------------------------

$SIG{INT} = $SIG{TERM} = sub {
    kill 'KILL', -$Running if $Running;
    hostile_stop();
    api_stop();
    backends_stop();
    remove_tree($Work) unless $opt{keep};
    exit 130;
};

# The module loads and a plain line passes: else every case would be
# "refused" for a reason that is not the case's.
{
    my $case = "$Work/check";
    make_path("$case/conf", "$case/logs");
    write_file("$case/conf/nginx.conf", join '', (map { "load_module $_;\n" } @Extra, $Module),
        "events { }\nstream {\n    upstream u { consul_upstream redis.service.consul; }\n",
        "    server { listen 127.0.0.1:$PROXY_BASE; proxy_pass u; }\n}\n",
        "http {\n    upstream u { consul_upstream redis.service.consul; }\n",
        "    server { listen 127.0.0.1:$HTTP_PROXY_BASE; location / { proxy_pass http://u; } }\n}\n");
    my ($st, $out) = nginx_t($case);
    if ($st ne 'exit 0') {
        remove_tree($Work);
        die "config-fuzz: nginx -t refuses a plain consul_upstream line ($st):\n$out";
    }
    remove_tree($case);
}
hostile_start(port => $DnsPort);
api_start();
backends_start();
my $base = $opt{seed} // (time() * 1000 % 1_000_000_000);
my $t0 = time;
printf "config-fuzz: %d configurations from seed %d (nginx %s, %s)\n", $opt{count}, $base,
    $Nginx, $Module;
for my $i (0 .. $opt{count} - 1) {
    my $seed = $base + $i;
    print "config-fuzz: case $seed\n" if $opt{verbose};
    run_case($seed);
    if (($i + 1) % 100 == 0) {
        printf "config-fuzz: %d cases, %d accepted, %d started, %d failed (%.0f s)\n",
            $i + 1, $stats{accepted}, $stats{started}, scalar @failures, time - $t0;
    }
}
hostile_stop();
api_stop();
backends_stop();
printf "config-fuzz: %d configurations in %.0f s: %d refused by nginx -t, %d accepted, %d started "
    . "(%d with api= lines, %d with http upstreams, %d reloads, %d workers killed, %d connections, "
    . "%d answered by a backend, %d HTTP requests (%d on a kept-alive client connection), %d answered by a "
    . "backend (%d on a kept-alive upstream connection; by status: %s)); %d failed\n",
    $stats{cases}, time - $t0, $stats{refused}, $stats{accepted}, $stats{started}, $stats{with_api},
    $stats{with_http}, $stats{reloads}, $stats{kills}, $stats{connections}, $stats{answered},
    $stats{requests}, $stats{requests_client_kept}, $stats{requests_answered}, $stats{requests_reused},
    join(', ', map { "$statuses{$_} $_" } sort keys %statuses) || 'none', scalar @failures;
if ($opt{verbose}) {
    print "config-fuzz: refusals by message:\n";
    printf "  %5d  %s\n", $refusals{$_}, $_ for sort { $refusals{$b} <=> $refusals{$a} } keys %refusals;
}
if (@failures) {
    print "config-fuzz: FAILED seeds: @failures (files in $Work)\n";
    exit 1;
}
remove_tree($Work) unless $opt{keep};
exit 0;
