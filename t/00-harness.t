# The test harness itself (BIND, nsupdate, redis backends, connection
# counting), with static upstreams and no module: when these fail, the
# other files' results mean nothing.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::HostileDns;
use IO::Socket::INET ();
use Time::HiRes qw(time);

# Queries over one TCP connection to the hostile server: how many answers come
# before it closes the connection (all queries are sent at once).
sub tcp_answers {
    my ($n, $name) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => hostile_port(), Proto => 'tcp')
        or die "connect: $!";
    my $qname = join('', map { chr(length $_) . $_ } split /\./, $name) . "\0";
    print $s join '', map { my $q = pack('n n n n n n', $_, 0x0100, 1, 0, 0, 0) . $qname . pack('n n', 33, 1);
                            pack('n', length $q) . $q } 1 .. $n;
    my ($buf, $answers) = ('', 0);
    while (sysread $s, $buf, 65536, length $buf) {
        while (length $buf >= 2 && length $buf >= 2 + unpack 'n', $buf) {
            substr($buf, 0, 2 + unpack 'n', $buf) = '';
            $answers++;
        }
    }
    return $answers;
}

sub hdig { my $args = shift; return scalar `dig \@127.0.0.1 -p ${\ hostile_port()} $args` }

run_tests();

__DATA__

=== TEST 1: static upstream, stream request through the proxy
--- no_module
--- backends: 6380
--- stream_config
upstream redis { server 127.0.0.1:6380; }
--- stream_response
+PONG
+OK

=== TEST 2: connection counting over two static backends (round robin, weights)
--- no_module
--- backends: 6380 6381
--- stream_config
upstream redis {
    server 127.0.0.1:6380 weight=3;
    server 127.0.0.1:6381;
}
--- check
is_tally(tally(40), {6380 => 30, 6381 => 10}, 'weights 3:1');

=== TEST 3: BIND answers Consul-shaped SRV records; nsupdate changes them
--- no_module
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 weight=3
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- check
my @rr = sort { $a->[2] <=> $b->[2] } dig_srv('redis.service.yunlu_office.consul');
is(scalar @rr, 2, 'two SRV records');
is("@{$rr[0]}", '1 3 6380 7f000001.addr.yunlu_office.consul.', 'first SRV');
my $full = `dig \@127.0.0.1 -p $DnsPort +tcp SRV redis.service.yunlu_office.consul.`;
like($full, qr/ADDITIONAL SECTION:\n7f000001\.addr\.yunlu_office\.consul\.\s+0\s+IN\s+A\s+127\.0\.0\.1/,
     'target address in ADDITIONAL');
like($full, qr/flags: qr aa/, 'authoritative');
consul_register('redis.service.yunlu_office.consul', '127.0.0.1:6382', weight => 2);
is(scalar(dig_srv('redis.service.yunlu_office.consul')), 3, 'registered a third');
consul_deregister('redis.service.yunlu_office.consul', '127.0.0.1:6380');
is(join(',', sort map { $_->[2] } dig_srv('redis.service.yunlu_office.consul')), '6381,6382',
   'deregistered 6380');
consul_deregister_all('redis.service.yunlu_office.consul');
like(`dig \@127.0.0.1 -p $DnsPort +tcp SRV redis.service.yunlu_office.consul.`,
     qr/status: NXDOMAIN/, 'NXDOMAIN once all are gone');
ok(dns_queries(qr/redis\.service\.yunlu_office\.consul IN SRV/) >= 5, 'query log counts');
like(`dig \@127.0.0.1 -p $DnsPort +tcp SRV redis.service.consul.notserved.`,
     qr/status: REFUSED/, 'names outside the zone are REFUSED');

=== TEST 4: DNS stop and restart keeps nsupdate changes (journal)
--- no_module
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- check
consul_register('redis.service.yunlu_office.consul', '127.0.0.1:6381');
dns_stop();
ok(!dns_running(), 'stopped');
is(scalar(dig_srv('redis.service.yunlu_office.consul')), 0, 'no answer while stopped');
dns_restart();
is(scalar(dig_srv('redis.service.yunlu_office.consul')), 2, 'both after restart');

