package Test::Nginx::Consul::Api;

# The Consul HTTP API double (t/lib/consul_api_double.py) for Test::Nginx blocks,
# driven as the BIND-based tests drive nsupdate:
#
#   use Test::Nginx::Consul 'no_plan';
#   use Test::Nginx::Consul::Api;
#   run_tests();
#   __DATA__
#   === TEST 1: two instances from the HTTP API
#   --- consul_api
#   instance redis 127.0.0.1:6380 weight=3
#   instance redis 127.0.0.1:6381
#   --- backends: 6380 6381
#   --- stream_config
#   upstream redis { consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT; }
#   --- check
#   api_register('redis', '127.0.0.1:6382');
#
# --- consul_api starts a fresh double for the block (without it, the double is
# stopped); --- consul_api_tls: it serves https with a certificate made for the
# run (CA: $TEST_NGINX_API_CA). Lines:
#   instance NAME ADDR:PORT [id=ID] [node=NODE] [node_addr=A] [svc_addr=A]
#            [weight=W] [warning_weight=W] [status=passing|warning|critical]
#            [node_status=S] [tags=a,b]      (ranges as in --- dns)
#   acl [token=SECRET:svc1,svc2]... [anonymous=svc1,...]   ACLs on, default deny
#   mode NAME [key=value]...                  how health answers misbehave
# By default an instance's node is "node-ADDR", with ADDR as its address and an
# empty Service.Address; its checks are the node's serfHealth and "service:ID".

use strict;
use warnings;

use Exporter 'import';
use HTTP::Tiny ();
use JSON::PP ();
use POSIX ();
use File::Path qw(make_path);
use Time::HiRes qw(time sleep);

use Test::Nginx::Consul ();

our @EXPORT = qw(
    api_start api_stop api_running api_port api_control_port api_ca api_dir
    api_register api_deregister api_check api_node_check api_mode api_acl
    api_set_index api_requests api_clear_requests api_state api_cert
    status_doc status_line health_requests
);

our $Port = $ENV{NGX_CONSUL_API_PORT} || 8500;
our $TlsPort = $ENV{NGX_CONSUL_API_TLS_PORT} || 8501;
our $ControlPort = $Port + 10000;
my ($Pid, $Dir);
my $Owner = $$;
my $Json = JSON::PP->new->canonical;
my $Http = HTTP::Tiny->new(timeout => 10);

$ENV{TEST_NGINX_API_PORT} = $Port;
$ENV{TEST_NGINX_API_TLS_PORT} = $TlsPort;

