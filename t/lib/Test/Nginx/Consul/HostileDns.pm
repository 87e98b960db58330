package Test::Nginx::Consul::HostileDns;

# A scripted DNS server on loopback (UDP and TCP, one port) that answers like
# Consul's agent, or misbehaves on purpose: a real DNS server cannot be made to.
# It runs as a forked process of the test; the behaviour and the instances it
# answers with are files it reads on every query, so a test switches them at run
# time, and every query is logged (for counting).
#
#   use Test::Nginx::Consul::HostileDns;
#   hostile_start(instances => "instance redis.service.yunlu_office.consul 127.0.0.1:6380\n");
#   hostile_mode('ptr_loop');                 # from the next query on
#   wait_until(sub { hostile_queries(mode => 'ptr_loop') >= 3 }, 5);
#   hostile_instances("instance ... 127.0.0.1:6381 weight=3\n");
#   hostile_stop();                           # also at exit
#
# Instances: "instance NAME ADDR:PORT [weight=W] [priority=P]" lines (ADDR IPv4;
# "127.0.0.1:20000-20999" is a range of ports). Answers are Consul-shaped: AA, TTL 0,
# SRV PRIO WEIGHT PORT <hex>.addr.<dc>.consul. with the A record in ADDITIONAL;
# A queries for those targets are answered; anything else is NXDOMAIN.
#
# Behaviours (hostile_mode), per query, for UDP and TCP alike unless said:
#   ok             the answer above
#   flap           ok plus one priority-9 record whose port changes with every
#                  answer (127.0.0.1:40000+n): every answer is a new set
#   slow           TCP: the answer one byte every 0.2 s (mode "slow:SECONDS" sets
#                  it); UDP: the answer 5 s late
#   never          no answer (TCP: the connection stays open)
#   random         random bytes (TCP: with a correct length prefix)
#   wrong_id       the answer with another message id
#   long_prefix    TCP: a length prefix 100 bytes longer than the message, then
#                  silence; UDP: as close_mid
#   lying_counts   header counts larger than the records that follow
#   ptr_loop       the first SRV target is a compression pointer to itself
#   wrong_question the question section names another name
#   other_name     SRV records (and their A records) for another name only
#   many           as many copies of the SRV records as fit in 65,535 bytes
#                  (UDP: truncated, TC set)
#   count_10k      the header claims 10,000 answers; the body carries what fits
#                  in 65,535 bytes
#   close_mid      TCP: the length prefix and half the message, then close;
#                  UDP: half the message
#   servfail, nxdomain   that response code, no records
#   consul         answers exactly as Consul's agent does, hostname targets,
#                  node-meta TXT records, trimming and TC included, and TCP
#                  connections closed after 128 queries or 8 s idle: see
#                  Test::Nginx::Consul::ConsulDns for the instance lines and
#                  hostile_consul() for the agent's settings

use strict;
use warnings;

use Exporter 'import';
use IO::Socket::INET ();
use IO::Select ();
use POSIX ();
use Time::HiRes qw(time sleep);
use File::Path qw(make_path);

use Test::Nginx::Consul::ConsulDns qw(consul_config consul_data consul_query consul_answer);

our @EXPORT = qw(
    hostile_start hostile_stop hostile_mode hostile_instances hostile_queries
    hostile_port hostile_running hostile_dir hostile_consul hostile_connections
);

our $Port = $ENV{NGX_CONSUL_HOSTILE_PORT} || 8653;
my ($Pid, $Dir);
my $Owner = $$;

sub hostile_port { $Port }
sub hostile_running { return $Pid && kill(0, $Pid) ? 1 : 0 }

sub hostile_dir { _dir() }

sub _dir {
    return $Dir //= ($Test::Nginx::Consul::TmpDir // "/tmp/ngx-consul-hostile-$$") . '/hostile';
}

sub _write {
    my ($file, $text) = @_;
    my $tmp = "$file.tmp";
    open my $fh, '>', $tmp or die "cannot write $tmp: $!\n";
    print $fh $text;
    close $fh;
    rename $tmp, $file or die "rename $tmp: $!\n";
}