=== TEST 5: minimal-responses yes and node targets
--- no_module
--- dns_config
minimal-responses yes;
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380 node=db1
--- check
my $full = `dig \@127.0.0.1 -p $DnsPort +tcp SRV redis.service.yunlu_office.consul.`;
like($full, qr/SRV\s+1 1 6380 db1\.node\.yunlu_office\.consul\./, 'node target');
unlike($full, qr/ADDITIONAL SECTION/, 'no ADDITIONAL');
like(`dig \@127.0.0.1 -p $DnsPort +tcp +short A db1.node.yunlu_office.consul.`, qr/^127\.0\.0\.1$/m,
     'A record of the node');

=== TEST 6: 40 instances: truncated over UDP, whole over TCP; 40 addresses served
--- no_module
--- dns
instance redis.service.yunlu_office.consul 127.0.0.2-41:6390
--- backends: 127.0.0.2-41:6390
--- stream_config eval
"upstream redis {\n" . CORE::join('', map { "    server 127.0.0.$_:6390;\n" } 2 .. 41) . "}\n"
--- check
like(`dig \@127.0.0.1 -p $DnsPort +notcp +ignore SRV redis.service.yunlu_office.consul.`,
     qr/flags: qr aa tc/, 'TC over UDP');
is(scalar(dig_srv('redis.service.yunlu_office.consul')), 40, '40 over TCP');
my $t = tally(80, by => 'addr');
is(scalar(grep { /^127\.0\.0\.\d+:6390$/ } keys %$t), 40, '40 distinct backends') or diag tally_str($t);

=== TEST 7: stopping a backend; background tally; reload with two workers
--- no_module
--- workers: 2
--- backends: 6380 6381
--- stream_config
upstream redis { server 127.0.0.1:6380; server 127.0.0.1:6381; }
--- check
is(scalar(nginx_worker_pids()), 2, 'two workers');
my $bg = tally_background();
sleep 0.3;
ok(nginx_reload(), 'reloaded');
sleep 0.3;
my $t = $bg->();
ok(!$t->{fail}, 'no failed connection during reload: ' . tally_str($t));
backend_stop(6381);
ok(!backend_running(6381), '6381 stopped');
is_tally(tally(10), {6380 => 10}, 'only 6380 (next upstream)');
backend_start(6381);
--- error_log
connect() failed (111: Connection refused) while connecting to upstream

=== TEST 8: nginx restart within a block
--- no_module
--- backends: 6380
--- stream_config
upstream redis { server 127.0.0.1:6380; }
--- check
my $pid = nginx_pid();
ok(nginx_restart(), 'restarted');
isnt(nginx_pid(), $pid, 'new pid');
is_tally(tally(3), {6380 => 3}, 'serves after restart');

=== TEST 9: config errors name stream.conf and the line
--- no_module
--- stream_config
upstream redis {
    server 127.0.0.1:6380 bogus=1;   # emerg: invalid parameter "bogus=1"
}

=== TEST 10: the hostile server's "consul" mode answers as a Consul agent does
--- no_module
--- check
my $n = 'redis.service.yunlu_office.consul';
hostile_start(mode => 'consul', instances => join '',
    "instance $n 127.0.0.1:6380 weight=3\n",
    "instance $n 127.0.0.2:6381 weight=0 node=db2 target=node\n",
    "instance $n 127.0.0.5:6382 peer=other\n",
    "instance $n Redis-Ext.Example.com:6383\n",
    "recurse redis-ext.example.com CNAME edge.example.net\n",
    "recurse edge.example.net A 127.0.0.7\n",
    "instance big.service.yunlu_office.consul 127.1.0.1:6390 count=1100\n");
