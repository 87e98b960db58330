package Test::Nginx::Consul;

# Test::Nginx scaffold for ngx-consul (nginx stream module, Consul DNS discovery).
#
#   use lib 't/lib';
#   use Test::Nginx::Consul 'no_plan';
#   run_tests();
#   __DATA__
#   === TEST 1: two instances
#   --- dns
#   instance redis.service.yunlu_office.consul 127.0.0.1:6380
#   instance redis.service.yunlu_office.consul 127.0.0.1:6381
#   --- backends: 6380 6381
#   --- stream_config
#   upstream redis { consul_upstream redis.service.yunlu_office.consul; }
#   --- check
#   wait_for_backends([6380, 6381]);
#   is_tally(tally(20), {6380 => 10, 6381 => 10}, 'round robin');
#
# Block sections added on top of Test::Nginx::Socket (see t/README.md):
#   --- dns             zone records for a fresh BIND (absent: BIND is stopped)
#   --- dns_config      extra BIND options, e.g. "minimal-responses yes;"
#   --- backends        redis-server backends to have running: "6380 127.0.0.5:6390"
#   --- stream_config   inside stream { } (upstreams)
#   --- stream_server_config   inside the stream server { } (default: proxy_pass redis;)
#   --- stream_listen_options  e.g. "reuseport" (spreads connections over workers)
#   --- stream_request / stream_response / stream_response_like
#   --- setup           Perl code run (package main) before nginx starts
#   --- check           Perl code run (package main) once nginx runs, before the request
#   --- workers: N      master_process on + worker_processes N for this block
#   --- no_module       do not load the module (infrastructure tests)
#   A line in stream_config/stream_server_config ending with "# emerg: MESSAGE"
#   makes the block a must_die block expecting "[emerg] MESSAGE in .../stream.conf:LINE".

use strict;
use warnings;

use Cwd qw(abs_path getcwd);
use File::Basename qw(dirname);

our ($RootDir, $Profile, $TargetDir, $ModulePath);

BEGIN {
    $RootDir = abs_path(dirname(abs_path(__FILE__)) . '/../../../..');
    $Profile = $ENV{NGX_CONSUL_PROFILE} || 'debug';
    $TargetDir = $ENV{CARGO_TARGET_DIR} ? abs_path($ENV{CARGO_TARGET_DIR}) : "$RootDir/target";

    # Test::Nginx::Util reads TEST_NGINX_BINARY when it is loaded: set it first.
    if (!$ENV{TEST_NGINX_BINARY}) {
        my @bins = grep { -f $_ && -x _ }
            glob("$TargetDir/$Profile/build/nginx-sys-*/out/objs/nginx");
        @bins = sort { -M $a <=> -M $b } @bins;    # newest first
        if (@bins) {
            $ENV{TEST_NGINX_BINARY} = $bins[0];
        } else {
            die "Test::Nginx::Consul: no nginx binary under $TargetDir/$Profile/build/"
              . "nginx-sys-*/out/objs/ (run cargo build"
              . ($Profile eq 'release' ? ' --release' : '')
              . ", or set TEST_NGINX_BINARY)\n";
        }
    }
    $ModulePath = $ENV{NGX_CONSUL_MODULE}
        || "$TargetDir/$Profile/libngx_stream_consul_upstream_module.so";

    # Blocks run in file order (Test::Nginx shuffles them by default).
    $ENV{TEST_NGINX_NO_SHUFFLE} //= 1;

    # Modules to load before anything else, e.g. the stream module of an nginx
    # built --with-stream=dynamic (Debian's): NGX_CONSUL_EXTRA_MODULES="/usr/lib/
    # nginx/modules/ngx_stream_module.so" (space-separated). Test::Nginx puts
    # TEST_NGINX_LOAD_MODULES first in every nginx.conf it writes; nginx_t() too.
    $ENV{TEST_NGINX_LOAD_MODULES} = $ENV{NGX_CONSUL_EXTRA_MODULES}
        if $ENV{NGX_CONSUL_EXTRA_MODULES};
}

use Test::Nginx::Socket -base;
use Test::Nginx::Util ();
use Test::More ();
use IO::Socket::INET ();
use IO::Socket::IP ();
use IO::Select ();
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);
use File::Path qw(make_path remove_tree);

our @EXPORT = qw(
    $NginxBinary $ModulePath $DnsPort $StreamPort $TmpDir
    dns_start dns_stop dns_restart dns_running dns_dir dns_queries dns_querylog
    dns_queries_by_transport
    consul_records consul_register consul_deregister consul_deregister_all
    nsupdate dig_srv
    backend_start backend_stop backend_stop_all backend_running
    probe_backend tally tally_str is_tally tally_background wait_for_backends
    hold_connections close_held
    wait_until wait_for_log log_count error_log_text log_mark error_log_since
    worker_tally split_is_exact failed_tries
    nginx_pid nginx_worker_pids nginx_reload nginx_restart nginx_stop nginx_t
    stream_config_set dead_port
    stream_port block_name
);

our $NginxBinary = $ENV{TEST_NGINX_BINARY};
our $DnsPort = $ENV{NGX_CONSUL_DNS_PORT} || 8600;
our $StreamPort;          # set per block (TEST_NGINX_STREAM_PORT)
our $Block;               # the block being run
our $Verbose = $ENV{TEST_NGINX_VERBOSE};
my $OwnerPid = $$;        # END handlers only run in this process

# ---------------------------------------------------------------------------
# Temp dir, stale processes from earlier (killed) runs

our $BaseDir = $ENV{NGX_CONSUL_TEST_DIR} || "/tmp/ngx-consul-test";
our $TmpDir = "$BaseDir/run-$$";

sub _cmdline {
    my $pid = shift;
    open my $fh, '<', "/proc/$pid/cmdline" or return '';
    local $/;
    my $c = <$fh> // '';
    $c =~ s/\0/ /g;
    return $c;
}

sub _read_pid {
    my $f = shift;
    open my $fh, '<', $f or return;
    my $pid = <$fh>;
    return unless defined $pid && $pid =~ /^\s*(\d+)/;
    return $1;
}