sub api_port { $Port }
sub api_control_port { $ControlPort }
sub api_running { return $Pid && kill(0, $Pid) ? 1 : 0 }
sub api_dir { $Dir //= "$Test::Nginx::Consul::TmpDir/api" }

# A CA and a server certificate for 127.0.0.1 and localhost, made once per run;
# also a second CA that did not sign it. Returns the directory.
sub api_cert {
    my $d = api_dir() . '/tls';
    return $d if -f "$d/server.pem";
    make_path($d);
    my $cnf = <<'_EOC_';
[req]
distinguished_name = dn
[dn]
[ext]
subjectAltName = IP:127.0.0.1,DNS:localhost
basicConstraints = CA:FALSE
_EOC_
    open my $fh, '>', "$d/ext.cnf" or die "$d/ext.cnf: $!\n";
    print $fh $cnf;
    close $fh;
    for my $ca (qw(ca other-ca)) {
        _run("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-$ca"
            . " -keyout $d/$ca.key -out $d/$ca.pem");
    }
    _run("openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -config $d/ext.cnf"
        . " -keyout $d/server.key -out $d/server.csr");
    _run("openssl x509 -req -in $d/server.csr -CA $d/ca.pem -CAkey $d/ca.key"
        . " -CAcreateserial -days 2 -extfile $d/ext.cnf -extensions ext -out $d/server.pem");
    return $d;
}

sub api_ca { api_cert() . '/ca.pem' }

sub _run {
    my $cmd = shift;
    my $out = `$cmd 2>&1`;
    die "$cmd: $out\n" if $?;
}

sub _addr_port {
    my $ap = shift;
    return ($1, $2) if $ap =~ /^\[([0-9a-fA-F:.]+)\]:(\d+)$/;
    return ($1, $2) if $ap =~ /^([^:]+):(\d+)$/;
    die "bad ADDRESS:PORT \"$ap\"\n";
}

# The RegisterRequest of one instance (see the header for the options).
sub _instance {
    my ($name, $ap, %o) = @_;
    my ($addr, $port) = _addr_port($ap);
    my $id = $o{id} // "$name-$addr-$port";
    my $node = $o{node} // "node-$addr";
    my $status = $o{status} // 'passing';
    my %w = (Passing => 0 + ($o{weight} // 1), Warning => 0 + ($o{warning_weight} // 1));
    return {
        Node => $node,
        Address => $o{node_addr} // $addr,
        Service => {
            ID => $id, Service => $name, Port => 0 + $port,
            Address => $o{svc_addr} // '',
            Tags => [grep { length } split /,/, $o{tags} // ''],
            Weights => \%w,
        },
        Checks => [
            { CheckID => 'serfHealth', Name => 'Serf Health Status',
              Status => $o{node_status} // 'passing', Output => 'Agent alive and reachable' },
            { CheckID => "service:$id", Name => "Service '$name' check",
              ServiceID => $id, Status => $status, Output => "TCP connect $ap: Success" },
        ],
    };
}

sub _options {
    my @words = @_;
    return map { /^([^=]+)=(.*)$/ ? ($1 => $2) : ($_ => 1) } @words;
}

# Lines of a --- consul_api section: {register => [...], acl => {...}, mode => {...}}
sub _init_of {
    my $text = shift // '';
    my %init = (register => []);
    for my $line (split /\n/, $text) {
        $line =~ s/^\s+|\s+$//g;
        next if $line eq '' || $line =~ /^#/;
        my ($kw, @w) = split ' ', $line;
        if ($kw eq 'instance') {
            my ($name, $spec, @opts) = @w;
            for my $ap (Test::Nginx::Consul::_expand_range($spec)) {
                push @{ $init{register} }, _instance($name, $ap, _options(@opts));
            }
        } elsif ($kw eq 'acl') {
            my %acl = (enabled => JSON::PP::true, tokens => {}, anonymous => []);
            for (@w) {
                if (/^token=([^:]+):(.*)$/) { $acl{tokens}{$1} = [split /,/, $2] }
                elsif (/^anonymous=(.*)$/) { $acl{anonymous} = [split /,/, $1] }
            }
            $init{acl} = \%acl;
        } elsif ($kw eq 'mode') {
            my ($mode, @opts) = @w;
            $init{mode} = { mode => $mode, _numbers(_options(@opts)) };
        } else {
            die "--- consul_api: unknown line \"$line\"\n";
        }
    }
    return \%init;
}

sub _numbers {
    my %h = @_;
    $_ = ($_ =~ /^-?\d+(\.\d+)?$/ ? 0 + $_ : $_) for values %h;
    return %h;
}

sub _port_busy {
    my $port = shift;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Timeout => 1);
    return $s ? 1 : 0;
}

# api_start(init => TEXT, tls => 1, addr => '127.0.0.2', log => FILE): a fresh
# double (https on $TlsPort with tls, else http on $Port).
sub api_start {
    my %o = @_;
    api_stop();
    my $dir = api_dir();
    make_path($dir);
    my $init = "$dir/init.json";
    open my $fh, '>', $init or die "$init: $!\n";
    print $fh $Json->encode(_init_of($o{init}));
    close $fh;
    my $port = $o{tls} ? $TlsPort : $Port;
    my @cmd = ('python3', "$Test::Nginx::Consul::RootDir/t/lib/consul_api_double.py",
               '--port', $port, '--control-port', $ControlPort, '--init', $init,
               '--addr', $o{addr} // '127.0.0.1');
    if ($o{tls}) {
        my $d = api_cert();
        push @cmd, '--tls', "$d/server.pem", "$d/server.key";
    }
    push @cmd, '--log', $o{log} // "$dir/requests.jsonl";
    require IO::Socket::INET;
    die "port $port or $ControlPort is already in use (set NGX_CONSUL_API_PORT?)\n"
        if _port_busy($port) || _port_busy($ControlPort);
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        setpgrp(0, 0);
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', "$dir/double.log";
        open STDERR, '>&', \*STDOUT;
        { exec @cmd }
        POSIX::_exit(127);
    }
    $Pid = $pid;
    open my $pf, '>', "$dir/double.pid" or die;
    print $pf "$pid\n";
    close $pf;
    my $ok = Test::Nginx::Consul::wait_until(sub {
        return 0 unless kill(0, $Pid) && !waitpid($Pid, POSIX::WNOHANG());
        my $r = $Http->get("http://127.0.0.1:$ControlPort/state");
        return $r->{success};
    }, 10);
    die "the Consul API double did not start (see $dir/double.log)\n" unless $ok;
    return 1;
}

sub api_stop {
    return unless $Pid;
    kill 'TERM', $Pid;
    for (1 .. 100) {
        last if waitpid($Pid, POSIX::WNOHANG()) || !kill(0, $Pid);
        sleep 0.02;
    }
    kill 'KILL', $Pid if kill(0, $Pid);
    waitpid($Pid, 0);
    undef $Pid;
}

sub _put {
    my ($path, $data) = @_;
    my $r = $Http->request('PUT', "http://127.0.0.1:$ControlPort$path",
                           { content => $Json->encode($data) });
    die "PUT $path: $r->{status} $r->{content}\n" unless $r->{success};
    return $Json->decode($r->{content});
}

# api_register('redis', '127.0.0.1:6382', weight => 2, status => 'warning')
sub api_register {
    my ($name, $ap, %o) = @_;
    _put('/register', _instance($name, $ap, %o));
}

# api_deregister('redis', '127.0.0.1:6382') (the default ID), or (id => ID, node => N)
sub api_deregister {
    my ($name, $ap, %o) = @_;
    my ($addr, $port) = defined $ap ? _addr_port($ap) : ();
    my $id = $o{id} // "$name-$addr-$port";
    my $node = $o{node} // "node-$addr";
    _put('/deregister', { Node => $node, ServiceID => $id });
}

# api_check('redis', '127.0.0.1:6380', 'warning'): the instance's service check
sub api_check {
    my ($name, $ap, $status, %o) = @_;
    my ($addr, $port) = _addr_port($ap);
    my $id = $o{id} // "$name-$addr-$port";
    _put('/check', { Node => $o{node} // "node-$addr", CheckID => "service:$id", Status => $status });
}

# api_node_check('127.0.0.1', 'critical'): the node's serfHealth
sub api_node_check {
    my ($addr, $status, %o) = @_;
    _put('/check', { Node => $o{node} // "node-$addr", CheckID => 'serfHealth', Status => $status });
}

# api_mode('drip', delay => 0.2, count => 3)
sub api_mode {
    my ($mode, %o) = @_;
    _put('/mode', { mode => $mode, %o });
}

# api_acl(tokens => { secret => ['redis'] }, anonymous => []); api_acl(enabled => 0)
sub api_acl {
    my %o = @_;
    _put('/acl', { enabled => ($o{enabled} // 1) ? JSON::PP::true : JSON::PP::false,
                   tokens => $o{tokens} // {}, anonymous => $o{anonymous} // [] });
}

sub api_set_index {
    my ($service, $index) = @_;
    _put('/index', { service => $service, index => 0 + $index });
}

# Every health request so far: [{t, conn, path, name, query, index, wait, token}, ...]
sub api_requests {
    my $r = $Http->get("http://127.0.0.1:$ControlPort/requests");
    die "GET /requests: $r->{status}\n" unless $r->{success};
    return [map { $Json->decode($_) } grep { length } split /\n/, $r->{content}];
}

sub api_clear_requests { _put('/clear_requests', {}) }

sub api_state {
    my $r = $Http->get("http://127.0.0.1:$ControlPort/state");
    return $Json->decode($r->{content});
}

# The health requests the double has seen (for NAME, by default all).
sub health_requests {
    my $name = shift;
    return [grep { !defined $name || $_->{name} eq $name } @{ api_requests() }];
}

# The JSON of `location = /status { consul_upstream_status; }` on the http port.
sub status_doc {
    my $r = HTTP::Tiny->new(timeout => 5)
        ->get("http://127.0.0.1:$Test::Nginx::Util::ServerPort/status");
    die "GET /status: $r->{status} $r->{content}\n" unless $r->{success};
    return $Json->decode($r->{content});
}

# The status of upstream UP's line whose query matches QR (first line by default).
sub status_line {
    my ($up, $qr) = @_;
    my $doc = status_doc();
    my ($u) = grep { $_->{name} eq ($up // 'redis') } @{ $doc->{upstreams} };
    return undef unless $u;
    my ($l) = grep { !defined $qr || $_->{query} =~ $qr } @{ $u->{lines} };
    return wantarray ? ($l, $u) : $l;
}

# --- consul_api / --- consul_api_tls in a block
Test::Nginx::Socket::add_block_preprocessor(sub {
    my $block = shift;
    my $name = $block->name;
    eval {
        # The previous block's nginx would talk to the new double (and show
        # in its request log): it goes first.
        Test::Nginx::Consul::nginx_stop(5) if api_running() || defined $block->consul_api;
        if (defined $block->consul_api) {
            api_start(init => $block->consul_api, tls => defined $block->consul_api_tls);
        } else {
            api_stop();
        }
        1;
    } or Test::Nginx::Util::bail_out("$name - API double: $@");
    $ENV{TEST_NGINX_API_CA} = api_ca() if defined $block->consul_api_tls;
});

END {
    local $?;    # the double's exit status is not the test's
    api_stop() if $$ == $Owner;
}

1;
