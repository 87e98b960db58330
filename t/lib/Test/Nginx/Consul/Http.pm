package Test::Nginx::Consul::Http;

# HTTP (and memcached, FastCGI, SCGI, uwsgi, h2c) backends (t/lib/http_backend.py) and an HTTP client for Test::Nginx blocks
# that proxy with nginx's http module (issue 17: consul_upstream in http upstreams).
#
#   use lib 't/lib';
#   use Test::Nginx::Consul 'no_plan';
#   use Test::Nginx::Consul::Http;
#   run_tests();
#   __DATA__
#   === TEST 1: round robin
#   --- http_backends: 8081 8082
#   --- http_config
#   upstream api { server 127.0.0.1:8081; server 127.0.0.1:8082; }
#   --- config
#   location /api/ { proxy_pass http://api; }
#   --- check
#   is_tally(http_tally(20, '/api/'), {8081 => 10, 8082 => 10}, 'round robin');
#
# Block sections (on top of Test::Nginx::Consul's):
#   --- http_backends: 8081 127.0.0.2-11:8090 memcached:11311
#       (also fastcgi:, scgi:, uwsgi:, h2c: for the other *_pass; see http_backend.py)
#       the backends this block needs, in one http_backend.py process: started fresh
#       when the set differs from the previous block's, else reset (counters zero,
#       killed listeners listening again, slow/hold cleared, open connections reset).
#       nginx is stopped first. Without the section the process is stopped.
#   --- http_config   Test::Nginx's own; written to html/http.conf and included from
#       http { }, so that a line ending in "# emerg: MESSAGE" makes the block a
#       must_die block expecting "[emerg] MESSAGE in .../http.conf:LINE".
#   --- config / --- request / --- response_body...  Test::Nginx's own. A block with
#       --- http_backends and no request sends "GET /" and expects status 200.
# The module is loaded (load_module) when the http sections mention "consul_"
# (--- no_module: never). A block whose --- http_config has consul_upstream is first
# checked with nginx -t: when nginx refuses it, the block fails at once with nginx's
# message (instead of Test::Nginx retrying the start for 30 s and bailing out).
#
# Helpers: http_get, http_tally, http_tally_background, http_wait_for_backends,
# backend_stats, http_backend_kill/start/slow/hold/release, http_backends_reset,
# http_config_set, nginx_version_num, nginx_keepalive_by_default; is_tally and
# the rest come from Test::Nginx::Consul.

use strict;
use warnings;

use Exporter 'import';
use IO::Socket::INET ();
use IO::Socket::UNIX ();
use IO::Select ();
use JSON::PP ();
use POSIX ();
use Socket qw(SOCK_STREAM);
use Time::HiRes qw(time sleep);

use Test::Nginx::Consul ();

our @EXPORT = qw(
    http_backends_start http_backends_stop http_backends_running http_backends_reset
    backend_stats http_backend_kill http_backend_start http_backend_slow
    http_backend_hold http_backend_release
    http_get http_get_background http_connect http_send http_recv http_tally http_tally_background http_wait_for_backends
    http_config_set http_port nginx_version_num nginx_keepalive_by_default
    killed_peer_error
);

my $Json = JSON::PP->new->canonical;
my $Owner = $$;
my ($Pid, $Specs);
our $HttpText = '';    # the block's --- http_config as written

sub _dir { $Test::Nginx::Consul::TmpDir }
sub _ctl_path { _dir() . '/http-backends.sock' }
sub _log_path { _dir() . '/http-backends.log' }

our $HttpConfName = 'http.conf';

# ---------------------------------------------------------------------------
# The backend process

sub http_backends_running { return $Pid && kill(0, $Pid) && !waitpid($Pid, POSIX::WNOHANG()) ? 1 : 0 }

sub _ctl {
    my $cmd = shift;
    my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM, Peer => _ctl_path())
        or die "http backends: control socket: $!\n";
    print $s "$cmd\n";
    my $sel = IO::Select->new($s);
    my $line = '';
    while ($line !~ /\n/) {
        $sel->can_read(10) or die "http backends: no answer to \"$cmd\"\n";
        sysread($s, $line, 65536, length $line) or die "http backends: closed on \"$cmd\"\n";
    }
    close $s;
    my $r = $Json->decode($line);
    die "http backends: $cmd: $r->{error}\n" if ref $r eq 'HASH' && exists $r->{ok} && !$r->{ok};
    return $r;
}

