package Test::Nginx::Consul::ConsulDns;

# Answers shaped exactly as Consul's DNS server gives them (agent/dns.go up to
# 1.18, agent/dns/ from 1.19, both on miekg/dns), for the hostile DNS server's
# "consul" mode (Test::Nginx::Consul::HostileDns runs the sockets; this file
# builds the messages). What BIND cannot be made to do: hostname targets with
# and without recursors, node-meta TXT records, peering targets, Consul's
# trimming over UDP (3 records, or by EDNS size, no TC) and TCP (1,024 SRV
# records, then 65,523 bytes), TC only with enable_truncate.
#
# Instances (the hostile server's instances file, read on every query):
#   instance NAME ADDR:PORT[-PORT2] [count=N] [weight=W] [priority=P]
#            [node=NODE] [target=node] [peer=PEER] [dc=DC] [meta=k=v,k2=v2]
#   recurse NAME CNAME|A|AAAA DATA     what the agent's recursors answer for NAME
#   recurse NAME SERVFAIL              the recursors fail for NAME
# ADDR is an IPv4 address or a host name (the service registered with a host
# name address). Targets: <hex>.addr.<dc>.consul. (an IP service address);
# <node>.node.<dc>.consul. with target=node (only the node address is set);
# <hex>.addr.consul. with peer= (an instance of a cluster peer); the host name
# itself for a host name address, with what the recursors return for its A
# query (CNAME chain and A records) in ADDITIONAL, or nothing without recursors.
# weight=0 is sent as 0 (Weights.Warning = 0 on a warning instance). count=N:
# N instances at consecutive IPv4 addresses from ADDR (node names from them).
#
# Configuration (key=value lines, hostile_consul() writes them):
#   enable_truncate=0   dns_config.enable_truncate: TC on trimmed answers (UDP and TCP)
#   node_meta_txt=1     dns_config.enable_additional_node_meta_txt (on by default)
#   recursors=0         the agent has recursors: RA set, hostname targets get
#                       ADDITIONAL, queries outside the domain are answered from
#                       the recurse lines (else REFUSED)
#   version=1.19       1.19 and later (agent/dns/): owner names lower case, the
#                       OPT record added after trimming; 1.18 (agent/dns.go):
#                       owner names as asked, the OPT record added before
#                       trimming (and lost with the ADDITIONAL records it drops)
#   udp_answer_limit=3  dns_config.udp_answer_limit (UDP without EDNS)
#   tcp_max_queries=128 queries miekg/dns answers on one TCP connection before closing it
#   tcp_idle=8          seconds a TCP connection may stay idle before miekg/dns closes it
#   no_additional=0     1: no ADDITIONAL records, as a forwarder between the
#                       client and the agent sends them (dnsmasq, BIND with
#                       minimal-responses): targets must be decoded or looked up

use strict;
use warnings;

use Exporter 'import';
our @EXPORT_OK = qw(consul_config consul_data consul_query consul_answer);

my %Default = (
    enable_truncate  => 0,
    node_meta_txt    => 1,
    recursors        => 0,
    version          => '1.19',
    udp_answer_limit => 3,
    tcp_max_queries  => 128,
    tcp_idle         => 8,
    no_additional    => 0,
);

sub consul_config {
    my $text = shift // '';
    my %c = %Default;
    for my $l (split /\n/, $text) {
        $c{$1} = $2 if $l =~ /^\s*(\w+)\s*=\s*(\S*)\s*$/;
    }
    return \%c;
}

sub _hex4 { join '', map { sprintf '%02x', $_ } split /\./, shift }

