# Answers shaped as a real Consul agent gives them (the hostile DNS server's
# "consul" mode, Test::Nginx::Consul::ConsulDns), where BIND's differ (issue 16):
#
#   TEST 1  a hostname instance, agent without recursors: its follow-up is
#           REFUSED; that instance is left out (one warning, said again only
#           when it changes), the others serve from the start
#   TEST 2  a hostname instance, agent with recursors: the CNAME chain in
#           ADDITIONAL gives its address, no follow-up query
#   TEST 3  a follow-up that fails for a while (SERVFAIL): the answer fails
#           and the set is kept, as before
#   TEST 4  over TCP, Consul trims 1,100 instances to what fits in 64 KiB,
#           with TC under enable_truncate: what came is published, with a warning
#   TEST 5  the same without enable_truncate (no TC): published, with a warning
#   TEST 6  udp: Consul trims by the EDNS size without TC; the module asks an
#           answer that fills it again over TCP and gets every instance
#   TEST 7  cluster peering: <hex>.addr.consul. targets decoded, no follow-up
#           (through a forwarder that drops ADDITIONAL)
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::HostileDns;
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';
$ENV{TEST_NGINX_HOSTILE_PORT} = hostile_port();

# The peers a line published last ("N peers from QUERY").
sub last_peers {
    my @n = error_log_text() =~ /: (\d+) peers? from \Q$NAME\E/g;
    return $n[-1] // 0;
}

run_tests();

__DATA__

=== TEST 1: hostname target, agent without recursors: that instance is left out, the others serve from the start
--- backends: 6380
--- setup
hostile_start(mode => 'consul', instances => "instance $NAME 127.0.0.1:6380\n"
                                            . "instance $NAME Redis-Ext.Example.com:6381\n");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT interval=300ms;
}
--- check
ok(wait_for_log(qr/1 peer from redis\.service\.yunlu_office\.consul/, 5), 'the other instance is published');
is_tally(tally(10), {6380 => 10}, 'and serves');
ok(hostile_queries(type => 'A', name => 'redis-ext.example.com') >= 1, 'the hostname was looked up');
my $warning = qr/\[warn\] .*consul upstream "redis": ignored records of the answer: 1 with targets that have no address \(redis-ext\.example\.com:6381: 127\.0\.0\.1:\d+ answered REFUSED\)/;
ok(wait_for_log($warning, 3), 'one warning names the instance and why');
sleep 1.5;
is(log_count($warning), 1, 'said once, not every interval');
is(log_count(qr/resolving redis\.service\.yunlu_office\.consul failed/), 0, 'the answer did not fail');
# It leaves, then comes back: the change is said again.
hostile_instances("instance $NAME 127.0.0.1:6380\n");
sleep 1;
hostile_instances("instance $NAME 127.0.0.1:6380\ninstance $NAME Redis-Ext.Example.com:6381\n");
ok(wait_for_log($warning, 3, 2), 'said again when it came back');
--- no_error_log
[error]



=== TEST 2: hostname target, agent with recursors: the CNAME chain in ADDITIONAL gives the address, no follow-up
--- backends: 6380 6381
--- setup
hostile_start(mode => 'consul', consul => { recursors => 1 },
              instances => "instance $NAME 127.0.0.1:6380\n"
                         . "instance $NAME Redis-Ext.Example.com:6381\n"
                         . "recurse redis-ext.example.com CNAME edge.example.net\n"
                         . "recurse edge.example.net A 127.0.0.1\n");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT interval=300ms;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both instances serve');
sleep 1;
is(hostile_queries(type => 'A') + hostile_queries(type => 'AAAA'), 0, 'no A or AAAA query to the agent');
--- no_error_log
[warn]
[error]



=== TEST 3: a follow-up that fails for a while (SERVFAIL) fails the answer: the set is kept
--- backends: 6380 6381
--- setup
hostile_start(mode => 'consul', consul => { recursors => 1 },
              instances => "instance $NAME 127.0.0.1:6380\n"
                         . "instance $NAME flaky.example.com:6381\n"
                         . "recurse flaky.example.com A 127.0.0.1\n");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT interval=300ms;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both instances serve');
# The agent's recursors fail: no address in ADDITIONAL, the follow-up SERVFAIL.
hostile_instances("instance $NAME 127.0.0.1:6380\n"
                . "instance $NAME flaky.example.com:6381\n"
                . "recurse flaky.example.com SERVFAIL\n");
ok(wait_for_log(qr/resolving redis\.service\.yunlu_office\.consul failed: resolving 1 of 1 targets failed \(flaky\.example\.com: 127\.0\.0\.1:\d+ answered SERVFAIL\), keeping 2 peers/, 4),
   'the answer fails, the set is kept');