# http_backends_start('8081 8082', 'memcached:11311'): a fresh process with these
# listeners (any running one is stopped first). Dies with the process's log if a
# listener cannot be bound.
sub http_backends_start {
    my @specs = grep { length } map { split /[\s,]+/ } @_;
    http_backends_stop();
    my $ctl = _ctl_path();
    unlink $ctl;
    my @cmd = ('python3', "$Test::Nginx::Consul::RootDir/t/lib/http_backend.py",
               '--control', $ctl, '--parent', $$, @specs);
    my $log = _log_path();
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        setpgrp(0, 0);
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', $log;
        open STDERR, '>&', \*STDOUT;
        { exec @cmd }
        POSIX::_exit(127);
    }
    $Pid = $pid;
    Test::Nginx::Consul::_write_file(_dir() . '/http-backends.pid', "$pid\n");
    my $ok = Test::Nginx::Consul::wait_until(sub {
        return -1 unless http_backends_running();
        return -S $ctl && eval { _ctl('stats'); 1 };
    }, 10);
    if (!$ok || $ok eq '-1' || !http_backends_running()) {
        my $text = do { local (@ARGV, $/) = ($log); <> } // '';
        http_backends_stop();
        die "the http backends (@specs) did not start: " . substr($text, -600) . "\n";
    }
    $Specs = join ' ', @specs;
    return 1;
}

sub http_backends_stop {
    return 1 unless $Pid;
    kill 'TERM', $Pid;
    for (1 .. 150) {
        last if waitpid($Pid, POSIX::WNOHANG()) || !kill(0, $Pid);
        sleep 0.02;
    }
    if (kill(0, $Pid)) {
        kill 'KILL', $Pid;
        waitpid($Pid, 0);
    }
    undef $Pid;
    undef $Specs;
    unlink _dir() . '/http-backends.pid';
    return 1;
}

# Counters to zero, killed listeners back, slow/hold off, open connections reset.
sub http_backends_reset { _ctl('reset'); return 1 }

sub _key {
    my $ap = shift;
    return "127.0.0.1:$ap" if $ap =~ /^\d+$/;
    return $ap;
}

# backend_stats('8081') -> {accepted, requests, open, held, listening, kind, slow_ms};
# backend_stats() -> {"127.0.0.1:8081" => {...}, ...}
sub backend_stats {
    my $ap = shift;
    my $all = _ctl('stats');
    return $all unless defined $ap;
    my $s = $all->{ _key($ap) } or die "backend_stats: no listener " . _key($ap) . "\n";
    return $s;
}

sub http_backend_kill { _ctl('kill ' . _key(shift)); return 1 }
sub http_backend_start { _ctl('start ' . _key(shift)); return 1 }
sub http_backend_slow { my ($ap, $ms) = @_; _ctl('slow ' . _key($ap) . ' ' . int($ms)); return 1 }
sub http_backend_hold { _ctl('hold ' . _key(shift)); return 1 }
sub http_backend_release { my $ap = shift; _ctl('release' . (defined $ap ? ' ' . _key($ap) : '')); return 1 }

# The error.log line of nginx's first try that fails on a killed backend at
# PORT (for `--- error_log eval`): a new connection refused, or, with upstream
# keepalive (on by default from nginx 1.29.7), a cached connection that the kill
# reset, found out on reading or on sending. After the latter, max_fails=1 holds
# the peer out for fail_timeout, so no refused connect() need follow.
sub killed_peer_error {
    my $port = shift;
    return qr/(?:connect\(\) failed \(111: Connection refused\)|(?:recv|send|writev)\(\) failed \((?:104: Connection reset by peer|32: Broken pipe)\)|upstream prematurely closed connection).*upstream: "[a-z]+:\/\/127\.0\.0\.1:$port\//;
}

# ---------------------------------------------------------------------------
# HTTP client

sub http_port { return $Test::Nginx::Util::ServerPort }

sub _connect {
    my %o = @_;
    return IO::Socket::INET->new(PeerAddr => $o{host} // '127.0.0.1', PeerPort => $o{port} // http_port(),
                                 Proto => 'tcp', Timeout => $o{timeout} // 3,
                                 ($o{local_addr} ? (LocalAddr => $o{local_addr}) : ()));
}