# Instances and recursor data from the instances file's text.
sub consul_data {
    my $text = shift // '';
    my (@inst, %recurse);
    for my $line (split /\n/, $text) {
        if ($line =~ /^\s*recurse\s+(\S+)\s+(CNAME|A|AAAA|SERVFAIL)\s*(\S*)\s*$/i) {
            my $n = lc $1;
            $n =~ s/\.$//;
            push @{ $recurse{$n} }, [uc $2, $3];
            next;
        }
        next unless $line =~ /^\s*instance\s+(\S+)\s+([\w.-]+):(\d+)(?:-(\d+))?((?:\s+\w+=\S+)*)\s*$/;
        my ($name, $first, $p0, $p1, $rest) = (lc $1, $2, $3, $4 // $3, $5);
        $name =~ s/\.$//;
        my %o = map { split /=/, $_, 2 } grep { length } split /\s+/, $rest;
        my ($dc) = $name =~ /\.service\.([^.]+)\.consul$/;
        $dc = $o{dc} // $dc // 'dc1';
        my %meta = ('consul-network-segment' => '');
        %meta = map { my ($k, $v) = split /=/, $_, 2; ($k => $v // '') } split /,/, $o{meta}
            if defined $o{meta};
        my $is_ip = $first =~ /^\d+\.\d+\.\d+\.\d+$/;
        for my $k (0 .. ($o{count} // 1) - 1) {
            my $addr = $is_ip ? join('.', unpack 'C4', pack 'N', unpack('N', pack 'C4', split /\./, $first) + $k)
                              : $first;
            my $ip = $is_ip ? $addr : undef;
            (my $node = $o{node} // 'node-' . $addr) =~ s/\./-/g;
            $node .= "-$k" if defined $o{node} && $k;
            my $node_name = $o{peer} ? "$node.node.$o{peer}.peer.consul" : "$node.node.$dc.consul";
            my $target = !$ip                ? $addr
                       : $o{target} && $o{target} eq 'node' ? $node_name
                       : $o{peer}            ? _hex4($ip) . '.addr.consul'
                       :                       _hex4($ip) . ".addr.$dc.consul";
            push @inst, map {
                { name => $name, addr => $addr, ip => $ip, port => $_, target => $target,
                  node => $node, node_name => $node_name, meta => \%meta,
                  weight => $o{weight} // 1, priority => $o{priority} // 1 }
            } $p0 .. $p1;
        }
    }
    return { instances => \@inst, recurse => \%recurse };
}

# --------------------------------------------------------------------------
# Message encoding (miekg/dns: owner names compressed, case-sensitively; SRV
# targets not compressed, but later names may point into them)

sub _n { return ['name', $_[0], 1] }          # a compressible name in RDATA
sub _un { return ['name', $_[0], 0] }         # a name never compressed (SRV target)

sub _rr {
    my ($owner, $type, @rdata) = @_;
    return { owner => $owner, type => $type, class => 1, ttl => 0, rdata => \@rdata };
}

my %TypeNum = (A => 1, NS => 2, CNAME => 5, SOA => 6, TXT => 16, AAAA => 28, SRV => 33, OPT => 41);

sub _encode {
    my (%m) = @_;
    my $compress = $m{compress} // 1;
    my $msg = pack 'n n n n n n', $m{id}, $m{flags} // 0, 1, scalar @{ $m{an} },
        scalar @{ $m{ns} }, scalar @{ $m{ar} };
    my %offset;
    my $name = sub {
        my ($n, $may_compress) = @_;
        my @l = grep { length } split /\./, $n;
        my $out = '';
        for my $i (0 .. $#l) {
            my $suffix = join '.', @l[$i .. $#l];
            if ($compress && $may_compress && defined $offset{$suffix}) {
                return $out . pack('n', 0xC000 | $offset{$suffix});
            }
            my $at = length($msg) + length($out);
            $offset{$suffix} //= $at if $at < 0x3FFF;
            $out .= chr(length $l[$i]) . $l[$i];
        }
        return $out . "\0";
    };
    $msg .= $name->($m{qname}, 1) . pack('n n', $m{qtype}, 1);
    for my $rr (@{ $m{an} }, @{ $m{ns} }, @{ $m{ar} }) {
        $msg .= $name->($rr->{owner}, 1) . pack('n n N', $rr->{type}, $rr->{class}, $rr->{ttl});
        my $len_at = length $msg;
        $msg .= "\0\0";
        for my $part (@{ $rr->{rdata} }) {
            $msg .= ref $part ? $name->($part->[1], $part->[2]) : $part;
        }
        substr($msg, $len_at, 2) = pack 'n', length($msg) - $len_at - 2;
    }
    return $msg;
}

sub _soa {
    return _rr('consul', $TypeNum{SOA}, _n('ns.consul'), _n('hostmaster.consul'),
               pack('N N N N N', time % 4294967296, 3600, 600, 86400, 0));
}

sub _txt {
    my ($owner, $meta) = @_;
    return map {
        my $t = /^rfc1035-/i ? $meta->{$_} : "$_=$meta->{$_}";
        _rr($owner, $TypeNum{TXT}, join '', map { chr(length $_) . $_ } unpack '(a255)*', $t)
    } sort keys %$meta;
}

sub _addr_rr {
    my ($owner, $ip) = @_;
    return _rr($owner, $TypeNum{A}, pack 'C4', split /\./, $ip);
}

# What the recursors answer for NAME's TYPE query: the CNAME chain and the
# records of TYPE at its end (resolveCNAME asks for A).
sub _recurse_chain {
    my ($recurse, $name, $type) = @_;
    my @out;
    my %seen;
    $name =~ s/\.$//;
    while (!$seen{ lc $name }++) {
        my $recs = $recurse->{ lc $name } or last;
        my ($cname) = grep { $_->[0] eq 'CNAME' } @$recs;
        if ($cname) {
            push @out, _rr($name, $TypeNum{CNAME}, _n($cname->[1]));
            $out[-1]{cname} = $cname->[1];
            ($name = $cname->[1]) =~ s/\.$//;
            next;
        }
        for my $r (grep { $_->[0] eq $type } @$recs) {
            push @out, $type eq 'A'
                ? _addr_rr($name, $r->[1])
                : _rr($name, $TypeNum{AAAA}, _aaaa($r->[1]));
        }
        last;
    }
    return @out;
}

sub _aaaa {
    my $ip = shift;
    my ($l, $r) = split /::/, $ip, 2;
    my @l = grep { length } split /:/, $l // '';
    my @r = grep { length } split /:/, $r // '';
    my @all = (@l, ('0') x (8 - @l - @r), @r);
    return pack 'n8', map { hex } @all;
}

# --------------------------------------------------------------------------
# Trimming (Consul's trimUDPResponse / trimTCPResponse / syncExtra)

# The ADDITIONAL records an answer keeps once trimmed: per SRV target the first
# record of its name (and a CNAME chain's next names); TXT and OPT records go.
sub _sync_extra {
    my ($an, $extra) = @_;
    my %index;
    for my $rr (@$extra) {
        $index{ lc $rr->{owner} } //= $rr;
    }
    my (%done, @out);
    for my $srv (@$an) {
        next unless defined $srv->{target};
        (my $t = lc $srv->{target}) =~ s/\.$//;
        while (!$done{$t}++) {
            my $rr = $index{$t} or last;
            push @out, $rr;
            last unless $rr->{type} == $TypeNum{CNAME};
            ($t = lc $rr->{cname}) =~ s/\.$//;
        }
    }
    return \@out;
}

# The size of $m with its first $n answers and the ADDITIONAL they keep.
sub _length {
    my ($m, $n, $compress, $has_extra) = @_;
    my @an = @{ $m->{an} }[0 .. $n - 1];
    my $ar = $has_extra ? _sync_extra(\@an, $m->{ar}) : $m->{ar};
    return length _encode(%$m, an => \@an, ar => $ar, compress => $compress);
}

# dnsBinaryTruncate: the largest count of answers whose message fits in $max.
sub _binary_truncate {
    my ($m, $max, $compress, $has_extra) = @_;
    my ($start, $end) = (0, scalar(@{ $m->{an} }) + 1);
    while ($end - $start > 1) {
        my $median = $start + int(($end - $start) / 2);
        my $len = _length($m, $median, $compress, $has_extra);
        if ($len <= $max) {
            return $median if $max - $len < 10;
            $start = $median;
        } else {
            $end = $median;
        }
    }
    return $start;
}

# Trims $m (an, ns, ar) in place as Consul does (trimTCPResponse,
# trimUDPResponse); returns whether it counts as trimmed (TC with enable_truncate).
sub _trim {
    my ($m, $transport, $edns, $cfg) = @_;
    my $count = @{ $m->{an} };
    my $has_extra = @{ $m->{ar} } > 0;
    my $compress = 1;
    my ($max, $limit);
    if ($transport eq 'tcp') {
        # More SRV records than fit in 64 KiB are cut first, without TC.
        my $cut = $m->{qtype} == $TypeNum{SRV} ? 1024 : 4096;
        splice @{ $m->{an} }, $cut if @{ $m->{an} } > $cut;
        $max = $limit = 65523;
    } else {
        $max = 512;
        $max = $edns if defined $edns && $edns > $max;
        $max = 65535 - 68 if $max > 65535 - 68;
        my $answers = $cfg->{udp_answer_limit} < 8 ? $cfg->{udp_answer_limit} : 8;
        if ($max == 512 && $count > $answers) {
            $compress = 0;    # a 512-byte answer is sized uncompressed
            splice @{ $m->{an} }, $answers;
            $m->{ar} = _sync_extra($m->{an}, $m->{ar}) if $has_extra;
        }
        $limit = $max - 8;    # the UDP header
    }
    my $trimmed = 0;
    while (@{ $m->{an} } > 1) {
        my $len = length _encode(%$m, compress => $compress);
        last if $len <= $limit;
        $trimmed = 1;
        $m->{ns} = [];
        my $keep = $len - $max > 100 ? _binary_truncate($m, $max, $compress, $has_extra)
                                     : @{ $m->{an} } - 1;
        splice @{ $m->{an} }, $keep;
        $m->{ar} = _sync_extra($m->{an}, $m->{ar}) if $has_extra;
    }
    return $transport eq 'tcp' ? $trimmed : @{ $m->{an} } < $count;
}

# --------------------------------------------------------------------------
# Answers

# The answer to one query. $q: { id, rd, qname (as asked), qtype, edns (UDP
# size or undef) }; $transport: 'udp' or 'tcp'. Returns the message bytes.
sub consul_answer {
    my ($q, $transport, $cfg, $data) = @_;
    my $lname = lc $q->{qname};
    $lname =~ s/\.$//;
    my $v119 = $cfg->{version} ne '1.18';
    my $owner = $v119 ? $lname : $q->{qname};
    my %m = (id => $q->{id}, qname => $q->{qname}, qtype => $q->{qtype}, an => [], ns => [], ar => []);
    my $rcode = 0;
    my $opt = defined $q->{edns} ? _rr('', $TypeNum{OPT}) : undef;
    $opt->{class} = $q->{edns} if $opt;

    if ($lname ne 'consul' && $lname !~ /\.consul$/) {
        # Outside the domain: the recursors', or REFUSED (no handler for ".").
        return _encode(%m, flags => 0x8000 | ($q->{rd} << 8) | 5) unless $cfg->{recursors};
        my $type = $q->{qtype} == $TypeNum{AAAA} ? 'AAAA' : 'A';
        $m{an} = [_recurse_chain($data->{recurse}, $q->{qname}, $type)];
        $rcode = 3 unless $data->{recurse}{$lname};
        # Every recursor failed: handleRecurse answers SERVFAIL.
        ($rcode, $m{an}) = (2, []) if grep { $_->[0] eq 'SERVFAIL' } @{ $data->{recurse}{$lname} // [] };
        push @{ $m{ar} }, $opt if $opt;
        return _encode(%m, flags => 0x8000 | ($q->{rd} << 8) | 0x80 | $rcode);
    }

    my @inst = grep { $_->{name} eq $lname } @{ $data->{instances} };
    if ($q->{qtype} == $TypeNum{SRV} && @inst) {
        my %handled;
        for my $i (_shuffle(@inst)) {
            next if $handled{"$i->{node}:$i->{addr}:$i->{port}"}++;
            my $srv = _rr($owner, $TypeNum{SRV}, pack('n n n', $i->{priority}, $i->{weight}, $i->{port}),
                          _un($i->{target}));
            $srv->{target} = $i->{target};
            push @{ $m{an} }, $srv;
            if ($i->{ip}) {
                push @{ $m{ar} }, _addr_rr($i->{target}, $i->{ip});
            } elsif ($cfg->{recursors}) {
                my @more = _recurse_chain($data->{recurse}, $i->{addr}, 'A');
                splice @more, 5 if !$opt && @more > 5;    # maxRecurseRecords without EDNS
                push @{ $m{ar} }, @more;
            }
            push @{ $m{ar} }, _txt($i->{node_name}, $i->{meta}) if $cfg->{node_meta_txt};
        }
    } elsif (my ($hex) = $lname =~ /^([0-9a-f]+)\.addr\.(?:[^.]+\.)?consul$/) {
        if (length $hex == 8 && $q->{qtype} == $TypeNum{A}) {
            push @{ $m{an} }, _addr_rr($owner, join '.', map { hex } unpack '(a2)4', $hex);
        } elsif (length $hex != 8 && length $hex != 32) {
            $rcode = 3;
        }
    } elsif ($lname =~ /^([^.]+)\.node\.[^.]+\.(?:peer\.)?consul$/) {
        my ($i) = grep { lc $_->{node_name} eq $lname && $_->{ip} } @{ $data->{instances} };
        if (!$i) {
            $rcode = 3;
        } else {
            push @{ $m{an} }, _addr_rr($owner, $i->{ip}) if $q->{qtype} == $TypeNum{A};
            push @{ $m{ar} }, _txt($owner, $i->{meta}) if $cfg->{node_meta_txt};
        }
    } elsif (@inst && $q->{qtype} == $TypeNum{A}) {
        push @{ $m{an} }, map { _addr_rr($owner, $_->{ip}) } grep { $_->{ip} } @inst;
    } elsif (!@inst) {
        $rcode = 3;    # no such service, no instance healthy, unreachable datacenter
    }
    push @{ $m{ns} }, _soa() if $rcode == 3 || !@{ $m{an} };
    push @{ $m{ar} }, $opt if $opt && !$v119;
    my $trimmed = _trim(\%m, $transport, $q->{edns}, $cfg);
    push @{ $m{ar} }, $opt if $opt && $v119;
    $m{ar} = [grep { $_->{type} == $TypeNum{OPT} } @{ $m{ar} }] if $cfg->{no_additional};
    my $flags = 0x8000 | 0x0400 | ($q->{rd} << 8) | ($cfg->{recursors} ? 0x80 : 0) | $rcode;
    $flags |= 0x0200 if $trimmed && $cfg->{enable_truncate};
    return _encode(%m, flags => $flags);
}

# A query's fields: { id, rd, qname (as sent, no root dot), qtype, edns (the
# OPT record's UDP size, or undef) }, or undef when it cannot be parsed.
sub consul_query {
    my $q = shift;
    return undef if length $q < 17;
    my ($id, $flags, $qd, $an, $ns, $ar) = unpack 'n6', $q;
    return undef unless $qd == 1;
    my ($pos, @labels) = (12);
    while (1) {
        return undef if $pos >= length $q;
        my $len = ord substr $q, $pos, 1;
        last if $len == 0;
        return undef if $len > 63 || $pos + 1 + $len > length $q;
        push @labels, substr $q, $pos + 1, $len;
        $pos += 1 + $len;
    }
    return undef if $pos + 5 > length $q;
    my ($qtype) = unpack 'n', substr $q, $pos + 1, 2;
    $pos += 5;
    my $edns;
    # The OPT record of a query is the root name (one zero byte), type 41.
    if ($an == 0 && $ns == 0 && $ar >= 1 && $pos + 11 <= length $q
        && substr($q, $pos, 1) eq "\0" && unpack('n', substr $q, $pos + 1, 2) == 41) {
        $edns = unpack 'n', substr $q, $pos + 3, 2;
    }
    return { id => $id, rd => ($flags >> 8) & 1, qname => join('.', @labels),
             qtype => $qtype, edns => $edns };
}

sub _shuffle {
    my @a = @_;
    for (my $i = @a; --$i;) {
        my $j = int rand($i + 1);
        @a[$i, $j] = @a[$j, $i];
    }
    return @a;
}

1;