sub _kill_wait {
    my ($pid, $sig, $timeout) = @_;
    $timeout //= 5;
    return 1 unless $pid && kill(0, $pid);
    kill $sig, $pid;
    my $deadline = time + $timeout;
    while (time < $deadline) {
        waitpid($pid, WNOHANG);
        return 1 unless kill(0, $pid);
        sleep 0.02;
    }
    kill 'KILL', $pid;
    for (1 .. 100) {
        waitpid($pid, WNOHANG);
        return 1 unless kill(0, $pid);
        sleep 0.02;
    }
    return 0;
}

sub _cleanup_stale_runs {
    for my $dir (glob("$BaseDir/run-*")) {
        next unless $dir =~ /run-(\d+)$/;
        my $owner = $1;
        next if $owner == $$;
        next if kill(0, $owner) && _cmdline($owner) =~ /perl|prove/;
        for my $pf (glob("$dir/*.pid"), glob("$dir/*/*.pid")) {
            my $pid = _read_pid($pf) or next;
            my $cmd = _cmdline($pid);
            if ($cmd =~ /\b(?:named|redis-server)\b/ && index($cmd, $dir) >= 0
                || $cmd =~ /redis-server/ && $pf =~ /redis-/)
            {
                warn "# killing stale $cmd (pid $pid) of an earlier run\n";
                _kill_wait($pid, 'TERM', 3);
            }
        }
        remove_tree($dir);
    }
}

_cleanup_stale_runs();
make_path($TmpDir);
$ENV{TEST_NGINX_CONSUL_TMP} = $TmpDir;
$ENV{TEST_NGINX_DNS_PORT} = $DnsPort;
$ENV{TEST_NGINX_CONSUL_MODULE} = $ModulePath;

# Ctrl-C or a kill should still stop our daemons (END blocks run on exit()).
for my $sig (qw(INT TERM HUP)) {
    $SIG{$sig} = sub { warn "# caught SIG$sig, cleaning up\n"; exit 130 }
        unless $SIG{$sig};
}
$SIG{PIPE} = 'IGNORE';

sub _say {
    warn "# ", @_, "\n" if $Verbose;
}

sub block_name {
    return $Block ? $Block->name : $0;
}

sub _fail {
    my $msg = shift;
    # inside a check: a test failure; elsewhere (preprocessor): bail out
    die "$msg\n";
}

# ---------------------------------------------------------------------------
# BIND 9 standing in for Consul's DNS interface

my $DnsPid;
my $DnsDir = "$TmpDir/dns";
my $DnsOptions = '';

sub dns_dir { $DnsDir }
sub dns_running { return $DnsPid && kill(0, $DnsPid) ? 1 : 0 }
sub dns_querylog { "$DnsDir/query.log" }

sub _hex_addr {
    my $addr = shift;
    if ($addr =~ /^\d+\.\d+\.\d+\.\d+$/) {
        return join '', map { sprintf '%02x', $_ } split /\./, $addr;
    }
    # IPv6: 32 hex digits, as Consul writes them
    require Socket;
    my $bin = Socket::inet_pton(Socket::AF_INET6(), $addr)
        or die "bad address $addr\n";
    return unpack 'H*', $bin;
}

# "127.0.0.2-41:6390" -> ("127.0.0.2:6390", ..., "127.0.0.41:6390");
# "127.0.0.1:20000-20999" -> ports of one address; "6380-6383" -> ports
sub _expand_range {
    my $spec = shift;
    if ($spec =~ /^(\d+\.\d+\.\d+\.)(\d+)-(\d+):(\d+)$/) {
        return map { "$1$_:$4" } $2 .. $3;
    }
    if ($spec =~ /^(\d+\.\d+\.\d+\.\d+):(\d+)-(\d+)$/) {
        return map { "$1:$_" } $2 .. $3;
    }
    if ($spec =~ /^(\d+)-(\d+)$/) {
        return ($1 .. $2);
    }
    return ($spec);
}

sub _split_addr {
    my $ap = shift;
    if ($ap =~ /^\[([0-9a-fA-F:.]+)\]:(\d+)$/) { return ($1, $2, 6) }
    if ($ap =~ /^(\d+\.\d+\.\d+\.\d+):(\d+)$/) { return ($1, $2, 4) }
    if ($ap =~ /^(\d+)$/)                      { return ('127.0.0.1', $1, 4) }
    die "bad ADDRESS:PORT \"$ap\"\n";
}

sub _dc_of {
    my $name = shift;
    $name =~ s/\.$//;
    return $1 if $name =~ /\.service\.([^.]+)\.consul$/i;
    return 'yunlu_office';
}

# Consul-shaped records of one instance:
#   consul_records('redis.service.yunlu_office.consul', '127.0.0.1:6380',
#                  weight => 3, priority => 1, node => 'web1', addr_record => 1)
# returns zone lines (absolute names): the SRV and the target's A/AAAA.
sub consul_records {
    my ($name, $ap, %o) = @_;
    $name =~ s/\.$//;
    my ($addr, $port, $family) = _split_addr($ap);
    my $dc = $o{dc} // _dc_of($name);
    my $prio = $o{priority} // 1;
    my $weight = $o{weight} // 1;
    my $target = defined $o{node}
        ? "$o{node}.node.$dc.consul."
        : _hex_addr($addr) . ".addr.$dc.consul.";
    $target = $o{target} if defined $o{target};
    my @rr = ("$name. 0 IN SRV $prio $weight $port $target");
    if ($o{addr_record} // 1) {
        push @rr, "$target 0 IN " . ($family == 6 ? 'AAAA' : 'A') . " $addr";
    }
    return @rr;
}

# "instance NAME ADDR:PORT [weight=W] [priority=P] [node=N] [dc=D] [addr_record=0]"
# lines expand to consul_records(); other lines are copied as zone text.
sub _expand_zone_text {
    my $text = shift // '';
    my (@out, %seen);
    for my $line (split /\n/, $text) {
        if ($line =~ /^\s*instance\s+(\S+)\s+(\S+)((?:\s+\w+=\S+)*)\s*$/) {
            my ($name, $ap, $rest) = ($1, $2, $3);
            my %o = map { split /=/, $_, 2 } grep { length } split /\s+/, $rest;
            for my $one (_expand_range($ap)) {
                for my $rr (consul_records($name, $one, %o)) {
                    push @out, $rr unless $seen{$rr}++;
                }
            }
        } else {
            push @out, $line;
        }
    }
    return join("\n", @out) . "\n";
}

