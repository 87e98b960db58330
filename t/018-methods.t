# nginx's balancing methods over discovered peers, spelled as nginx users spell
# them (least_conn, hash KEY [consistent], random [two [least_conn]]), with the
# state all workers share: open connections and passive health live in the zone.
# Two workers with reuseport: connections land on both.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';

# Tiers: 6380 at priority 1, 6381 at priority 2.
our $TIERS = "instance $NAME 127.0.0.1:6380 priority=1\ninstance $NAME 127.0.0.1:6381 priority=2\n";

# One block per method: its upstream, and the same priority-tier check.
sub tier_block {
    my ($method) = @_;
    return <<"_EOB_";
upstream redis {
    $method
    consul_upstream $NAME resolver=127.0.0.1:\$TEST_NGINX_DNS_PORT interval=1s fail_timeout=2s;
}
_EOB_
}

our $TIER_CHECK = <<'_EOC_';
ok(wait_for_log(qr/2 peers from/, 5), 'two tiers discovered');
is_tally(tally(12, local_addr => '127.0.0.7'), {6380 => 12}, 'priority 1 only');
backend_stop(6380);
is_tally(tally(12, local_addr => '127.0.0.7'), {6381 => 12}, 'priority 1 down: priority 2 serves');
backend_start(6380);
sleep 2.2;
ok(wait_for_backends([6380], only => 1, timeout => 6), 'back to priority 1');
_EOC_

run_tests();

__DATA__

=== TEST 1: least_conn: a newcomer takes the next connections until counts even out, in both workers
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    least_conn;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
my $a = hold_connections(6);
is(scalar(grep { $_->[1] == 6380 } @$a), 6, 'six connections held on 6380');
consul_register($::NAME, '127.0.0.1:6381');
ok(wait_for_log(qr/2 peers from/, 4), 'a second instance');
my $mark = log_mark();
my $b = hold_connections(6);
is(scalar(grep { $_->[1] == 6381 } @$b), 6, 'the next six all go to the newcomer')
    or diag join ' ', map { $_->[1] } @$b;
my $per_worker = worker_tally($mark);
is(scalar(keys %$per_worker), 2, 'accepted by both workers') or diag Test::More::explain($per_worker);
my $c = hold_connections(4);
my %n;
$n{ $_->[1] }++ for @$c;
is_deeply(\%n, {6380 => 2, 6381 => 2}, 'counts even: they take turns') or diag Test::More::explain(\%n);
close_held($_) for $a, $b, $c;
--- no_error_log
[error]



=== TEST 2: hash $remote_addr consistent: every key on one peer in every worker; a removal moves only its keys
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.2-11:6390
--- backends: 127.0.0.2-11:6390
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    hash $remote_addr consistent;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_log(qr/10 peers from/, 5), 'ten instances');
my @clients = map { "127.0.1.$_" } 1 .. 100;
my (%owner, $split);
for my $c (@clients) {
    # Four connections per client: different source ports, so both workers see it.
    my $t = tally(4, local_addr => $c, by => 'addr');
    $split++ if keys %$t != 1;
    ($owner{$c}) = keys %$t;
}
ok(!$split, 'each client stays on one peer, whichever worker accepts it');
my %used = map { $_ => 1 } values %owner;
ok(keys %used >= 8, scalar(keys %used) . ' of 10 peers have clients');
my ($victim) = grep { $_ ne $owner{$clients[0]} } sort keys %used;
consul_deregister($::NAME, $victim);
ok(wait_for_log(qr/9 peers from/, 4), 'one of ten deregistered');
my ($moved, $stayed) = (0, 0);
for my $c (grep { $owner{$_} ne $victim } @clients) {
    my ($now) = keys %{ tally(2, local_addr => $c, by => 'addr') };
    $now eq $owner{$c} ? $stayed++ : $moved++;
}
ok($moved <= 0.05 * ($moved + $stayed), "keys that were not on it stay: $moved of " . ($moved + $stayed) . ' moved');
my @lost = grep { $owner{$_} eq $victim } @clients;
my $t = {};
$t = tally(1, local_addr => $_, by => 'addr') for @lost;
ok(!exists $t->{$victim}, 'the removed peer gets nothing');
--- no_error_log
[error]