# Reads one response from $s: ({status, headers => {lc name => value}, body, close}, undef)
# or (undef, reason, bytes_received).
sub _read_response {
    my ($s, $method, $timeout) = @_;
    my $sel = IO::Select->new($s);
    my $deadline = time + $timeout;
    my $buf = '';
    my $fill = sub {
        my $left = $deadline - time;
        return 'timeout' if $left <= 0 || !$sel->can_read($left);
        my $n = sysread $s, $buf, 65536, length $buf;
        return "read: $!" unless defined $n;
        return 'closed' if $n == 0;
        return undef;
    };
    while ($buf !~ /\r\n\r\n/) {
        my $err = $fill->();
        return (undef, $err eq 'closed' && $buf eq '' ? 'closed without an answer' : $err, length $buf) if $err;
    }
    my $end = index($buf, "\r\n\r\n");
    my ($line, @hl) = split /\r\n/, substr($buf, 0, $end);
    $buf = substr($buf, $end + 4);
    my ($ver, $status) = $line =~ m{^(HTTP/1\.\d) (\d{3})} or return (undef, "bad status line: $line", 1);
    my %h;
    for (@hl) { $h{ lc $1 } = $2 if /^([^:]+):\s*(.*?)\s*$/ }
    my $body = '';
    my $conn = lc($h{connection} // '');
    my $close = $conn =~ /close/ || ($ver eq 'HTTP/1.0' && $conn !~ /keep-alive/);
    if ($method eq 'HEAD' || $status == 204 || $status == 304) {
        # no body
    } elsif (defined $h{'content-length'}) {
        while (length $buf < $h{'content-length'}) {
            my $err = $fill->();
            return (undef, "body: $err", 1) if $err;
        }
        $body = substr($buf, 0, $h{'content-length'}, '');
    } elsif (lc($h{'transfer-encoding'} // '') =~ /chunked/) {
        while (1) {
            while ($buf !~ /\r\n/) { my $err = $fill->(); return (undef, "chunk: $err", 1) if $err }
            $buf =~ s/^([0-9a-fA-F]+)[^\r]*\r\n// or return (undef, 'bad chunk', 1);
            my $size = hex $1;
            while (length $buf < $size + 2) { my $err = $fill->(); return (undef, "chunk: $err", 1) if $err }
            $body .= substr($buf, 0, $size);
            substr($buf, 0, $size + 2, '');
            if ($size == 0) { last }
        }
    } else {
        while (1) { my $err = $fill->(); last if $err && $err eq 'closed'; return (undef, "body: $err", 1) if $err }
        $body = $buf;
        $close = 1;
    }
    return ({ status => $status + 0, headers => \%h, body => $body, close => $close }, undef);
}

sub _parse_backend {
    my $r = shift;
    if ($r->{body} =~ /^(\S+) (\d+) conn=(\d+) req=(\d+)$/m) {
        my ($addr, $port) = ($1, $2);
        $r->{backend} = $addr =~ /:/ ? "[$addr]:$port" : "$addr:$port";
        @$r{qw(backend_addr backend_port conn req)} = ($addr, $port + 0, $3 + 0, $4 + 0);
    }
    return $r;
}

# One request on a connection (a fresh one unless $o{sock}; with keepalive => 1 the
# request asks to keep it). Returns the response hash: status, headers, body, close,
# and, when a backend answered, backend ("addr:port"), backend_addr, backend_port,
# conn, req; on failure {status => 0, error => reason}.
sub _request {
    my ($sock, $path, %o) = @_;
    my $err = http_send($sock, $path, %o);
    return { status => 0, error => $err } if $err;
    return http_recv($sock, %o);
}

# The parts of a request on a connection of one's own, for requests left open at a
# held backend on a known worker (a client connection stays with the worker that
# accepted it): my $s = http_connect(); http_send($s, '/api/'); ...; http_recv($s).
sub http_connect { return _connect(@_) || die "http_connect: $!\n" }

# Writes one request (HTTP/1.1; keep-alive unless keepalive => 0). Returns an error or undef.
sub http_send {
    my ($sock, $path, %o) = @_;
    my $method = $o{method} // 'GET';
    my $host = $o{host_header} // 'localhost';
    my $req = "$method $path HTTP/1.1\r\nHost: $host\r\n";
    $req .= "Connection: close\r\n" if defined $o{keepalive} && !$o{keepalive};
    my $hdrs = $o{headers} // {};
    $req .= "$_: $hdrs->{$_}\r\n" for sort keys %$hdrs;
    $req .= "\r\n";
    my $w = syswrite $sock, $req;
    return "write: $!" unless defined $w && $w == length $req;
    return undef;
}

# Reads one response: the hash http_get returns.
sub http_recv {
    my ($sock, %o) = @_;
    my ($r, $why, $got) = _read_response($sock, $o{method} // 'GET', $o{timeout} // 5);
    return { status => 0, error => $why, got => $got } unless $r;
    return _parse_backend($r);
}

# http_get('/api/x', port => P, keepalive => 0, headers => {...}, method => 'GET',
# local_addr => '127.0.0.2', timeout => 5): one request on a new connection.
sub http_get {
    my ($path, %o) = @_;
    my $s = _connect(%o) or return { status => 0, error => "connect: $!" };
    my $r = _request($s, $path, %o, keepalive => 0);
    close $s;
    return $r;
}

sub _tally_key {
    my ($r, $by) = @_;
    return $r->{backend} if $by eq 'addr';
    return $r->{backend_port};
}

# A client: ->($path) sends one request, on one keep-alive connection (reconnecting
# when nginx closes it) with keepalive => 1, else on a new connection each time.
# A request that gets no byte back on a reused connection (nginx closed it idle,
# as at a reload) is sent again once on a new connection, as HTTP clients do.
our $ClientConnections = 0;
sub _client {
    my %o = @_;
    my $sock;
    return sub {
        my $path = shift;
        if (!$o{keepalive}) {
            $ClientConnections++;
            return http_get($path, %o);
        }
        my $retried;
        for my $attempt (1, 2) {
            my $reused = defined $sock;
            if (!$sock) {
                $sock = _connect(%o) or return { status => 0, error => "connect: $!", retried => $retried };
                $ClientConnections++;
            }
            my $r = _request($sock, $path, %o, keepalive => 1);
            $r->{retried} = $retried;
            if ($r->{status} && !$r->{close}) { return $r }
            close $sock;
            undef $sock;
            return $r if $r->{status} || !$reused || ($r->{got} // 0) > 0 || $attempt == 2;
            $retried = 1;
        }
    };
}

# http_tally(N, PATH, keepalive => 0|1, by => 'port'|'addr', status => 200, port => P,
# headers => {...}, delay => S): N sequential requests; returns { 8081 => 10, ... } and
# "fail" for requests that failed or answered another status than `status` (the last
# reason in $Test::Nginx::Consul::LastFailure). With keepalive => 1 all go over one client
# connection to nginx, so that what the backends count is nginx's upstream keepalive.
sub http_tally {
    my ($n, $path, %o) = @_;
    $path //= '/';
    my $by = $o{by} // 'port';
    my $want = $o{status} // 200;
    my $client = _client(%o);
    my %t;
    for (1 .. $n) {
        my $r = $client->($path);
        if ($r->{status} == $want && defined $r->{backend}) {
            $t{ _tally_key($r, $by) }++;
        } else {
            $t{fail}++;
            $Test::Nginx::Consul::LastFailure = $r->{status}
                ? "status $r->{status}" . (defined $r->{backend} ? " from $r->{backend}" : '') . ": $r->{body}"
                : $r->{error};
        }
        sleep $o{delay} if $o{delay};
    }
    return \%t;
}

# Requests in a child process until the returned sub is called:
#   my $bg = http_tally_background('/api/', keepalive => 1, delay => 0.01);
#   ...; my $t = $bg->();   # { 8081 => n, 8082 => m, fail => k }
# Failures (with a timestamp) in $Test::Nginx::Consul::LastFailure; $t->{retried}
# counts requests sent again on a new connection after nginx closed an idle one.
sub http_tally_background {
    my ($path, %o) = @_;
    $path //= '/';
    my $file = _dir() . "/http-bg-" . int(rand(1e9));
    my $stop = "$file.stop";
    my $parent = $$;
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        $Test::Nginx::Util::InSubprocess = 1;
        my $by = $o{by} // 'port';
        my $want = $o{status} // 200;
        my $client = _client(%o);
        my (%t, @fails);
        while (!-e $stop && getppid() == $parent) {
            my $r = $client->($path);
            $t{retried}++ if $r->{retried};
            if ($r->{status} == $want && defined $r->{backend}) { $t{ _tally_key($r, $by) }++ }
            else {
                $t{fail}++;
                push @fails, sprintf('%.3f %s', time,
                    $r->{status} ? "status $r->{status}: $r->{body}" : $r->{error});
            }
            sleep($o{delay} // 0.01);
        }
        open my $fh, '>', $file;
        print $fh join(' ', map { "$_=$t{$_}" } keys %t), "\n", map { "$_\n" } @fails;
        close $fh;
        POSIX::_exit(0);
    }
    return sub {
        Test::Nginx::Consul::_write_file($stop, '');
        waitpid($pid, 0);
        open my $fh, '<', $file or return { fail => 'no result' };
        my $line = <$fh>;
        my @fails = <$fh>;
        close $fh;
        chomp $line;
        my %t = map { split /=/ } grep { length } split / /, $line;
        $Test::Nginx::Consul::LastFailure = join '', @fails if @fails;
        return \%t;
    };
}

# One request in a child process (for requests a held backend keeps open):
#   my $done = http_get_background('/api/');  ...;  my $r = $done->();  # http_get's hash
sub http_get_background {
    my ($path, %o) = @_;
    my $file = _dir() . "/http-get-" . int(rand(1e9));
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        $Test::Nginx::Util::InSubprocess = 1;
        my $r = http_get($path, timeout => 30, %o);
        open my $fh, '>', "$file.tmp";
        print $fh $Json->encode($r);
        close $fh;
        rename "$file.tmp", $file;
        POSIX::_exit(0);
    }
    return sub {
        waitpid($pid, 0);
        open my $fh, '<', $file or return { status => 0, error => 'no result' };
        local $/;
        my $r = $Json->decode(<$fh>);
        close $fh;
        unlink $file;
        return $r;
    };
}

# Polls PATH until every expected backend answered (with only => 1: and no other in
# the last round). With consul_upstream in the block's http config, first waits for
# the module's first "N peers from" line. Returns 1/0.
sub http_wait_for_backends {
    my ($want, %o) = @_;
    my $path = $o{path} // '/';
    my $timeout = $o{timeout} // 10;
    my $t0 = time;
    if (($o{first_set} // 1) && $HttpText =~ /consul_upstream/) {
        Test::Nginx::Consul::wait_for_log(qr/consul (?:http )?upstream "[^"]*": \d+ peers? from /, $timeout);
    }
    my $round = $o{round} // 2 * @$want;
    $round = 4 if $round < 4;
    my $left = $timeout - (time - $t0);
    $left = 0.5 if $left < 0.5;
    my %probe = (by => $o{by} // 'port', status => $o{status} // 200);
    $probe{port} = $o{port} if defined $o{port};
    return Test::Nginx::Consul::wait_until(sub {
        my $t = http_tally($round, $path, %probe);
        my %w = map { $_ => 1 } @$want;
        for my $k (keys %$t) {
            delete $w{$k};
            return 0 if $o{only} && !grep { $_ eq $k } @$want;
        }
        return !%w;
    }, $left, 0.1);
}

# Replaces the block's http.conf (for a reload that adds, removes or changes lines).
sub http_config_set {
    my $text = shift;
    $text =~ s/\$(TEST_NGINX_\w+)/$ENV{$1} \/\/ die "no env $1\n"/ge;
    Test::Nginx::Consul::_write_file("$Test::Nginx::Util::HtmlDir/$HttpConfName", $text);
    return 1;
}

# ---------------------------------------------------------------------------
# nginx's version

# 1028003 for nginx 1.28.3, 1027001 for openresty/1.27.1.2 (from `nginx -V` of the binary under test).
my $VersionNum;
sub nginx_version_num {
    return $VersionNum if defined $VersionNum;
    my $out = `$Test::Nginx::Consul::NginxBinary -V 2>&1`;
    my ($a, $b, $c) = $out =~ m{nginx version: [^/\s]+/(\d+)\.(\d+)\.(\d+)} or die "nginx -V: no version in: $out\n";
    return $VersionNum = $a * 1000000 + $b * 1000 + $c;
}

# nginx 1.29.7 and later keep upstream connections alive without a keepalive line
# (keepalive 32 by default; "keepalive 0;" turns it off).
sub nginx_keepalive_by_default { return nginx_version_num() >= 1029007 ? 1 : 0 }

# ---------------------------------------------------------------------------
# Block preprocessor (runs before Test::Nginx::Consul's: preprocessors added later run first)

sub _preflight {
    my ($block, $http_text) = @_;
    my $config = $block->config // '';
    my $text = "load_module $Test::Nginx::Consul::ModulePath;\nevents { }\nhttp {\n$http_text\n"
        . "server {\nlisten 127.0.0.1:1;\n$config\n}\n}\n";
    my ($rc, $out) = eval { Test::Nginx::Consul::nginx_t($text) };
    return undef unless defined $rc && $rc != 0;
    my ($emerg) = $out =~ /(\[emerg\].*)/;
    return $emerg // $out;
}

Test::Nginx::Socket::add_block_preprocessor(sub {
    my $block = shift;
    my $name = $block->name;
    eval {
        my $want = defined $block->http_backends
            ? join(' ', grep { length } split /[\s,]+/, $block->http_backends) : undef;
        if (defined $want || $Pid) {
            # The previous block's nginx holds connections to the backends: it goes first.
            Test::Nginx::Consul::nginx_stop(5);
        }
        if (!defined $want) {
            http_backends_stop();
        } elsif ($Specs && $want eq $Specs && http_backends_running()) {
            http_backends_reset();
        } else {
            http_backends_start($want);
        }
        1;
    } or Test::Nginx::Util::bail_out("$name - http backends: $@");

    # Test::Nginx runs --- init (where --- check goes) even in a skipped block
    my $skipped = defined $block->skip_eval && $block->skip_eval =~ /^\s*\d+\s*:\s*(.*)/s
        && eval "package main; $1";
    $block->set_value('check', '') if $skipped;

    my $http = $block->http_config;
    $HttpText = $http // '';
    my $load = !defined $block->no_module && !$ENV{NGX_CONSUL_NO_MODULE}
        && (($http // '') . ($block->config // '')) =~ /\bconsul_/;

    if (defined $http) {
        my $path = "$Test::Nginx::Util::HtmlDir/$HttpConfName";
        (my $text = $http) =~ s/\n?\z/\n/;
        my (@errs, $ln);
        for my $line (split /\n/, $text) {
            $ln++;
            push @errs, qr/\[emerg\] \d+#\d+: \Q$1\E in \S*\/\Q$HttpConfName\E:$ln\s*$/
                if $line =~ /#\s*emerg:\s*(.+?)\s*$/;
        }
        if (@errs) {
            $block->set_value('must_die', 1) unless defined $block->must_die;
            my $el = $block->error_log;
            my @el = !defined $el ? () : ref $el eq 'ARRAY' ? @$el
                   : ref $el ? ($el) : grep { length } split /\n/, $el;
            $block->set_value('error_log', [@el, @errs]);
        }
        my $uf = $block->user_files;
        if (ref $uf) { push @$uf, [$path, $text] }
        else { $block->set_value('user_files', ($uf // '') . ">>> $path\n$text") }
        $block->set_value('http_config', "include $path;\n");

        if ($load && !defined $block->must_die && !$skipped && $text =~ /\bconsul_upstream\b/) {
            (my $expanded = $text) =~ s/\$(TEST_NGINX_\w+)/$ENV{$1} \/\/ "\$$1"/ge;
            if (my $err = _preflight($block, $expanded)) {
                Test::More::fail("$name - nginx -t refuses the configuration: $err");
                $block->set_value('skip_eval', '1: 1');
                $block->set_value('check', '');    # it would only time out
            }
        }
    }

    if ($load) {
        my $mc = $block->main_config // '';
        $block->set_value('main_config', "load_module $Test::Nginx::Consul::ModulePath;\n$mc")
            unless $mc =~ /load_module/;
    }

    if (defined $block->http_backends && !defined $block->request && !defined $block->raw_request
        && !defined $block->pipelined_requests && !defined $block->must_die
        && !defined $block->stream_request && !defined $block->stream_response)
    {
        $block->set_value('request', "GET /\n");
        $block->set_value('error_code', 200) unless defined $block->error_code;
    }
});

END {
    local $?;
    if ($$ == $Owner) {
        # nginx first, as Test::Nginx::Consul's END does (this END runs before it)
        Test::Nginx::Consul::nginx_stop(5) if $Pid && !$ENV{TEST_NGINX_NO_CLEAN};
        http_backends_stop();
    }
}

1;