sub _write_file {
    my ($path, $content) = @_;
    open my $fh, '>', $path or die "cannot write $path: $!\n";
    print $fh $content;
    close $fh or die "cannot write $path: $!\n";
}

# A loopback port nothing listens on (connections to it are refused).
sub dead_port {
    my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 1, Proto => 'tcp');
    my $p = $s->sockport;
    close $s;
    return $p;
}

sub _port_holder {
    my $port = shift;
    my $out = `ss -Hltnp 'sport = :$port' 2>/dev/null` // '';
    return $out =~ /\S/ ? $out : '';
}

sub _named_conf {
    my $d = $DnsDir;
    my $minimal = $DnsOptions =~ /minimal-responses/ ? '' : 'minimal-responses no-auth;';
    my $listen_v6 = $DnsOptions =~ /listen-on-v6/ ? '' : 'listen-on-v6 { none; };';
    # BIND 9.18.28+ caps RRsets at 100 records by default; Consul has no cap.
    my $max_rr = join "\n    ", grep { _bind_supports($_) }
        'max-records-per-type 0;', 'max-types-per-name 0;',
        # no SO_REUSEPORT: another named cannot silently share our port
        'reuseport no;';
    return <<"_EOC_";
options {
    directory "$d";
    pid-file "$d/named.pid";
    session-keyfile "$d/session.key";
    managed-keys-directory "$d";
    listen-on port $DnsPort { 127.0.0.1; };
    $listen_v6
    recursion no;
    dnssec-validation no;
    notify no;
    check-names primary ignore;
    $minimal
    $max_rr
    querylog yes;
    tcp-clients 1000;
$DnsOptions
};
controls { };
logging {
    channel main_log { file "$d/named.log"; severity info; print-time yes; print-severity yes; print-category yes; };
    channel query_log { file "$d/query.log"; severity info; print-time yes; };
    category default { main_log; };
    category queries { query_log; };
    category lame-servers { null; };
};
zone "consul" {
    type primary;
    file "$d/consul.zone";
    allow-update { 127.0.0.1; };
    check-names ignore;
};
_EOC_
}

my %BindSupports;
sub _bind_supports {
    my $opt = shift;
    return $BindSupports{$opt} if defined $BindSupports{$opt};
    my $f = "$TmpDir/probe-named.conf";
    _write_file($f, "options { $opt };\n");
    $BindSupports{$opt} = system("named-checkconf $f >/dev/null 2>&1") == 0 ? 1 : 0;
    unlink $f;
    return $BindSupports{$opt};
}

# dns_start(records => TEXT, options => TEXT, fresh => 1, zone_may_fail => 0)
# fresh => 0 restarts on the existing zone file and journal (same data as before).
sub dns_start {
    my %o = @_;
    my $fresh = $o{fresh} // 1;
    dns_stop();
    make_path($DnsDir);
    $DnsOptions = $o{options} if defined $o{options};
    if ($fresh) {
        unlink "$DnsDir/consul.zone.jnl", "$DnsDir/consul.zone",
               "$DnsDir/query.log", "$DnsDir/named.log";
        my $serial = time() % 2000000000;
        my $zone = <<"_EOZ_";
\$ORIGIN consul.
\$TTL 0
@ IN SOA ns.consul. hostmaster.consul. $serial 3600 600 86400 0
@ IN NS ns.consul.
ns IN A 127.0.0.1
_EOZ_
        $zone .= _expand_zone_text($o{records} // '');
        _write_file("$DnsDir/consul.zone", $zone);
    }
    _write_file("$DnsDir/named.conf", _named_conf());
    my $check = `named-checkconf $DnsDir/named.conf 2>&1`;
    _fail("named-checkconf $DnsDir/named.conf: $check") if $?;
    if (!$o{zone_may_fail}) {
        $check = `named-checkzone -k ignore -i none consul $DnsDir/consul.zone 2>&1`;
        _fail("named-checkzone consul $DnsDir/consul.zone: $check") if $?;
    }

    if (my $holder = _port_holder($DnsPort)) {
        _fail("port $DnsPort is already in use (set NGX_CONSUL_DNS_PORT?): $holder");
    }

    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        setpgrp(0, 0);    # a Ctrl-C reaches us (we stop it), not named directly
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', "$DnsDir/named.stdout";
        open STDERR, '>&', \*STDOUT;
        { exec 'named', '-f', '-n', '1', '-c', "$DnsDir/named.conf" }
        POSIX::_exit(127);
    }
    $DnsPid = $pid;
    _write_file("$DnsDir/named-fg.pid", "$pid\n");

    # ready: the zone answers (or, when it may fail to load, the server answers
    # anything at all, even SERVFAIL or REFUSED)
    my $ok = wait_until(sub {
        return 0 unless kill(0, $DnsPid) && !waitpid($DnsPid, WNOHANG);
        if ($o{zone_may_fail}) {
            my $out = `dig \@127.0.0.1 -p $DnsPort +tcp +time=1 +tries=1 SOA consul 2>/dev/null`;
            return $out =~ /status: [A-Z]+/;
        }
        my $out = `dig \@127.0.0.1 -p $DnsPort +tcp +time=1 +tries=1 +short SOA consul 2>/dev/null`;
        return $out =~ /\S/ && $out !~ /timed out|refused|;;/;
    }, 10);
    if (!$ok) {
        my $log = '';
        for my $f ("$DnsDir/named.stdout", "$DnsDir/named.log") {
            next unless -f $f;
            open my $fh, '<', $f; local $/; $log .= <$fh>;
        }
        dns_stop();
        _fail("BIND did not answer on 127.0.0.1:$DnsPort within 10 s:\n$log");
    }
    _say("BIND up (pid $DnsPid) on port $DnsPort");
    return 1;
}

sub dns_stop {
    return 1 unless $DnsPid;
    _kill_wait($DnsPid, 'TERM', 5);
    waitpid($DnsPid, WNOHANG);
    undef $DnsPid;
    unlink "$DnsDir/named-fg.pid";
    # wait until the port is free for a restart
    wait_until(sub { !_port_holder($DnsPort) }, 5);
    return 1;
}

# Restart with the current data (zone file + journal of the nsupdates).
sub dns_restart {
    return dns_start(fresh => 0, @_);
}