sub hostile_mode { _write(_dir() . '/mode', shift . "\n") }
sub hostile_instances { _write(_dir() . '/instances', shift // '') }

# The Consul agent's DNS settings for mode "consul" (ConsulDns.pm lists them),
# from the next query on: hostile_consul(enable_truncate => 1, recursors => 1).
sub hostile_consul {
    my %o = @_;
    _write(_dir() . '/consul', join '', map { "$_=$o{$_}\n" } sort keys %o);
}

# TCP connections the server accepted so far (open => 1: still open).
sub hostile_connections {
    my %o = @_;
    open my $fh, '<', _dir() . '/connections.log' or return 0;
    my ($accepted, $closed) = (0, 0);
    while (my $l = <$fh>) {
        $accepted++ if $l =~ / accept$/;
        $closed++ if $l =~ / close /;
    }
    return $o{open} ? $accepted - $closed : $accepted;
}

# Queries received: all, or those of one mode / transport / type / name.
sub hostile_queries {
    my %o = @_;
    open my $fh, '<', _dir() . '/queries.log' or return 0;
    my $n = 0;
    while (my $l = <$fh>) {
        my (undef, $transport, $name, $type, $mode) = split ' ', $l;
        next unless defined $mode;
        next if defined $o{mode} && $mode ne $o{mode};
        next if defined $o{transport} && $transport ne $o{transport};
        next if defined $o{type} && $type ne $o{type};
        next if defined $o{name} && $name ne $o{name};
        $n++;
    }
    return $n;
}

sub hostile_start {
    my %o = @_;
    hostile_stop();
    $Port = $o{port} if $o{port};
    my $dir = _dir();
    make_path($dir);
    unlink "$dir/queries.log", "$dir/connections.log";
    hostile_consul(%{ $o{consul} // {} });
    hostile_mode($o{mode} // 'ok');
    hostile_instances($o{instances} // '');
    my $udp = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $Port,
                                    Proto => 'udp', ReuseAddr => 1)
        or die "hostile DNS: cannot bind udp 127.0.0.1:$Port: $!\n";
    my $tcp = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $Port,
                                    Proto => 'tcp', Listen => 128, ReuseAddr => 1)
        or die "hostile DNS: cannot listen on tcp 127.0.0.1:$Port: $!\n";
    my $parent = $$;
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        $Test::Nginx::Util::InSubprocess = 1;
        open STDIN, '<', '/dev/null';
        my $ok = eval { _serve($udp, $tcp, $dir, $parent); 1 };
        warn "# hostile DNS died: $@" unless $ok;
        POSIX::_exit(0);
    }
    close $udp;
    close $tcp;
    $Pid = $pid;
    _write("$dir/server.pid", "$pid\n");
    return 1;
}

sub hostile_stop {
    return 1 unless $Pid;
    kill 'TERM', $Pid;
    for (1 .. 100) {
        last if waitpid($Pid, POSIX::WNOHANG()) == $Pid || !kill(0, $Pid);
        sleep 0.02;
    }
    kill 'KILL', $Pid if kill(0, $Pid);
    waitpid($Pid, 0) if kill(0, $Pid);
    undef $Pid;
    return 1;
}

END {
    local $?;
    hostile_stop() if $$ == $Owner;
}

# ---------------------------------------------------------------------------
# The server (child process)

sub _read_file {
    my $f = shift;
    open my $fh, '<', $f or return '';
    local $/;
    return <$fh> // '';
}

sub _instances {
    my $text = shift;
    my @inst;
    for my $line (split /\n/, $text) {
        next unless $line =~ /^\s*instance\s+(\S+)\s+(\d+\.\d+\.\d+\.\d+):(\d+)(?:-(\d+))?((?:\s+\w+=\S+)*)\s*$/;
        my ($name, $addr, $p0, $p1, $rest) = (lc $1, $2, $3, $4 // $3, $5);
        $name =~ s/\.$//;
        my %o = map { split /=/, $_, 2 } grep { length } split /\s+/, $rest;
        my ($dc) = $name =~ /\.service\.([^.]+)\.consul$/;
        $dc //= 'yunlu_office';
        my $target = join('', map { sprintf '%02x', $_ } split /\./, $addr) . ".addr.$dc.consul";
        push @inst, map { { name => $name, addr => $addr, port => $_, target => $target,
                            weight => $o{weight} // 1, priority => $o{priority} // 1 } } $p0 .. $p1;
    }
    return \@inst;
}

sub _name_wire {
    my $name = shift;
    return join('', map { chr(length $_) . $_ } grep { length } split /\./, $name) . "\0";
}

# Parses a query: (id, flags, qname (lower case, no dot), qtype, question bytes) or ().
sub _parse_query {
    my $q = shift;
    return () if length $q < 17;
    my ($id, $flags, $qd) = unpack 'n n n', $q;
    return () unless $qd >= 1;
    my $pos = 12;
    my @labels;
    while (1) {
        return () if $pos >= length $q;
        my $len = ord substr $q, $pos, 1;
        last if $len == 0;
        return () if $len > 63 || $pos + 1 + $len > length $q;
        push @labels, substr $q, $pos + 1, $len;
        $pos += 1 + $len;
    }
    $pos++;
    return () if $pos + 4 > length $q;
    my ($qtype) = unpack 'n', substr $q, $pos, 2;
    my $question = substr $q, 12, $pos + 4 - 12;
    return ($id, $flags, lc join('.', @labels), $qtype, $question);
}

my %TypeName = (1 => 'A', 28 => 'AAAA', 33 => 'SRV');

# The message for a query in a mode (modes that change bytes after building
# are applied by the caller). Returns the message bytes.
sub _answer {
    my (%a) = @_;
    my ($id, $qname, $qtype, $question, $mode, $inst) = @a{qw(id qname qtype question mode inst)};
    my $rcode = 0;
    my (@an, @ar);    # [owner (name or pointer), type, rdata builder]
    my $msg_qname = $mode eq 'wrong_question' ? 'other.service.yunlu_office.consul' : $qname;
    $question = _name_wire($msg_qname) . substr($question, -4) if $mode eq 'wrong_question';

    my @srv = grep { $_->{name} eq $qname } @$inst;
    if ($mode eq 'other_name') {
        @srv = map { { %$_, name => 'evil.service.yunlu_office.consul' } } @$inst;
    }
    if ($mode eq 'flap') {
        my $n = ($a{serial} % 1000);
        push @srv, { name => $qname, addr => '127.0.0.1', port => 40000 + $n,
                     target => '7f000001.addr.yunlu_office.consul', weight => 1, priority => 9 };
    }
    if ($mode eq 'servfail') {
        $rcode = 2;
        @srv = ();
    } elsif ($mode eq 'nxdomain') {
        $rcode = 3;
        @srv = ();
    }

    # Encoder with name compression by whole suffix (enough for these names).
    my $msg = '';
    my %offset;
    my $put_name = sub {
        my $name = shift;
        my @l = grep { length } split /\./, $name;
        my $out = '';
        for my $i (0 .. $#l) {
            my $suffix = lc join '.', @l[$i .. $#l];
            if (defined $offset{$suffix}) {
                return $out . pack('n', 0xC000 | $offset{$suffix});
            }
            $offset{$suffix} = length($msg) + length($out) if length($msg) + length($out) < 0x3FFF;
            $out .= chr(length $l[$i]) . $l[$i];
        }
        return $out . "\0";
    };

    my $flags = 0x8000 | 0x0400 | ($rcode & 0xF);    # QR, AA
    $msg = pack('n n n n n n', $mode eq 'wrong_id' ? ($id ^ 0x5a5a) : $id, $flags, 1, 0, 0, 0);
    # question (the query's bytes, or the wrong one); remember its name for pointers
    $offset{$msg_qname} = 12 if length $msg_qname;
    $msg .= $question;

    my ($ancount, $arcount) = (0, 0);
    my $rr = sub {
        my ($owner, $type, $rdata_sub) = @_;
        my $o = $put_name->($owner);
        $msg .= $o . pack('n n N', $type, 1, 0);
        my $len_at = length $msg;
        $msg .= "\0\0";
        my $rdata_at = length $msg;
        $rdata_sub->();
        substr($msg, $len_at, 2) = pack 'n', length($msg) - $rdata_at;
    };

    my $first_target_at;
    if ($qtype == 33 && @srv) {
        my $copies = ($mode eq 'many' || $mode eq 'count_10k') ? 1_000_000 : 1;
        COPY: for my $c (1 .. $copies) {
            for my $s (@srv) {
                last COPY if $copies > 1 && length($msg) > 65535 - 200;
                $rr->($s->{name}, 33, sub {
                    $msg .= pack 'n n n', $s->{priority}, $s->{weight}, $s->{port};
                    $first_target_at //= length $msg;
                    $msg .= $put_name->($s->{target});
                });
                $ancount++;
            }
        }
        my %done;
        for my $s (@srv) {
            next if $done{ $s->{target} }++;
            $rr->($s->{target}, 1, sub { $msg .= pack 'C4', split /\./, $s->{addr} });
            $arcount++;
        }
    } elsif ($qtype == 1) {
        my ($s) = grep { $_->{target} eq $qname } @$inst;
        if ($s) {
            $rr->($s->{target}, 1, sub { $msg .= pack 'C4', split /\./, $s->{addr} });
            $ancount++;
        }
    }
    if (!$ancount && !$rcode && $qtype == 33 && !grep { $_->{name} eq $qname } @$inst) {
        $rcode = 3;
    }
    substr($msg, 2, 2) = pack 'n', $flags & ~0xF | $rcode;
    if ($mode eq 'count_10k') {
        $ancount = 10_000;
    } elsif ($mode eq 'lying_counts') {
        $ancount += 20;
        $arcount += 5;
    }
    substr($msg, 6, 6) = pack 'n n n', $ancount, 0, $arcount;
    if ($mode eq 'ptr_loop' && defined $first_target_at) {
        # The first target becomes a pointer to itself (rest of the rdata shifts:
        # rewrite the rdata length too).
        my $rdlen_at = $first_target_at - 8;
        my $old_len = unpack 'n', substr($msg, $rdlen_at, 2);
        my $old_name_len = $old_len - 6;
        substr($msg, $first_target_at, $old_name_len) = pack('n', 0xC000 | $first_target_at);
        substr($msg, $rdlen_at, 2) = pack 'n', 8;
    }
    return $msg;
}

sub _serve {
    my ($udp, $tcp, $dir, $parent) = @_;
    $SIG{TERM} = sub { POSIX::_exit(0) };
    $SIG{PIPE} = 'IGNORE';
    $udp->blocking(0);
    $tcp->blocking(0);
    my $sel = IO::Select->new($udp, $tcp);
    my %conn;        # fileno => { sock, in, out => [[time, bytes]...], close_after }
    my @udp_later;   # [time, peer, bytes]
    my $serial = 0;
    open my $log, '>>', "$dir/queries.log" or die "$dir/queries.log: $!";
    $log->autoflush(1);
    open my $clog, '>>', "$dir/connections.log" or die "$dir/connections.log: $!";
    $clog->autoflush(1);
    my $close = sub {
        my ($fd, $why) = @_;
        my $c = delete $conn{$fd} or return;
        $sel->remove($c->{sock});
        close $c->{sock};
        printf $clog "%.3f close %s\n", time, $why;
    };

    my $respond = sub {
        my ($transport, $q) = @_;
        my ($id, $flags, $qname, $qtype, $question) = _parse_query($q) or return;
        my $mode = _read_file("$dir/mode");
        $mode =~ s/\s+//g;
        $mode ||= 'ok';
        my $arg;
        ($mode, $arg) = split /:/, $mode, 2;
        $serial++;
        printf $log "%.3f %s %s %s %s\n", time, $transport, $qname || '.',
            $TypeName{$qtype} // $qtype, $mode;
        my $inst = _instances(_read_file("$dir/instances"));
        return { mode => $mode, arg => $arg, id => $id } if $mode eq 'never';
        my $msg;
        if ($mode eq 'consul') {
            my $cq = consul_query($q) or return;
            my $cfg = consul_config(_read_file("$dir/consul"));
            $msg = consul_answer($cq, $transport, $cfg, consul_data(_read_file("$dir/instances")));
            return { mode => $mode, msg => $msg, cfg => $cfg };
        }
        if ($mode eq 'random') {
            $msg = join '', map { chr int rand 256 } 1 .. 1 + int rand 600;
        } else {
            $msg = _answer(id => $id, qname => $qname, qtype => $qtype, question => $question,
                           mode => $mode, inst => $inst, serial => $serial);
        }
        return { mode => $mode, arg => $arg, msg => $msg };
    };

    while (1) {
        POSIX::_exit(0) if getppid() != $parent;
        my $now = time;
        my $wait = 0.05;
        for my $fd (keys %conn) {
            my $c = $conn{$fd};
            $wait = 0.005 if @{ $c->{out} };
            # miekg/dns closes a connection idle for its idle timeout.
            $close->($fd, 'idle') if $c->{idle} && !@{ $c->{out} } && $now - $c->{last} > $c->{idle};
        }
        $wait = 0.005 if @udp_later;
        for my $s ($sel->can_read($wait)) {
            if ($s == $udp) {
                my $peer = recv($udp, my $q, 65535, 0);
                next unless defined $peer;
                my $r = $respond->('udp', $q) or next;
                next unless defined $r->{msg};
                my $m = $r->{msg};
                my $mode = $r->{mode};
                if ($mode eq 'close_mid' || $mode eq 'long_prefix') {
                    $m = substr $m, 0, int(length($m) / 2);
                } elsif (length $m > 512 && $mode ne 'random' && $mode ne 'consul') {
                    # truncated: header and question only, TC set
                    my ($qd_end) = 12 + length((_parse_query($q))[4]);
                    $m = substr($m, 0, $qd_end);
                    substr($m, 2, 2) = pack 'n', unpack('n', substr $m, 2, 2) | 0x0200;
                    substr($m, 6, 6) = pack 'n n n', 0, 0, 0;
                }
                if ($mode eq 'slow') {
                    push @udp_later, [time + 5, $peer, $m];
                } else {
                    send($udp, $m, 0, $peer);
                }
            } elsif ($s == $tcp) {
                my $c = $tcp->accept or next;
                $c->blocking(0);
                $sel->add($c);
                $conn{ fileno $c } = { sock => $c, in => '', out => [], queries => 0, last => time };
                printf $clog "%.3f accept\n", time;
            } else {
                my $c = $conn{ fileno $s } or next;
                my $n = sysread $s, my $buf, 65536;
                if (!$n) {
                    $close->(fileno $s, 'by client');
                    next;
                }
                $c->{in} .= $buf;
                while (length $c->{in} >= 2 && !$c->{close_after}) {
                    my $len = unpack 'n', $c->{in};
                    last if length $c->{in} < 2 + $len;
                    my $q = substr $c->{in}, 2, $len;
                    substr($c->{in}, 0, 2 + $len) = '';
                    my $r = $respond->('tcp', $q) or next;
                    next unless defined $r->{msg};
                    my ($m, $mode) = ($r->{msg}, $r->{mode});
                    $c->{last} = time;
                    if (my $cfg = $r->{cfg}) {
                        # miekg/dns: at most tcp_max_queries answers, then close.
                        $c->{idle} = $cfg->{tcp_idle};
                        $c->{close_after} = 1
                            if $cfg->{tcp_max_queries} && ++$c->{queries} >= $cfg->{tcp_max_queries};
                    }
                    my $t = time;
                    if ($mode eq 'slow') {
                        my $step = $r->{arg} || 0.2;
                        my $bytes = pack('n', length $m) . $m;
                        my $i = 0;
                        push @{ $c->{out} }, map { [$t + $step * $i++, $_] } split //, $bytes;
                    } elsif ($mode eq 'long_prefix') {
                        push @{ $c->{out} }, [$t, pack('n', length($m) + 100) . $m];
                    } elsif ($mode eq 'close_mid') {
                        push @{ $c->{out} }, [$t, pack('n', length $m) . substr($m, 0, int(length($m) / 2))];
                        $c->{close_after} = 1;
                    } else {
                        push @{ $c->{out} }, [$t, pack('n', length $m) . $m];
                    }
                }
            }
        }
        # scheduled TCP bytes and late UDP answers
        $now = time;
        for my $fd (keys %conn) {
            my $c = $conn{$fd};
            while (@{ $c->{out} } && $c->{out}[0][0] <= $now) {
                my $chunk = shift(@{ $c->{out} })->[1];
                my $off = 0;
                my $give_up = time + 3;    # a client that does not read is dropped
                while ($off < length $chunk) {
                    my $w = syswrite $c->{sock}, $chunk, length($chunk) - $off, $off;
                    if (!defined $w) {
                        last unless $!{EAGAIN} && time < $give_up;
                        IO::Select->new($c->{sock})->can_write(0.1);
                        next;
                    }
                    $off += $w;
                }
                if ($off < length $chunk) {
                    @{ $c->{out} } = ();
                    $c->{close_after} = 1;
                }
            }
            $close->($fd, 'by server') if $c->{close_after} && !@{ $c->{out} };
        }
        while (@udp_later && $udp_later[0][0] <= $now) {
            my $l = shift @udp_later;
            send($udp, $l->[2], 0, $l->[1]);
        }
    }
}

1;
