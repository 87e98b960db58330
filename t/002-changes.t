# Live changes in Consul (nsupdate against BIND): deregistered instances stop
# getting new connections within interval + 1 s, new ones start getting them.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';

# Seconds until every connection of a round goes only to @want.
sub time_until_only {
    my ($want, $timeout) = @_;
    my $t0 = time;
    my $ok = wait_until(sub {
        my $t = tally(4);
        my %w = map { $_ => 1 } @$want;
        return !grep { !$w{$_} } keys %$t;
    }, $timeout, 0.05);
    return $ok ? time - $t0 : undef;
}

run_tests();

__DATA__

=== TEST 1: deregistration stops new connections within interval + 1 s
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
consul_deregister($NAME, '127.0.0.1:6381');
my $dt = time_until_only([6380], 5);
ok(defined $dt && $dt <= 2.0, "6381 gone after " . ($dt // 'never') . " s (<= 2 s)");
is_tally(tally(10), {6380 => 10}, 'then only 6380');
ok(wait_for_log(qr/consul upstream "redis": 1 peers? from redis\.service\.yunlu_office\.consul \(generation \d+\)/, 3),
   'the change is logged');
--- no_error_log
[error]
[warn]



=== TEST 2: a new registration starts getting traffic within interval + 1 s
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380]), '6380 discovered');
consul_register($NAME, '127.0.0.1:6381');
my $t0 = time;
ok(wait_for_backends([6381], timeout => 5), 'new instance gets traffic');
my $dt = time - $t0;
ok($dt <= 2.0, sprintf('after %.2f s (<= 2 s)', $dt));
is_tally(tally(20), {6380 => 10, 6381 => 10}, 'then shared equally');
--- error_log eval
qr/consul upstream "redis": 2 peers from redis\.service\.yunlu_office\.consul \(generation \d+\)/
--- no_error_log
[error]
[warn]



=== TEST 3: a weight change (re-registration) is applied
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
my $gen0 = log_count(qr/consul upstream "redis": \d+ peers? from/);
nsupdate("update delete $NAME. SRV 1 1 6380 7f000001.addr.yunlu_office.consul.",
         "update add $NAME. 0 IN SRV 1 3 6380 7f000001.addr.yunlu_office.consul.");
ok(wait_for_log(qr/consul upstream "redis": \d+ peers? from/, 4, $gen0 + 1), 'new set logged');
is_tally(tally(40), {6380 => 30, 6381 => 10}, '30:10 after the change');
--- no_error_log
[error]



=== TEST 4: the set is logged when it changes, only then, with growing generations
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381 6382
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
my $re = qr/consul upstream "redis": (\d+) peers? from redis\.service\.yunlu_office\.consul \(generation (\d+)\)/;
ok(wait_for_log($re), 'first set');
my $q0 = dns_queries(qr/redis\.service\.yunlu_office\.consul IN SRV/);
sleep 2.5;
is(log_count($re), 1, 'no new line while nothing changes');
ok(dns_queries(qr/redis\.service\.yunlu_office\.consul IN SRV/) - $q0 >= 2, 'though queries go on');
consul_register($NAME, '127.0.0.1:6381');
ok(wait_for_log($re, 4, 2), 'second set');
consul_register($NAME, '127.0.0.1:6382');
ok(wait_for_log($re, 4, 3), 'third set');
my @sets = error_log_text() =~ /$re/g;
my @n = @sets[grep { $_ % 2 == 0 } 0 .. $#sets];
my @g = @sets[grep { $_ % 2 == 1 } 0 .. $#sets];
is("@n", '1 2 3', 'peer counts 1, 2, 3');
ok($g[0] < $g[1] && $g[1] < $g[2], "generations grow: @g");
ok(wait_for_backends([6380, 6381, 6382]), 'all three used');
--- no_error_log
[error]
[warn]



=== TEST 5: instance moves to another port (same address)
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380]), '6380 discovered');
nsupdate("update delete $NAME. SRV",
         "update add $NAME. 0 IN SRV 1 1 6381 7f000001.addr.yunlu_office.consul.");
my $dt = time_until_only([6381], 5);
ok(defined $dt && $dt <= 2.0, "moved to 6381 after " . ($dt // 'never') . " s");
is_tally(tally(6), {6381 => 6}, 'only 6381');
--- no_error_log
[error]
[warn]



=== TEST 6: interval=3s: changes wait for the next query
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=3s;
}
--- check
ok(wait_for_backends([6380]), '6380 discovered');
my $q0 = dns_queries(qr/redis\.service\.yunlu_office\.consul IN SRV/);
sleep 4.2;
my $q = dns_queries(qr/redis\.service\.yunlu_office\.consul IN SRV/) - $q0;
ok($q >= 1 && $q <= 2, "$q queries in 4.2 s with interval=3s");
consul_register($NAME, '127.0.0.1:6381');
my $t0 = time;
ok(wait_for_backends([6381], timeout => 6), 'new instance used');
ok(time - $t0 <= 4.0, sprintf('within interval + 1 s (%.2f s)', time - $t0));
--- no_error_log
[error]
[warn]