# Count query-log lines (all, or those matching a regex / containing a string).
sub dns_queries {
    my $pat = shift;
    open my $fh, '<', dns_querylog() or return 0;
    my $n = 0;
    while (my $l = <$fh>) {
        next unless $l =~ /query: /;
        if (!defined $pat) { $n++ }
        elsif (ref $pat) { $n++ if $l =~ $pat }
        else { $n++ if index($l, $pat) >= 0 }
    }
    return $n;
}

# (UDP, TCP) counts of the query-log lines matching a pattern. BIND writes the
# flags after the type, e.g. "query: NAME IN SRV +E(0)TK (127.0.0.1)": T = TCP.
sub dns_queries_by_transport {
    my $pat = shift;
    my ($udp, $tcp) = (0, 0);
    open my $fh, '<', dns_querylog() or return (0, 0);
    while (my $l = <$fh>) {
        next unless $l =~ /query: \S+ IN \S+ ([-+]\S*) /;
        my $flags = $1;
        next if defined $pat && (ref $pat ? $l !~ $pat : index($l, $pat) < 0);
        $flags =~ s/\([^)]*\)//g;
        if ($flags =~ /T/) { $tcp++ } else { $udp++ }
    }
    return ($udp, $tcp);
}

sub nsupdate {
    my @lines = @_;
    my $in = "server 127.0.0.1 $DnsPort\nzone consul.\ncheck-names off\n"
        . join("\n", @lines) . "\nsend\n";
    my $f = "$TmpDir/nsupdate.txt";
    _write_file($f, $in);
    my $out = `nsupdate -t 5 $f 2>&1`;
    if ($? != 0) {
        my @l = split /\n/, $in;
        splice @l, 8, @l - 10, '...' if @l > 12;
        die "nsupdate failed ($?): $out\n--- input:\n" . join("\n", @l) . "\n";
    }
    return 1;
}

# SRV records of NAME as [prio, weight, port, target] (over TCP)
sub dig_srv {
    my $name = shift;
    $name =~ s/\.$//;
    my $out = `dig \@127.0.0.1 -p $DnsPort +tcp +time=2 +tries=1 +short SRV $name. 2>&1`;
    my @rr;
    for (split /\n/, $out) {
        push @rr, [$1, $2, $3, $4] if /^(\d+) (\d+) (\d+) (\S+)$/;
    }
    return @rr;
}

# consul_register('redis.service.yunlu_office.consul', '127.0.0.1:6381', weight => 2)
sub consul_register {
    my ($name, $ap, %o) = @_;
    return nsupdate(map { "update add $_" } consul_records($name, $ap, %o));
}

# Remove the SRV records of NAME that point at ADDR:PORT (any priority/weight).
sub consul_deregister {
    my ($name, $ap, %o) = @_;
    $name =~ s/\.$//;
    my ($addr, $port) = _split_addr($ap);
    my $dc = $o{dc} // _dc_of($name);
    my $target = defined $o{node} ? "$o{node}.node.$dc.consul."
                                  : _hex_addr($addr) . ".addr.$dc.consul.";
    my @del;
    for my $rr (dig_srv($name)) {
        my ($p, $w, $pt, $t) = @$rr;
        next unless $pt == $port && lc($t) eq lc($target);
        push @del, "update delete $name. SRV $p $w $pt $t";
    }
    die "consul_deregister: no SRV record $name -> $ap\n" unless @del;
    return nsupdate(@del);
}

# Remove every SRV record of NAME (NXDOMAIN unless names exist below it).
sub consul_deregister_all {
    my $name = shift;
    $name =~ s/\.$//;
    return nsupdate("update delete $name. SRV");
}

# ---------------------------------------------------------------------------
# redis-server backends

my %Redis;    # "addr:port" => { pid_file, key }
my %RedisProc;    # key => { pid_file, addrs => [...], port }

sub _redis_ping {
    my ($addr, $port) = @_;
    my $s = IO::Socket::IP->new(PeerHost => $addr, PeerPort => $port,
                                Proto => 'tcp', Timeout => 1) or return 0;
    syswrite $s, "PING\r\n";
    my $buf = '';
    my $sel = IO::Select->new($s);
    for (1 .. 20) {
        last unless $sel->can_read(0.1);
        my $n = sysread $s, $buf, 64, length $buf;
        last if !$n || $buf =~ /\r\n/;
    }
    close $s;
    return $buf =~ /^\+PONG/ ? 1 : 0;
}

sub backend_running {
    my ($addr, $port) = _split_addr(shift);
    my $r = $Redis{"$addr:$port"} or return 0;
    my $pid = _read_pid($r->{pid_file}) or return 0;
    return kill(0, $pid) ? 1 : 0;
}

# backend_start('6380', '127.0.0.5:6390', ...): a redis-server per port and group
# of up to 16 loopback addresses; already running ones are kept.
sub backend_start {
    my @specs = map { _expand_range($_) } map { split /[\s,]+/ } @_;
    my %by_port;
    for my $spec (grep { length } @specs) {
        my ($addr, $port, $family) = _split_addr($spec);
        die "backend $spec: only 127.0.0.0/8 and ::1 addresses\n"
            unless ($family == 4 && $addr =~ /^127\./) || ($family == 6 && $addr eq '::1');
        next if backend_running($family == 6 ? "[$addr]:$port" : "$addr:$port");
        if (my $holder = _port_holder($port)) {
            _fail("cannot start a backend on $addr:$port, the port is in use: $holder")
                if $holder =~ /\Q$addr\E:$port\b|\*:$port\b|0\.0\.0\.0:$port\b/;
        }
        push @{ $by_port{$port} }, $addr;
    }
    my @started;
    for my $port (sort { $a <=> $b } keys %by_port) {
        my @addrs = @{ $by_port{$port} };
        while (my @chunk = splice @addrs, 0, 16) {
            my $key = "$port-" . join('_', @chunk);
            $key =~ s/[^\w.-]/_/g;
            $key = "$port-" . substr(unpack('H*', join ',', @chunk), 0, 40) if length $key > 100;
            my $pid_file = "$TmpDir/redis-$key.pid";
            unlink $pid_file;
            my @cmd = ('redis-server', '--port', $port, '--bind', @chunk,
                       '--save', '', '--appendonly', 'no', '--daemonize', 'yes',
                       '--pidfile', $pid_file, '--dir', $TmpDir,
                       '--logfile', "$TmpDir/redis-$key.log",
                       '--protected-mode', 'no', '--databases', '1');
            if (system(@cmd) != 0) {
                _fail("cannot start @cmd: $?");
            }
            $RedisProc{$key} = { pid_file => $pid_file, addrs => \@chunk, port => $port };
            $Redis{"$_:$port"} = { pid_file => $pid_file, key => $key } for @chunk;
            push @started, map { [$_, $port] } @chunk;
        }
    }
    for my $ap (@started) {
        my ($addr, $port) = @$ap;
        wait_until(sub { _redis_ping($addr, $port) }, 10)
            or _fail("redis-server on $addr:$port does not answer");
    }
    for my $key (keys %RedisProc) {
        my $pf = $RedisProc{$key}{pid_file};
        wait_until(sub { -s $pf }, 5) or _fail("redis-server $key wrote no pid file");
    }
    _say("backends started: ", join ' ', map { "$_->[0]:$_->[1]" } @started) if @started;
    return 1;
}

