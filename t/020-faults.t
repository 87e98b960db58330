# Faults under a steady stream of connections (issue 9): for each fault the
# figure "connections tried / failed" is printed (diag), the goal is asserted
# (0 failed wherever a backend exists), and no process may die except those the
# test kills. Two workers throughout.
#
#   TEST 1  Consul (BIND) down for 60 s, and at the same time, on two more
#           upstreams (TCP and UDP), each behaviour of the hostile DNS server
#   TEST 2  one backend SIGKILLed, proxy_next_upstream on
#   TEST 3  10 reloads that remove and add a consul_upstream line
#   TEST 4  worker 0 SIGKILLed repeatedly: while it writes a 3,003-peer set that
#           changes with every answer, and while DNS does not answer
#
# About 130 s. Figures and how each fault is made: t/README.md ("Faults").
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Test::Nginx::Consul::HostileDns;
use Time::HiRes qw(time sleep);

our $NAME = 'redis.service.yunlu_office.consul';
$ENV{TEST_NGINX_HOSTILE_PORT} = hostile_port();
# Stream ports of the upstreams that ask the hostile server (TCP, UDP).
our ($PORT_TCP, $PORT_UDP) = (1986, 1987);
$ENV{TEST_NGINX_HOSTILE_TCP_PORT} = $PORT_TCP;
$ENV{TEST_NGINX_HOSTILE_UDP_PORT} = $PORT_UDP;

