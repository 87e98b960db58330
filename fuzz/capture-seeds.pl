#!/usr/bin/env perl
# Captures real BIND 9 answers (wire bytes, TCP length prefix removed) as seeds
# for the dns_message fuzz target, with the test harness's BIND standing in for
# Consul. Run from the repository root after `cargo build`:
#   perl fuzz/capture-seeds.pl        (writes fuzz/seeds/dns_message/bind-*.bin)
use strict;
use warnings;
use lib 't/lib';
use Test::Nginx::Consul;
use IO::Socket::INET;

my $Q = 'redis.service.yunlu_office.consul';
my $out = 'fuzz/seeds/dns_message';

sub query {
    my ($name, $type, $udp) = @_;
    my $q = pack('n n n n n n', 0x4242, 0x0000, 1, 0, 0, 0);
    $q .= join('', map { chr(length $_) . $_ } split /\./, $name) . "\0";
    $q .= pack('n n', $type, 1);
    if ($udp) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $DnsPort,
                                      Proto => 'udp') or die "udp: $!";
        send($s, $q, 0);
        my $buf;
        recv($s, $buf, 65535, 0);
        return $buf;
    }
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $DnsPort,
                                  Proto => 'tcp') or die "tcp: $!";
    print $s pack('n', length $q) . $q;
    my $len = '';
    read($s, $len, 2) == 2 or die "short read";
    my $n = unpack 'n', $len;
    my $buf = '';
    read($s, $buf, $n) == $n or die "short read";
    return $buf;
}

sub save {
    my ($file, $bytes) = @_;
    open my $fh, '>:raw', "$out/$file" or die "$out/$file: $!";
    print $fh $bytes;
    close $fh;
    printf "%-40s %6d bytes\n", $file, length $bytes;
}

dns_start(records => <<"_Z_");
instance $Q 127.0.0.1:6380 weight=3
instance $Q 127.0.0.1:6381 weight=1
_Z_
save('bind-two-instances.bin', query($Q, 33));
save('bind-nxdomain.bin', query("nope.service.yunlu_office.consul", 33));
save('bind-a-follow-up.bin', query('7f000001.addr.yunlu_office.consul', 1));

dns_start(records => <<"_Z_");
instance $Q 127.0.0.1:6380 node=web1 priority=1
instance $Q 127.0.0.2:6380 node=web2 priority=2 weight=0
instance $Q [::1]:6381 weight=2
alias.service.yunlu_office.consul. 0 IN CNAME $Q.
_Z_
save('bind-nodes-priorities-v6.bin', query($Q, 33));
save('bind-cname.bin', query('alias.service.yunlu_office.consul', 33));

dns_start(records => "instance $Q 127.0.0.2-41:6390\n");
save('bind-40-instances-tcp.bin', query($Q, 33));
save('bind-40-instances-udp-tc.bin', query($Q, 33, 1));

dns_start(records => "instance $Q 127.0.0.1:6380\n", options => 'minimal-responses yes;');
save('bind-minimal-responses.bin', query($Q, 33));
dns_stop();
