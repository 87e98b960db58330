# The test harness itself (BIND, nsupdate, redis backends, connection
# counting), with static upstreams and no module: when these fail, the
# other files' results mean nothing.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';

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