my $t = tally(20);
ok(!$t->{fail} && $t->{6380} && $t->{6381}, 'both instances still serve: ' . tally_str($t));
hostile_instances("instance $NAME 127.0.0.1:6380\n"
                . "instance $NAME flaky.example.com:6381\n"
                . "recurse flaky.example.com A 127.0.0.1\n");
ok(wait_for_log(qr/resolver recovered after \d+ failed attempts/, 4), 'recovery logged');
--- no_error_log
[error]



=== TEST 4: TC on a TCP answer (enable_truncate): the trimmed answer is published, with a warning
--- setup
hostile_start(mode => 'consul', consul => { enable_truncate => 1 },
              instances => "instance $NAME 127.1.0.1:6390 count=1100\n");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT interval=500ms;
}
--- check
ok(wait_for_log(qr/\d+ peers from redis\.service\.yunlu_office\.consul/, 10), 'a set is published');
my $n = last_peers();
ok($n > 800 && $n < 1100, "what came: $n of 1100 peers");
my $warning = qr/\[warn\] .*consul upstream "redis": Consul truncated the answer for redis\.service\.yunlu_office\.consul \(TC set\): $n peers came, others are left out; to see every instance, use an api= line or several consul_upstream lines \(by tag\)/;
ok(wait_for_log($warning, 2), 'a warning says so and what to do');
sleep 1.5;
is(log_count($warning), 1, 'once, not every interval');
hostile_instances("instance $NAME 127.1.0.1:6390 count=40\n");
ok(wait_for_log(qr/\[notice\] .*the answer for redis\.service\.yunlu_office\.consul carries every instance again/, 4),
   'the end is noticed');
ok(wait_for_log(qr/40 peers from redis\.service\.yunlu_office\.consul/, 4), '40 peers');
--- no_error_log
[error]



=== TEST 5: the same answer without TC (enable_truncate off, Consul's default): published, with a warning
--- setup
hostile_start(mode => 'consul', instances => "instance $NAME 127.1.0.1:6390 count=1100\n");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT interval=500ms;
}
--- check
ok(wait_for_log(qr/\d+ peers from redis\.service\.yunlu_office\.consul/, 10), 'a set is published');
my $n = last_peers();
ok($n > 800 && $n < 1100, "what came: $n of 1100 peers");
my $warning = qr/\[warn\] .*the answer for redis\.service\.yunlu_office\.consul is as large as Consul sends \($n peers came\): it may leave instances out without saying so \(TC is set only with enable_truncate\); to see every instance/;
ok(wait_for_log($warning, 2), 'a warning says it may lack instances');
sleep 1.5;
is(log_count($warning), 1, 'once');
--- no_error_log
[error]



=== TEST 6: udp: Consul trims by the EDNS size without TC; an answer that fills it is asked again over TCP
--- setup
hostile_start(mode => 'consul', instances => "instance $NAME 127.1.0.1:6390 count=40\n"
                                            . "instance small.service.yunlu_office.consul 127.0.0.1:6380\n");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT udp interval=500ms;
}
upstream small {
    consul_upstream small.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT udp interval=500ms;
}
--- check
ok(wait_for_log(qr/40 peers from redis\.service\.yunlu_office\.consul/, 5), 'all 40 instances');
ok(hostile_queries(name => $NAME, transport => 'udp') >= 1, 'asked over UDP');
ok(hostile_queries(name => $NAME, transport => 'tcp') >= 1, 'and again over TCP');
sleep 1;
ok(hostile_queries(name => 'small.service.yunlu_office.consul', transport => 'udp') >= 2, 'a small answer: UDP');
is(hostile_queries(name => 'small.service.yunlu_office.consul', transport => 'tcp'), 0, 'and UDP only');
--- no_error_log
[warn]
[error]



=== TEST 7: cluster peering: <hex>.addr.<domain>. targets (no datacenter) are decoded, no follow-up
--- backends: 6380 127.0.0.5:6390
--- setup
# A forwarder between nginx and the agent that drops ADDITIONAL (dnsmasq, BIND
# with minimal-responses): the targets must be decoded or looked up.
hostile_start(mode => 'consul', consul => { no_additional => 1 },
              instances => "instance $NAME 127.0.0.1:6380 peer=other\n"
                         . "instance $NAME 127.0.0.5:6390 peer=other\n");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT interval=300ms;
}
--- check
ok(wait_for_backends(['127.0.0.1:6380', '127.0.0.5:6390'], by => 'addr'), 'both instances serve');
sleep 1;
is(hostile_queries(type => 'A') + hostile_queries(type => 'AAAA'), 0, 'no A or AAAA query for the targets');
--- no_error_log
[warn]
[error]