# Stop the redis-server process(es) serving these backends (and waits until
# their ports refuse connections).
sub backend_stop {
    my @specs = map { _expand_range($_) } map { split /[\s,]+/ } @_;
    for my $spec (grep { length } @specs) {
        my ($addr, $port) = _split_addr($spec);
        my $r = $Redis{"$addr:$port"} or next;
        my $proc = $RedisProc{ $r->{key} } or next;
        my $pid = _read_pid($proc->{pid_file});
        _kill_wait($pid, 'TERM', 5) if $pid;
        unlink $proc->{pid_file};
        delete $Redis{"$_:$proc->{port}"} for @{ $proc->{addrs} };
        delete $RedisProc{ $r->{key} };
        for my $a (@{ $proc->{addrs} }) {
            wait_until(sub {
                !IO::Socket::INET->new(PeerAddr => $a, PeerPort => $proc->{port},
                                       Proto => 'tcp', Timeout => 0.5)
            }, 5);
        }
    }
    return 1;
}

sub backend_stop_all {
    for my $key (keys %RedisProc) {
        my $pid = _read_pid($RedisProc{$key}{pid_file});
        kill 'TERM', $pid if $pid;
    }
    for my $key (keys %RedisProc) {
        my $pid = _read_pid($RedisProc{$key}{pid_file});
        _kill_wait($pid, 'TERM', 5) if $pid;
        unlink $RedisProc{$key}{pid_file};
    }
    %RedisProc = ();
    %Redis = ();
    return 1;
}

# ---------------------------------------------------------------------------
# Client side: which backend answered a connection through nginx

sub stream_port {
    return $StreamPort // $ENV{TEST_NGINX_STREAM_PORT} // ($Test::Nginx::Util::ServerPort + 1);
}

# One connection through the proxy. Returns "ADDR:PORT" of the redis that
# answered, or (undef, reason).
sub probe_backend {
    my %o = @_;
    my $port = $o{port} // stream_port();
    my $timeout = $o{timeout} // 3;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => $timeout,
                                  ($o{local_addr} ? (LocalAddr => $o{local_addr}) : ()))
        or return (undef, "connect: $!");
    syswrite $s, "CLIENT INFO\r\nQUIT\r\n";
    my $buf = '';
    my $sel = IO::Select->new($s);
    my $deadline = time + $timeout;
    my $why;
    while (1) {
        my $left = $deadline - time;
        if ($left <= 0) { $why = 'timeout'; last }
        if (!$sel->can_read($left)) { $why = 'timeout'; last }
        my $n = sysread $s, $buf, 8192, length $buf;
        if (!defined $n) { $why = "read: $!"; last }
        last if $n == 0;
        last if $buf =~ /\+OK\r\n$/;
    }
    close $s;
    if ($buf =~ /\bladdr=\[?([0-9a-fA-F:.]+?)\]?:(\d+)\s/) {
        return "$1:$2";
    }
    return (undef, $why // ($buf eq '' ? 'closed without an answer' : "unexpected answer: $buf"));
}

# hold_connections(N, port => P): N connections through nginx that stay open
# (each asked CLIENT INFO once): [[socket, backend port], ...]. Close them with
# close_held(\@held).
sub hold_connections {
    my ($n, %o) = @_;
    my @held;
    for (1 .. $n) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $o{port} // stream_port(),
                                      Proto => 'tcp', Timeout => 3)
            or die "hold_connections: connect: $!\n";
        syswrite $s, "CLIENT INFO\r\n";
        my ($buf, $sel) = ('', IO::Select->new($s));
        while ($buf !~ /laddr=\S+:\d+ .*\r\n/s) {
            $sel->can_read(3) or die "hold_connections: no answer\n";
            sysread($s, $buf, 8192, length $buf) or die "hold_connections: closed\n";
        }
        my ($port) = $buf =~ /\bladdr=\[?[0-9a-fA-F:.]+?\]?:(\d+)\s/;
        push @held, [$s, $port + 0];
    }
    return \@held;
}

sub close_held {
    my $held = shift;
    close $_->[0] for @$held;
    @$held = ();
    return 1;
}

sub _key {
    my ($ap, $by) = @_;
    return $ap if $by eq 'addr';
    return (split /:/, $ap)[-1] + 0;
}

# tally(N, by => 'port'|'addr', delay => SECONDS, port => STREAM_PORT)
# N sequential connections; returns { 6380 => 30, 6381 => 10, fail => 0 }
# ("fail" only when some failed; $Test::Nginx::Consul::LastFailure says why).
our $LastFailure;
sub tally {
    my ($n, %o) = @_;
    my $by = $o{by} // 'port';
    my %t;
    for (1 .. $n) {
        my ($ap, $why) = probe_backend(%o);
        if (defined $ap) {
            $t{ _key($ap, $by) }++;
        } else {
            $t{fail}++;
            $LastFailure = $why;
        }
        sleep $o{delay} if $o{delay};
    }
    return \%t;
}

sub tally_str {
    my $t = shift;
    return join ' ', map { "$_=$t->{$_}" }
        sort { ($a =~ /^\d+$/ && $b =~ /^\d+$/) ? $a <=> $b : $a cmp $b } keys %$t;
}

