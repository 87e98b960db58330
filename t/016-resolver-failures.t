# The ways a Consul agent fails while a set exists: it times out (after
# `timeout=`), answers SERVFAIL or REFUSED, or is not there. The set is kept,
# each streak is logged once, naming the failure, and its end is noticed.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';
our $RECORDS = "instance $NAME 127.0.0.1:6380\ninstance $NAME 127.0.0.1:6381\n";

run_tests();

__DATA__

=== TEST 1: timeout= is how long a silent resolver is waited for
--- workers: 2
--- dns eval
$::RECORDS
--- backends: 6380 6381
--- setup
# A resolver that accepts TCP connections and never answers.
$main::HOLE = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 64,
                                    Proto => 'tcp', ReuseAddr => 1) or die "hole: $!";
$ENV{TEST_NGINX_HOLE_PORT} = $main::HOLE->sockport;
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s timeout=4s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
# The agent hangs from now on (a reload keeps the set and asks at once; the
# master asks nothing, its zone holds the set).
stream_config_set(<<'_EOC_');
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOLE_PORT
                    interval=1s timeout=4s;
}
_EOC_
ok(nginx_reload(), 'reloaded');
my $t0 = time;
sleep 2;
is(log_count(qr/resolving redis\.service\.yunlu_office\.consul failed/), 0, 'not given up after 2 s (timeout=4s)');
ok(wait_for_log(qr/resolving redis\.service\.yunlu_office\.consul failed: 127\.0\.0\.1:\d+ timed out, keeping 2 peers$/m, 5),
   'given up after 4 s, saying so');
my $took = time - $t0;
ok($took >= 3.5, sprintf('%.1f s after the reload', $took));
close $main::HOLE;



=== TEST 2: SERVFAIL while a set exists: kept, one warning naming it, recovery
--- dns eval
$::RECORDS
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
# A zone BIND cannot load: it answers SERVFAIL for every name in it.
dns_start(records => "$NAME. 0 IN CNAME elsewhere.consul.\n$NAME. 0 IN TXT \"clash\"\n", zone_may_fail => 1);
like(`dig \@127.0.0.1 -p $DnsPort +tcp SRV $NAME.`, qr/status: SERVFAIL/, 'BIND answers SERVFAIL');
ok(wait_for_log(qr/\[warn\] .*resolving redis\.service\.yunlu_office\.consul failed: 127\.0\.0\.1:\d+ answered SERVFAIL, keeping 2 peers$/m, 4),
   'warned, naming SERVFAIL');
my $t = tally(20);
ok(!$t->{fail} && $t->{6380} && $t->{6381}, 'the set serves: ' . tally_str($t));
sleep 2;
is(log_count(qr/resolving redis\.service\.yunlu_office\.consul failed/), 1, 'once');
dns_start(records => $::RECORDS);
ok(wait_for_log(qr/\[notice\] .*resolver recovered after \d+ failed attempts/, 12), 'recovery noticed');



=== TEST 3: REFUSED while a set exists: kept, one warning naming it
--- dns eval
$::RECORDS
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
dns_start(records => $::RECORDS, options => 'allow-query { none; };', zone_may_fail => 1);
like(`dig \@127.0.0.1 -p $DnsPort +tcp SRV $NAME.`, qr/status: REFUSED/, 'BIND refuses every query');
ok(wait_for_log(qr/\[warn\] .*resolving redis\.service\.yunlu_office\.consul failed: 127\.0\.0\.1:\d+ answered REFUSED, keeping 2 peers$/m, 4),
   'warned, naming REFUSED');
my $t = tally(20);
ok(!$t->{fail} && $t->{6380} && $t->{6381}, 'the set serves: ' . tally_str($t));
sleep 2;
is(log_count(qr/resolving redis\.service\.yunlu_office\.consul failed/), 1, 'once');
--- no_error_log
[error]



=== TEST 4: resolvers are asked in the order given: a refusing first one, then the next
--- dns eval
$::RECORDS
--- backends: 6380 6381
--- setup
$ENV{TEST_NGINX_DEAD_PORT} = dead_port();
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul
                    resolver=127.0.0.1:$TEST_NGINX_DEAD_PORT resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s timeout=1s;
}
--- check
ok(wait_for_backends([6380, 6381], timeout => 5), 'found through the second');
dns_stop();
ok(wait_for_log(qr/resolving redis\.service\.yunlu_office\.consul failed: cannot connect to 127\.0\.0\.1:\d+, cannot connect to 127\.0\.0\.1:\d+, keeping 2 peers$/m, 4),
   'both failures named, in order');
--- no_error_log
[error]