my $srv = hdig("+tcp SRV REDIS.Service.yunlu_office.consul");
like($srv, qr/flags: qr aa rd;/, 'AA set, RA not (no recursors)');
like($srv, qr/^redis\.service\.yunlu_office\.consul\.\s+0\s+IN\s+SRV\s+1 3 6380 7f000001\.addr\.yunlu_office\.consul\.$/m,
     'owner name lower case, TTL 0, .addr.<dc> target');
like($srv, qr/SRV\s+1 0 6381 db2\.node\.yunlu_office\.consul\.$/m, 'weight 0, .node. target');
like($srv, qr/SRV\s+1 1 6382 7f000005\.addr\.consul\.$/m, 'peering: .addr. without datacenter');
like($srv, qr/SRV\s+1 1 6383 Redis-Ext\.Example\.com\.$/m, 'a host name address is the target');
like($srv, qr/^node-127-0-0-1\.node\.yunlu_office\.consul\.\s+0\s+IN\s+TXT\s+"consul-network-segment="$/m,
     'node-meta TXT records in ADDITIONAL');
unlike($srv, qr/edge\.example\.net/, 'no recursors: nothing in ADDITIONAL for the host name');
like(hdig("A redis-ext.example.com"), qr/status: REFUSED/, '... and its A query is REFUSED');
like(hdig("+tcp SRV nope.service.gone_dc.consul"), qr/status: NXDOMAIN.*\nconsul\.\s+0\s+IN\s+SOA/s,
     'unknown service or datacenter: NXDOMAIN with the SOA');
hostile_consul(recursors => 1, version => '1.18');
$srv = hdig("+tcp SRV REDIS.Service.yunlu_office.consul");
like($srv, qr/flags: qr aa rd ra;/, 'recursors: RA set');
like($srv, qr/^REDIS\.Service\.yunlu_office\.consul\.\s+0\s+IN\s+SRV/m, '1.18: owner names as asked');
like($srv, qr/^Redis-Ext\.Example\.com\.\s+0\s+IN\s+CNAME\s+edge\.example\.net\.\nedge\.example\.net\.\s+0\s+IN\s+A\s+127\.0\.0\.7$/m,
     'the recursors\' CNAME chain and address in ADDITIONAL');
like(hdig("A redis-ext.example.com"), qr/status: NOERROR.*IN\s+A\s+127\.0\.0\.7/s, 'a follow-up is recursed');
hostile_consul();
like(hdig("+noedns +ignore SRV big.service.yunlu_office.consul"), qr/flags: qr aa rd; QUERY: 1, ANSWER: 3,/,
     'UDP without EDNS: 3 records, no TC');
my ($records) = hdig("+bufsize=1232 +ignore SRV big.service.yunlu_office.consul") =~ /flags: qr aa rd; QUERY: 1, ANSWER: (\d+),/;
ok($records && $records > 10 && $records < 30, "UDP with EDNS 1232: trimmed by size to $records records, no TC");
my $tcp = hdig("+tcp SRV big.service.yunlu_office.consul");
($records) = $tcp =~ /flags: qr aa rd; QUERY: 1, ANSWER: (\d+),/;
ok($records && $records > 800 && $records <= 1024, "TCP: 1,100 instances trimmed to $records, no TC");
hostile_consul(enable_truncate => 1);
like(hdig("+tcp SRV big.service.yunlu_office.consul"), qr/flags: qr aa tc rd;/, 'enable_truncate: TC over TCP');
like(hdig("+bufsize=1232 +ignore SRV big.service.yunlu_office.consul"), qr/flags: qr aa tc rd;/, '... and over UDP');
hostile_consul(tcp_max_queries => 128);
is(tcp_answers(130, $n), 128, 'a TCP connection carries 128 queries, then the server closes it');
hostile_consul(tcp_idle => 1);
my $t0 = time;
is(tcp_answers(1, $n), 1, 'one answer');
ok(time - $t0 > 0.9 && time - $t0 < 5, sprintf('then the idle connection is closed (%.1f s)', time - $t0));
ok(hostile_connections() >= 2, 'connections are counted');
hostile_stop();