=== TEST 3: hash $remote_addr (not consistent): stable per client, spread over peers
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.2-5:6390
--- backends: 127.0.0.2-5:6390
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    hash $remote_addr;
}
--- check
ok(wait_for_log(qr/4 peers from/, 5), 'four instances');
my (%owner, $split);
for my $c (map { "127.0.2.$_" } 1 .. 40) {
    my $t = tally(3, local_addr => $c, by => 'addr');
    $split++ if keys %$t != 1;
    ($owner{$c}) = keys %$t;
}
ok(!$split, 'each client stays on one peer');
my %used = map { $_ => 1 } values %owner;
is(scalar(keys %used), 4, 'all four peers have clients');
--- no_error_log
[error]



=== TEST 4: random two least_conn: a sane spread, never a removed peer
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.2-5:6390
--- backends: 127.0.0.2-5:6390
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    random two least_conn;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_log(qr/4 peers from/, 5), 'four instances');
my $t = tally(200, by => 'addr');
ok(!$t->{fail}, 'no failure: ' . tally_str($t));
ok(!grep({ ($t->{"127.0.0.$_:6390"} // 0) < 20 } 2 .. 5), 'each of four gets a fair part: ' . tally_str($t));
consul_deregister($::NAME, '127.0.0.3:6390');
ok(wait_for_log(qr/3 peers from/, 4), 'one deregistered');
$t = tally(100, by => 'addr');
ok(!$t->{'127.0.0.3:6390'} && !$t->{fail}, 'never the removed one: ' . tally_str($t));
--- no_error_log
[error]



=== TEST 5: passive health is shared: a dead instance is tried max_fails times in all, then one probe
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:20001
--- backends: 6380
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    max_fails=2 fail_timeout=3s;
}
--- check
ok(wait_for_log(qr/2 peers from/, 5), 'discovered');
my $mark = log_mark();
is_tally(tally(40), {6380 => 40}, 'every connection ends at 6380');
my $dead = () = error_log_since($mark) =~ /connect\(\) failed .* upstream: "127\.0\.0\.1:20001"/g;
is($dead, 2, 'the dead instance was tried max_fails=2 times in all (per worker it would be 4)');
sleep 3.5;
$mark = log_mark();
is_tally(tally(40), {6380 => 40}, 'after fail_timeout, every connection still ends at 6380');
$dead = () = error_log_since($mark) =~ /connect\(\) failed .* upstream: "127\.0\.0\.1:20001"/g;
is($dead, 1, 'one probe, from whichever worker');
--- error_log
connect() failed (111: Connection refused)



=== TEST 6: slow_start: a newcomer's share ramps up over slow_start
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s slow_start=6s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
consul_register($::NAME, '127.0.0.1:6381');
ok(wait_for_log(qr/2 peers from/, 4), 'a newcomer');
my $t0 = time;
my $early = tally(60);
sleep 6.5 - (time - $t0);
my $late = tally(60);
my ($e, $l) = ($early->{6381} // 0, $late->{6381} // 0);
ok($e < 20, "in its first second the newcomer gets a small part: $e of 60");
ok($l >= 24, "after slow_start its full share (about 30): $l of 60");
ok(!$early->{fail} && !$late->{fail}, 'no failure');
--- no_error_log
[error]



=== TEST 7: least_conn under a priority tier change
--- workers: 2
--- stream_listen_options: reuseport
--- dns eval
$::TIERS
--- backends: 6380 6381
--- stream_config eval
main::tier_block('least_conn;')
--- check eval
$::TIER_CHECK
--- error_log
connect() failed (111: Connection refused)



=== TEST 8: hash consistent under a priority tier change
--- workers: 2
--- stream_listen_options: reuseport
--- dns eval
$::TIERS
--- backends: 6380 6381
--- stream_config eval
main::tier_block('hash $remote_addr consistent;')
--- check eval
$::TIER_CHECK
--- error_log
connect() failed (111: Connection refused)



=== TEST 9: hash under a priority tier change
--- workers: 2
--- stream_listen_options: reuseport
--- dns eval
$::TIERS
--- backends: 6380 6381
--- stream_config eval
main::tier_block('hash $remote_addr;')
--- check eval
$::TIER_CHECK
--- error_log
connect() failed (111: Connection refused)



=== TEST 10: random two least_conn under a priority tier change
--- workers: 2
--- stream_listen_options: reuseport
--- dns eval
$::TIERS
--- backends: 6380 6381
--- stream_config eval
main::tier_block('random two least_conn;')
--- check eval
$::TIER_CHECK
--- error_log
connect() failed (111: Connection refused)



=== TEST 11: random under a priority tier change
--- workers: 2
--- stream_listen_options: reuseport
--- dns eval
$::TIERS
--- backends: 6380 6381
--- stream_config eval
main::tier_block('random;')
--- check eval
$::TIER_CHECK
--- error_log
connect() failed (111: Connection refused)