# Prints "fault: NAME  connections tried N / failed M" and checks the goal:
# no failure (or at most max_failed, each for a reason the caller names),
# a steady stream, and every backend in `serving` still used.
sub figures {
    my ($fault, $t, %o) = @_;
    my $failed = $t->{fail} // 0;
    $failed = 0 + ($failed =~ /^\d+$/ ? $failed : 1e9);
    my $tried = $failed;
    $tried += $t->{$_} for grep { /^\d+$/ } keys %$t;
    diag(sprintf "fault: %-62s connections tried %5d / failed %d", $fault, $tried, $failed);
    ok($tried >= ($o{min} // 20), "$fault: a steady stream ($tried connections)");
    my $max = $o{max_failed} // 0;
    ok($failed <= $max, "$fault: $failed failed" . ($max ? " (at most $max: $o{why})" : ''))
        or diag("failures (time, reason):\n" . ($Test::Nginx::Consul::LastFailure // ''));
    for my $b (@{ $o{serving} // [] }) {
        ok($t->{$b}, "$fault: backend $b still serving (" . tally_str($t) . ')');
    }
    return ($tried, $failed);
}

# "exited on signal" lines other than SIGKILLs of the given pids.
sub unexpected_deaths {
    my %killed = map { $_ => 1 } @_;
    return grep { !(/ (\d+) exited on signal 9\b/ && $killed{$1}) }
        grep { /exited on signal/ } split /\n/, error_log_text();
}

# Worker 0: the first worker at start; after a SIGKILL, the one the master
# respawns in its place. Cross-checked against the pid that logs set changes.
our ($W0, @Killed, @KillWindows);
sub worker0_init {
    my @w = sort { $a <=> $b } nginx_worker_pids();
    $W0 = $w[0];
    return $W0;
}

sub kill_worker0 {
    my $old = $W0 or return 0;
    my %before = map { $_ => 1 } nginx_worker_pids();
    my $t1 = time;
    kill 'KILL', $old or return 0;
    push @Killed, $old;
    push @KillWindows, [$t1, time + 0.5];
    return $W0 = _respawned($old, \%before);
}

# Where a zone write is in progress: functions gdb can stop worker 0 in, so that
# a SIGKILL lands inside a write (core/src/zone/records.rs: each record of the buffer
# being filled is stored by Record::store, with the zone's lock held). If the
# zone code changes, name here what runs while a write holds the zone
# (NGX_CONSUL_ZONE_WRITE_POINTS="sym1,sym2" overrides).
our @ZONE_WRITE_POINTS = split /,/, ($ENV{NGX_CONSUL_ZONE_WRITE_POINTS}
    // 'ngx_consul_core::zone::records::Record::store');

sub _sh_quote { my $s = shift; $s =~ s/'/'\\''/g; return "'$s'" }

# gdb's output for a breakpoint on each point, then COMMANDS (stdout and stderr).
sub gdb_run {
    my ($target, $points, @commands) = @_;
    my $cmd = join ' ', 'timeout 60 gdb -q -nx -batch', $target,
        map { ('-ex', _sh_quote($_)) } 'set breakpoint pending off',
            # `break` finds a function by its debug info (debug builds); release
            # builds have none, and only `rbreak` matches their symbols (which carry
            # a hash suffix). Whichever fails just says so.
            (map { ("break $_", "rbreak ^$_") } @$points), @commands;
    return scalar `$cmd 2>&1`;
}

# The points gdb finds in the module.
sub zone_write_points {
    return grep { gdb_run($ModulePath, [$_]) =~ /^Breakpoint \d+ at /m } @ZONE_WRITE_POINTS;
}

# Kill windows: a connection worker 0 was proxying when it was killed fails
# (reset), as it would with any proxy; failures outside these windows count.

sub failures_outside_kills {
    my $t = shift;
    my @none;
    return @none unless $t->{fail};
    my @outside = grep {
        my ($at) = /^([\d.]+) /;
        !defined $at || !grep { $at >= $_->[0] && $at <= $_->[1] } @KillWindows
    } split /\n/, $Test::Nginx::Consul::LastFailure // '';
    return @outside;
}

sub _respawned {
    my ($old, $before) = @_;
    my $new;
    wait_until(sub {
        my @w = nginx_worker_pids();
        return 0 unless @w == 2 && !grep { $_ == $old } @w;
        ($new) = grep { !$before->{$_} } @w;
        return $new;
    }, 5);
    return $new;
}

# SIGKILLs worker 0 while gdb holds it stopped at a zone write point, after
# running the shell command $then (worker 0 still stopped). Returns (1, gdb's
# output) when the kill landed inside a write.
sub kill_worker0_mid_write {
    my ($then, @points) = @_;
    my $old = $W0 or return (0, 'no worker 0');
    my %before = map { $_ => 1 } nginx_worker_pids();
    my $t1 = time;
    my $out = gdb_run("-p $old", \@points, 'continue', 'bt 3',
                      (defined $then ? "shell $then" : ()), 'kill');
    push @Killed, $old;
    push @KillWindows, [$t1, time + 0.5];
    $W0 = _respawned($old, \%before);
    return (($out =~ /^Breakpoint \d+, /m ? 1 : 0), $out);
}

# The pid of the last process that published a set of upstream U.
sub publisher_pid {
    my $u = shift;
    my $pid;
    for (split /\n/, error_log_text()) {
        $pid = $1 if /\[notice\] (\d+)#\d+: .*consul upstream "\Q$u\E": \d+ peers? from /;
    }
    return $pid;
}

run_tests();

__DATA__

=== TEST 1: Consul down 60 s while the hostile DNS server misbehaves in every way on two more upstreams
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- setup
hostile_start(instances => "instance $NAME 127.0.0.1:6380\ninstance $NAME 127.0.0.1:6381\n");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
upstream hostile_tcp {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT
                    interval=200ms timeout=500ms;
}
upstream hostile_udp {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT
                    udp interval=200ms timeout=500ms;
}
server {
    listen 127.0.0.1:$TEST_NGINX_HOSTILE_TCP_PORT;
    proxy_pass hostile_tcp;
}
server {
    listen 127.0.0.1:$TEST_NGINX_HOSTILE_UDP_PORT;
    proxy_pass hostile_udp;
}
--- check
ok(wait_for_backends([6380, 6381]), 'redis: both discovered (BIND)');
ok(wait_for_backends([6380, 6381], port => $PORT_TCP), 'hostile_tcp: both discovered');
ok(wait_for_backends([6380, 6381], port => $PORT_UDP), 'hostile_udp: both discovered');

# The outage: BIND stopped for 60 s, connections all along.
dns_stop();
my $t0 = time;
my $outage = tally_background(delay => 0.02);

for my $mode (qw(slow never random wrong_id long_prefix lying_counts ptr_loop
                 wrong_question other_name many count_10k close_mid)) {
    my %q0 = map { $_ => hostile_queries(mode => $mode, transport => $_) } qw(tcp udp);
    hostile_mode($mode);
    my $tcp = tally_background(delay => 0.02, port => $PORT_TCP);
    my $udp = tally_background(delay => 0.02, port => $PORT_UDP);
    my $t1 = time;
    my $hit = wait_until(sub {
        hostile_queries(mode => $mode, transport => 'tcp') >= $q0{tcp} + 2
            && hostile_queries(mode => $mode, transport => 'udp') >= $q0{udp} + 2
    }, 12);
    sleep 3 - (time - $t1) if time - $t1 < 3;
    hostile_mode('ok');
    my %n = map { $_ => hostile_queries(mode => $mode, transport => $_) - $q0{$_} } qw(tcp udp);
    ok($hit, "hostile DNS $mode: the module asked it (tcp $n{tcp}, udp $n{udp} queries)");
    figures("hostile DNS $mode (tcp)", $tcp->(), serving => [6380, 6381]);
    figures("hostile DNS $mode (udp)", $udp->(), serving => [6380, 6381]);
    # Discovery goes on: the next queries get correct answers again.
    my %ok0 = map { $_ => hostile_queries(mode => 'ok', transport => $_) } qw(tcp udp);
    ok(wait_until(sub {
        hostile_queries(mode => 'ok', transport => 'tcp') > $ok0{tcp}
            && hostile_queries(mode => 'ok', transport => 'udp') > $ok0{udp}
    }, 15), "hostile DNS $mode: queries go on afterwards");
}

# Answers are still read after all that: a change is followed.
hostile_instances("instance $NAME 127.0.0.1:6381\n");
ok(wait_for_backends([6381], port => $PORT_TCP, only => 1, timeout => 15),
   'hostile_tcp: the next change is followed (6381 only)');
ok(wait_for_backends([6381], port => $PORT_UDP, only => 1, timeout => 15),
   'hostile_udp: the next change is followed (6381 only)');

sleep 60 - (time - $t0) if time - $t0 < 60;
my $secs = int(time - $t0 + 0.5);
figures("Consul (BIND) down ${secs} s", $outage->(), serving => [6380, 6381], min => 500);
dns_restart();
consul_deregister($NAME, '127.0.0.1:6381');
ok(wait_for_backends([6380], only => 1, timeout => 15), 'after the outage, changes are followed');
is(scalar(unexpected_deaths()), 0, 'no process died') or diag(join "\n", unexpected_deaths());



=== TEST 2: one backend SIGKILLed with proxy_next_upstream on: the others take over
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
instance redis.service.yunlu_office.consul 127.0.0.1:6382
--- backends: 6380 6381 6382
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- stream_server_config
    proxy_pass redis;
    proxy_next_upstream on;
    proxy_connect_timeout 1s;
--- check
ok(wait_for_backends([6380, 6381, 6382]), 'three discovered');
my ($victim) = `ss -Hltnp 'sport = :6381'` =~ /pid=(\d+)/;
ok($victim, "redis on 6381 is pid " . ($victim // '?'));
my $bg = tally_background(delay => 0.01);
sleep 2;
my $killed_at = time;
kill 'KILL', $victim;
sleep 6;
my $t = $bg->();
# A connection that the killed redis had already accepted cannot be retried by
# any proxy (its bytes were sent): at most one, at the moment of the kill.
my @late = grep { /^([\d.]+) / && ($1 < $killed_at - 0.05 || $1 > $killed_at + 0.5) }
    split /\n/, ($t->{fail} ? $Test::Nginx::Consul::LastFailure // '' : '');
figures('backend 127.0.0.1:6381 SIGKILLed, proxy_next_upstream on', $t,
        serving => [6380, 6382], max_failed => 1,
        why => 'one connection in flight on the killed backend');
is(scalar(@late), 0, 'no connection failed except at the moment of the kill') or diag(join "\n", @late);
my $after = tally(20);
ok(!$after->{fail} && !$after->{6381}, 'afterwards: no failure, the dead backend is not used: '
   . tally_str($after));
ok(backend_start('6381'), 'redis on 6381 started again');
is(scalar(unexpected_deaths()), 0, 'no process died') or diag(join "\n", unexpected_deaths());
--- error_log
connect() failed (111: Connection refused) while connecting to upstream



=== TEST 3: 10 reloads that remove and add a consul_upstream line: the set follows the lines
--- workers: 2
--- dns
instance ra.service.yunlu_office.consul 127.0.0.1:6380
instance rb.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream ra.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    consul_upstream rb.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both lines discovered');
my $path = "$Test::Nginx::Util::HtmlDir/$Test::Nginx::Consul::StreamConfName";
my $full = do { local (@ARGV, $/) = ($path); <> };
(my $without = $full) =~ s/^.*rb\.service.*\n//m;
isnt($without, $full, 'a stream.conf without the rb line');
my $bg = tally_background(delay => 0.01);
my @wrong;
for my $i (1 .. 10) {
    my $with = $i % 2 == 0;
    open my $fh, '>', $path or die "$path: $!";
    print $fh $with ? $full : $without;
    close $fh;
    ok(nginx_reload(), "reload $i");
    my $want = $with ? '6380 6381' : '6380';
    my $last;
    my $ok = wait_until(sub {
        $last = tally(10);
        return !$last->{fail} && join(' ', sort grep { /^\d+$/ } keys %$last) eq $want;
    }, 3);
    ok($ok, "reload $i, rb line " . ($with ? 'added' : 'removed') . ": within 3 s only $want serve"
       . ($ok ? '' : ' (last 10 connections: ' . tally_str($last) . ')'));
}
figures('10 reloads removing/adding a consul_upstream line', $bg->(), serving => [6380]);
is(scalar(unexpected_deaths()), 0, 'no process died') or diag(join "\n", unexpected_deaths());



=== TEST 4: worker 0 SIGKILLed repeatedly: while it writes a 3,003-peer set, and while DNS does not answer
--- workers: 2
--- allow_alert
--- backends: 6380 6381
--- setup
# Priority 1: the two backends; priority 2: 3,000 peers never used while those
# live, but written to the zone with every answer ("flap" changes one more
# record each time, so every answer is a new set).
hostile_start(mode => 'flap', instances => "instance $NAME 127.0.0.1:6380\n"
    . "instance $NAME 127.0.0.1:6381\ninstance $NAME 127.0.0.1:20000-22999 priority=2\n");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT
                    interval=100ms timeout=500ms zone=512k;
}
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
worker0_init();
ok(wait_until(sub { (publisher_pid('redis') // 0) == $W0 }, 5),
   "worker 0 ($W0) is the process that publishes");
ok(wait_for_log(qr/3003 peers from/, 5), 'it writes sets of 3,003 peers');

# At random moments, while every answer (10 a second) is a new 3,003-peer set.
my $bg = tally_background(delay => 0.01);
my $kills = 0;
for (1 .. 15) {
    sleep 0.3 + rand(0.5);
    kill_worker0() and $kills++;
}
my $g0 = log_count(qr/3003 peers from/);
ok(wait_until(sub { log_count(qr/3003 peers from/) > $g0 + 3 }, 5), 'the new worker 0 writes again');
ok(wait_until(sub { (publisher_pid('redis') // 0) == $W0 }, 5), "... and it is the respawned worker 0 ($W0)");
my $t = $bg->();
figures("worker 0 SIGKILLed $kills times while writing 3,003-peer sets", $t,
        serving => [6380, 6381], max_failed => $kills,
        why => 'a connection in flight on each killed worker');
is(scalar(failures_outside_kills($t)), 0, '... and none but at the kills')
    or diag(join "\n", failures_outside_kills($t));

# Inside a zone write (gdb holds worker 0 there), with DNS silent from that
# moment on: the new worker 0 has only what the zone holds.
my @points = zone_write_points();
ok(@points, 'a zone write point in the module: ' . join(', ', @points))
    or diag("none of @ZONE_WRITE_POINTS in $ModulePath: set NGX_CONSUL_ZONE_WRITE_POINTS");
my $never = 'echo never > ' . hostile_dir() . '/mode';
$bg = tally_background(delay => 0.01);
my $hits = 0;
for my $i (1 .. 3) {
    last unless @points;
    hostile_mode('flap');
    my $g = log_count(qr/3003 peers from/);
    ok(wait_until(sub { log_count(qr/3003 peers from/) > $g + 1 }, 15), "kill $i: worker 0 writes sets");
    my ($hit, $out) = kill_worker0_mid_write($never, @points);
    ok($hit, "kill $i: SIGKILL while stopped inside a zone write") or diag($out);
    $hits += $hit;
    sleep 3;
}
$t = $bg->();
figures("worker 0 SIGKILLed inside a zone write, then DNS silent ($hits times)", $t,
        serving => [6380, 6381], max_failed => $hits,
        why => 'a connection in flight on each killed worker');
is(scalar(failures_outside_kills($t)), 0, '... and none but at the kills')
    or diag(join "\n", failures_outside_kills($t));

# DNS stops answering (after a few good answers): the set in the zone is all there is.
hostile_mode('flap');
my $g1 = log_count(qr/3003 peers from/);
ok(wait_until(sub { log_count(qr/3003 peers from/) > $g1 + 2 }, 15), 'worker 0 writes sets again');
hostile_mode('never');
sleep 1;
$bg = tally_background(delay => 0.01);
$kills = 0;
for (1 .. 5) {
    sleep 0.5 + rand(0.5);
    kill_worker0() and $kills++;
}
sleep 1;
$t = $bg->();
figures("worker 0 SIGKILLed $kills times with DNS not answering", $t, serving => [6380, 6381],
        max_failed => $kills, why => 'a connection in flight on each killed worker');
is(scalar(failures_outside_kills($t)), 0, '... and none but at the kills')
    or diag(join "\n", failures_outside_kills($t));

# DNS answers again: a change is followed.
hostile_instances("instance $NAME 127.0.0.1:6381\n");
hostile_mode('ok');
ok(wait_for_backends([6381], only => 1, timeout => 15), 'afterwards, a change is followed');
is(scalar(unexpected_deaths(@Killed)), 0, 'no process died but the ' . scalar(@Killed) . ' killed')
    or diag(join "\n", unexpected_deaths(@Killed));
is(log_count(qr/exited on signal 9/), scalar(@Killed), 'one "exited on signal 9" per kill');
is(log_count('panicked'), 0, 'no panic');
is(log_count('[crit]'), 0, 'no [crit]');