sub is_tally {
    my ($got, $expected, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $ok = Test::More::is(tally_str($got), tally_str($expected), $name);
    Test::More::diag("last failure: $LastFailure") if !$ok && $got->{fail} && $LastFailure;
    return $ok;
}

# Connections in a child process until finish(): $bg = tally_background(delay => 0.02);
# ...; my $t = $bg->();   (returns the tally hash)
sub tally_background {
    my %o = @_;
    my $file = "$TmpDir/bg-tally-" . int(rand(1e9));
    my $stop = "$file.stop";
    my $parent = $$;
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        $Test::Nginx::Util::InSubprocess = 1;
        my %t;
        my @fails;
        # until finish() (or the test died: no one will ask for the result)
        while (!-e $stop && getppid() == $parent) {
            my ($ap, $why) = probe_backend(%o);
            if (defined $ap) { $t{ _key($ap, $o{by} // 'port') }++ }
            else { $t{fail}++; push @fails, sprintf("%.3f %s", time, $why) }
            sleep($o{delay} // 0.01);
        }
        open my $fh, '>', $file;
        print $fh join(' ', map { "$_=$t{$_}" } keys %t), "\n", join("\n", @fails), "\n";
        close $fh;
        POSIX::_exit(0);
    }
    return sub {
        _write_file($stop, '');
        waitpid($pid, 0);
        open my $fh, '<', $file or return { fail => 'no result' };
        my $line = <$fh>;
        my @fails = <$fh>;
        close $fh;
        chomp $line;
        my %t = map { split /=/ } grep { length } split / /, $line;
        $LastFailure = join '', @fails if @fails;
        return \%t;
    };
}

# Poll until every expected backend answered at least once (and, with
# only => 1, no other one answered in the last round). Returns 1/0.
# With consul_upstream in the block, first waits for the module's first
# "N peers from" line (connections before it would fail with "no live
# upstreams"); first_set => 0 skips that.
sub wait_for_backends {
    my ($want, %o) = @_;
    my $timeout = $o{timeout} // 10;
    my $t0 = time;
    if (($o{first_set} // 1) && $Block
        && ($Block->stream_config // '') =~ /consul_upstream/)
    {
        wait_for_log(qr/consul upstream "[^"]*": \d+ peers? from /, $timeout);
    }
    my $by = $o{by} // 'port';
    my $round = $o{round} // 2 * @$want;
    $round = 4 if $round < 4;
    my %probe = (by => $by);
    $probe{port} = $o{port} if defined $o{port};
    my $left = $timeout - (time - $t0);
    $left = 0.5 if $left < 0.5;
    return wait_until(sub {
        my $t = tally($round, %probe);
        my %w = map { $_ => 1 } @$want;
        for my $k (keys %$t) {
            delete $w{$k};
            return 0 if $o{only} && !grep { $_ eq $k } @$want;
        }
        return !%w;
    }, $left);
}

# ---------------------------------------------------------------------------
# Waiting and the error log

sub wait_until {
    my ($code, $timeout, $step) = @_;
    $timeout //= 10;
    $step //= 0.05;
    my $deadline = time + $timeout;
    while (1) {
        my $r = $code->();
        return $r if $r;
        return 0 if time >= $deadline;
        sleep $step;
    }
}

sub error_log_text {
    open my $fh, '<', $Test::Nginx::Util::ErrLogFile or return '';
    local $/;
    return <$fh> // '';
}

# The error log's size now: error_log_since(MARK) and worker_tally(MARK) look
# only at what follows.
sub log_mark {
    return -s $Test::Nginx::Util::ErrLogFile // 0;
}

sub error_log_since {
    my $mark = shift // 0;
    open my $fh, '<', $Test::Nginx::Util::ErrLogFile or return '';
    seek $fh, $mark, 0;
    local $/;
    return <$fh> // '';
}

# Connections per worker and backend port since MARK, from nginx's info lines
# "proxy 127.0.0.1:P connected to ADDR:PORT": { pid => { port => n } }.
sub worker_tally {
    my $mark = shift;
    my %t;
    for (split /\n/, error_log_since($mark)) {
        next unless /\[info\] (\d+)#\d+: \*\d+ proxy \S+ connected to \[?[0-9a-fA-F:.]+?\]?:(\d+)$/;
        $t{$1}{$2}++;
    }
    return \%t;
}

# Failed connects per client connection since MARK, from nginx's error lines
# "*N connect() failed ... upstream: "ADDR:PORT"": { N => { PORT => tries } }.
sub failed_tries {
    my $mark = shift;
    my %tries;
    for (split /\n/, error_log_since($mark)) {
        $tries{$1}{$2}++ if /\*(\d+) connect\(\) failed .* upstream: "\[?[0-9a-fA-F:.]+?\]?:(\d+)"/;
    }
    return \%tries;
}

# Whether every worker split its connections by WEIGHTS ({ port => weight })
# exactly, as smooth weighted round robin does: within one connection of the
# ideal in each worker. Diagnoses the tally otherwise.
sub split_is_exact {
    my ($per_worker, $weights, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $sum = 0;
    $sum += $_ for values %$weights;
    my @bad;
    for my $pid (sort keys %$per_worker) {
        my $t = $per_worker->{$pid};
        my $n = 0;
        $n += $_ for values %$t;
        for my $port (keys %$t) {
            push @bad, "worker $pid: unexpected port $port" unless exists $weights->{$port};
        }
        for my $port (keys %$weights) {
            my $want = $n * $weights->{$port} / $sum;
            my $got = $t->{$port} // 0;
            push @bad, sprintf('worker %s: %d to %s, ideal %.1f of %d', $pid, $got, $port, $want, $n)
                if abs($got - $want) > 1;
        }
    }
    my $ok = Test::More::ok(%$per_worker && !@bad, $name);
    Test::More::diag(join "\n", @bad, Test::More::explain($per_worker)) unless $ok;
    return $ok;
}

sub log_count {
    my $pat = shift;
    my $n = 0;
    for my $line (split /\n/, error_log_text()) {
        $n++ if ref $pat ? $line =~ $pat : index($line, $pat) >= 0;
    }
    return $n;
}

# wait_for_log(qr/2 peers from/, TIMEOUT, COUNT): until COUNT lines match.
sub wait_for_log {
    my ($pat, $timeout, $count) = @_;
    $count //= 1;
    return wait_until(sub { log_count($pat) >= $count }, $timeout // 10);
}

# ---------------------------------------------------------------------------
# nginx processes

sub nginx_pid {
    return _read_pid($Test::Nginx::Util::PidFile);
}

sub _children {
    my $ppid = shift;
    my @kids;
    for my $stat (glob "/proc/[0-9]*/stat") {
        open my $fh, '<', $stat or next;
        my $l = <$fh> // next;
        # pid (comm) state ppid
        next unless $l =~ /^(\d+) \(.*\) \S+ (\d+)/;
        push @kids, $1 if $2 == $ppid;
    }
    return sort { $a <=> $b } @kids;
}

# Worker pids of the running master (the single process with master off).
sub nginx_worker_pids {
    my $pid = nginx_pid() or return ();
    my @w = grep { _cmdline($_) =~ /worker process/ && _cmdline($_) !~ /shutting down/ }
        _children($pid);
    return @w ? @w : (_cmdline($pid) =~ /worker|nginx/ ? ($pid) : ());
}

# Rewrite the block's stream { } with another --- stream_config text (same
# server { }), for a reload that adds, removes or changes lines.
sub stream_config_set {
    my $text = shift;
    $text =~ s/\$(TEST_NGINX_\w+)/$ENV{$1} \/\/ die "no env $1\n"/ge;
    my $conf = _stream_conf($Block, stream_port(), $text);
    $conf =~ s/\$(TEST_NGINX_\w+)/$ENV{$1} \/\/ die "no env $1\n"/ge;
    _write_file("$Test::Nginx::Util::HtmlDir/$Test::Nginx::Consul::StreamConfName", $conf);
    return 1;
}

# HUP the master; waits for new workers (and the old ones gone). Returns 1/0.
sub nginx_reload {
    my $timeout = shift // 10;
    my $master = nginx_pid() or return 0;
    my %old = map { $_ => 1 } nginx_worker_pids();
    kill 'HUP', $master or return 0;
    return wait_until(sub {
        my @now = grep { _cmdline($_) =~ /worker process/ } _children($master);
        my @new = grep { !$old{$_} } @now;
        my @still = grep { $old{$_} } @now;
        return @new && !@still;
    }, $timeout);
}

sub nginx_stop {
    my $timeout = shift // 10;
    my $pid = nginx_pid() or return 1;
    kill 'QUIT', $pid;
    my $ok = wait_until(sub { waitpid($pid, WNOHANG); !kill(0, $pid) }, $timeout);
    _kill_wait($pid, 'KILL', 2) unless $ok;
    return $ok;
}

# Stop and start nginx again with the same configuration (not a reload).
sub nginx_restart {
    nginx_stop();
    my $sr = $Test::Nginx::Util::ServRoot;
    my $cmd = "$NginxBinary -e $sr/logs/error.log -p $sr/ -c $Test::Nginx::Util::ConfFile";
    unlink $Test::Nginx::Util::PidFile;
    system("$cmd >/dev/null") == 0 or return 0;
    return wait_until(sub {
        my $pid = nginx_pid();
        $pid && kill(0, $pid)
            && IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => stream_port(),
                                      Proto => 'tcp', Timeout => 0.5);
    }, 10);
}

# nginx -t on a standalone configuration text. The text may use
# $TEST_NGINX_CONSUL_MODULE etc. Returns (exit code, output, conf path); with
# rusage => 1 also { maxrss_kb, cpu_s, wall_s } of the nginx -t process.
sub nginx_t {
    my ($text, %o) = @_;
    my $dir = "$TmpDir/nginx-t";
    remove_tree($dir);
    make_path("$dir/conf", "$dir/logs");
    $text =~ s/\$(TEST_NGINX_\w+)/$ENV{$1} \/\/ die "no env $1\n"/ge;
    # extra modules on the first line: the text's line numbers stay as written
    $text = join('', map { "load_module $_; " } split ' ', $ENV{TEST_NGINX_LOAD_MODULES} // '')
        . $text;
    my $conf = "$dir/conf/nginx.conf";
    _write_file($conf, $text);
    my $wrap = $o{rusage} ? "python3 $RootDir/t/lib/rusage.py $dir/rusage " : '';
    my $out = `$wrap$NginxBinary -t -p $dir/ -c $conf -e $dir/logs/error.log 2>&1`;
    # A crash is not a success: killed by signal N gives 128 + N, as in a shell.
    my $rc = $? & 127 ? 128 + ($? & 127) : $? >> 8;
    return ($rc, $out, $conf) unless $o{rusage};
    open my $fh, '<', "$dir/rusage" or die "rusage: $!\n";
    my %ru;
    @ru{qw(maxrss_kb cpu_s wall_s)} = split ' ', scalar <$fh>;
    return ($rc, $out, $conf, \%ru);
}

# ---------------------------------------------------------------------------
# Block preprocessor: stream sections, DNS, backends, checks

my ($DefaultWorkers, $DefaultMaster);
our $StreamConfName = 'stream.conf';

sub _stream_conf {
    my ($block, $port, $stream_config) = @_;
    $stream_config //= $block->stream_config // '';
    my $server_config = $block->stream_server_config;
    $server_config = "    proxy_pass redis;\n" unless defined $server_config;
    my $listen_opts = $block->stream_listen_options // '';
    chomp $stream_config;
    chomp $server_config;
    chomp $listen_opts;
    $listen_opts = " $listen_opts" if length $listen_opts;
    return <<"_EOC_";
stream {
$stream_config
    server {
        listen 127.0.0.1:$port$listen_opts;
$server_config
    }
}
_EOC_
}

sub _crlf {
    my $s = shift;
    $s =~ s/(?<!\r)\n/\r\n/g;
    return $s;
}

sub _run_perl {
    my ($what, $code) = @_;
    my $name = block_name();
    (my $file = "$name --- $what") =~ s/"/'/g;
    my $ok = eval "package main; no strict 'vars';\n#line 1 \"$file\"\n$code\n; 1";
    return $ok ? undef : ($@ || 'died');
}

sub _preprocess {
    my $block = shift;
    $Block = $block;
    my $name = $block->name;

    if (!defined $DefaultWorkers) {
        $DefaultWorkers = $Test::Nginx::Util::Workers;
        $DefaultMaster = $Test::Nginx::Util::MasterProcessEnabled;
    }
    if (defined $block->workers) {
        (my $n = $block->workers) =~ s/\s+//g;
        $Test::Nginx::Util::Workers = $n;
        $Test::Nginx::Util::MasterProcessEnabled = 'on';
    } else {
        $Test::Nginx::Util::Workers = $DefaultWorkers;
        $Test::Nginx::Util::MasterProcessEnabled = $DefaultMaster;
    }

    my $port = $StreamPort = $ENV{TEST_NGINX_STREAM_PORT}
        // ($Test::Nginx::Util::ServerPort + 1);

    # --- DNS: a fresh BIND per block that has --- dns, none otherwise
    eval {
        if (defined $block->dns) {
            my $expand = sub {
                my $t = shift // '';
                $t =~ s/\$(TEST_NGINX_\w+)/$ENV{$1} \/\/ die "no env $1\n"/ge;
                return $t;
            };
            dns_start(records => $expand->($block->dns), options => $expand->($block->dns_config),
                      zone_may_fail => defined $block->dns_zone_may_fail);
        } else {
            dns_stop();
        }
        backend_start($block->backends) if defined $block->backends;
        1;
    } or Test::Nginx::Util::bail_out("$name - setup: $@");

    # --- stream { } in an included file (so config errors name stream.conf:LINE)
    my $main_config = $block->main_config // '';
    if (defined $block->stream_config || defined $block->stream_server_config) {
        my $conf = _stream_conf($block, $port);
        my $path = "$Test::Nginx::Util::HtmlDir/$StreamConfName";

        my @errs;
        my $ln = 0;
        for my $line (split /\n/, $conf) {
            $ln++;
            if ($line =~ /#\s*emerg:\s*(.+?)\s*$/) {
                push @errs, qr/\[emerg\] \d+#\d+: \Q$1\E in \S*\/\Q$StreamConfName\E:$ln\s*$/;
            }
        }
        if (@errs) {
            $block->set_value('must_die', 1) unless defined $block->must_die;
            my $el = $block->error_log;
            my @el = !defined $el ? () : ref $el eq 'ARRAY' ? @$el
                   : ref $el ? ($el) : grep { length } split /\n/, $el;
            $block->set_value('error_log', [@el, @errs]);
        }

        my $uf = $block->user_files;
        if (ref $uf) {
            push @$uf, [$path, $conf];
        } else {
            $block->set_value('user_files', ($uf // '') . ">>> $path\n$conf");
        }
        $main_config .= "\ninclude $path;\n";
    }

    my $want_module = !defined $block->no_module && !$ENV{NGX_CONSUL_NO_MODULE};
    if ($want_module && $main_config =~ /\S/ && $main_config !~ /load_module/) {
        if (!-f $ModulePath) {
            Test::Nginx::Util::bail_out("$name - module not built: $ModulePath"
                . " (cargo build" . ($Profile eq 'release' ? ' --release' : '')
                . ", or set NGX_CONSUL_MODULE)");
        }
        $main_config = "load_module $ModulePath;\n$main_config";
    }
    $block->set_value('main_config', $main_config) if $main_config =~ /\S/;

    if (defined $block->must_die) {
        $block->set_value('suppress_stderr', 1) unless defined $block->suppress_stderr;
    }

    # Test::Nginx needs a --- config (the http server's); an empty one will do
    $block->set_value('config', '') unless defined $block->config;

    # --- the request: to the stream port, or a plain GET / on the HTTP port
    my $has_req = defined $block->request || defined $block->raw_request
        || defined $block->pipelined_requests;
    if (defined $block->stream_request || defined $block->stream_response
        || defined $block->stream_response_like)
    {
        $Test::Nginx::Util::ServerPortForClient = $port;
        $block->set_value('raw_request', _crlf($block->stream_request // "PING\nQUIT\n"));
        $block->set_value('http09', 1);
        if (defined $block->stream_response) {
            $block->set_value('response_body', _crlf($block->stream_response));
        } elsif (defined $block->stream_response_like) {
            $block->set_value('response_body_like', $block->stream_response_like);
        } elsif (!defined $block->stream_request) {
            $block->set_value('response_body', "+PONG\r\n+OK\r\n");
        }
    } elsif (!$has_req && !defined $block->must_die) {
        $Test::Nginx::Util::ServerPortForClient = $Test::Nginx::Util::ServerPort;
        $block->set_value('request', "GET /\n");
        $block->set_value('response_body_like', 'It works');
    } else {
        $Test::Nginx::Util::ServerPortForClient = $ENV{TEST_NGINX_CLIENT_PORT}
            // $Test::Nginx::Util::ServerPort;
    }

    # --- checks that every running block gets
    if (!defined $block->must_die) {
        my $nel = $block->no_error_log;
        my @nel = !defined $nel ? () : ref $nel eq 'ARRAY' ? @$nel
                : ref $nel ? ($nel) : grep { length } split /\n/, $nel;
        my $el = join "\n", map { ref $_ ? "$_" : $_ }
            (ref $block->error_log eq 'ARRAY' ? @{ $block->error_log }
             : defined $block->error_log ? ($block->error_log) : ());
        for my $p ('[alert]', '[crit]', 'panicked', 'exited on signal') {
            push @nel, $p unless grep { !ref $_ && $_ eq $p } @nel or index($el, $p) >= 0
                or defined $block->allow_alert;
        }
        $block->set_value('no_error_log', \@nel);
    }

    # --- Perl before nginx starts
    if (defined $block->setup) {
        if (my $err = _run_perl('setup', $block->setup)) {
            Test::Nginx::Util::bail_out("$name - setup failed: $err");
        }
    }

    # --- Perl once nginx runs (Test::Nginx evals --- init after the start)
    if (defined $block->check) {
        my $init = $block->init // '';
        $block->set_value('init', "Test::Nginx::Consul::_run_check();\n$init");
    }
}

sub _run_check {
    my $block = $Block;
    if (my $err = _run_perl('check', $block->check)) {
        Test::More::fail(block_name() . " - check died: $err");
    }
}

add_block_preprocessor(\&_preprocess);

# Between blocks: nothing (BIND is replaced by the next block's preprocessor,
# backends are reused). At the end: stop everything we started.
END {
    if ($$ == $OwnerPid) {
        local $?;
        # nginx first (Test::Nginx's own END would stop it after us): it
        # should not see its DNS server vanish and log about it
        nginx_stop(5) unless $ENV{TEST_NGINX_NO_CLEAN};
        dns_stop();
        backend_stop_all();
        remove_tree($TmpDir) unless $ENV{NGX_CONSUL_KEEP_TMP};
        rmdir $BaseDir;
    }
}

1;
