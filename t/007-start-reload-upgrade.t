# Nothing lost on start, reload and live binary upgrade (issue 19): the master
# puts each line's set into the zone before it forks workers (from the state
# file, then one lookup of its own, all lines at once within 2 s), so that the
# first connection a new worker takes finds peers — as with static `server`
# lines, which every block checks beside `consul_upstream` in the same run.
#
#   TEST 1   cold start, clients waiting for the port: the first 50 connections
#   TEST 2   a reload adding an upstream (and a port): its first 50 connections
#   TEST 3   a reload renaming an upstream's query (the zone is reused)
#   TEST 4-8 live binary upgrade under load: USR2, WINCH, QUIT (nginx.org's
#            procedure) and Debian's `service nginx upgrade` (USR2, then QUIT
#            to the old master once both pid files exist); with and without
#            state=, with Consul down; the two binaries' worker 0s and the
#            state file; a roll back (HUP to the old master, QUIT to the new)
#   TEST 9-10 Consul down at start: within the bound, the state file's set
#   TEST 11  a reload that keeps every zone asks nothing in the master
#   TEST 12  nginx -t sends no DNS query
#   TEST 13  the master's lookup against a hostile DNS server: bounded, no crash
#   TEST 14-16 api= lines: the master's one request (http, https) gives the set
#            before the workers accept; worker 0 blocks on its index at once;
#            with the agent down, the state file's set and one warning
#
# About 90 s (150 s on Debian's nginx at debug level).
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);
use POSIX qw(WNOHANG);
use JSON::PP ();
use Test::Nginx::Consul::HostileDns;
use Test::Nginx::Consul::Api;

our $NAME = 'redis.service.yunlu_office.consul';
# Static server lines beside the consul_upstream one (the baseline), and the
# ports of the upstreams TEST 2's reload adds.
our ($STATIC_PORT, $NEW_PORT, $NEW_STATIC_PORT) = (1988, 1989, 1990);
$ENV{TEST_NGINX_STATIC_PORT} = $STATIC_PORT;
$ENV{TEST_NGINX_NEW_PORT} = $NEW_PORT;
$ENV{TEST_NGINX_NEW_STATIC_PORT} = $NEW_STATIC_PORT;
# The master's bound for its lookups (src/prefill.rs).
our $BOUND = 2;
$ENV{TEST_NGINX_HOSTILE_PORT} = hostile_port();

# first_connections(N, port => P, clients => K): K clients that wait for port P
# to take connections (refused: try again, not counted) and then make N
# connections in all, each asking its redis who it is. Returns a closure that
# waits for them and returns the tally ({6380 => n, fail => n}).
sub first_connections {
    my ($n, %o) = @_;
    my $clients = $o{clients} // 5;
    my $port = $o{port} // stream_port();
    my @kids;
    for my $c (0 .. $clients - 1) {
        my $file = "$TmpDir/first-$port-$c";
        unlink $file;
        my $count = int($n / $clients) + ($c < $n % $clients ? 1 : 0);
        my $pid = fork // die "fork: $!";
        if (!$pid) {
            $Test::Nginx::Util::InSubprocess = 1;
            my (%t, @fails);
            my $opened = 0;
            my $deadline = time + ($o{timeout} // 30);
            while ($count > 0 && time < $deadline) {
                my ($ap, $why) = probe_backend(port => $port);
                if (!defined $ap && !$opened && $why =~ /refused/) {
                    sleep 0.005;
                    next;
                }
                $opened = 1;
                $count--;
                if (defined $ap) { $t{ (split /:/, $ap)[-1] }++ }
                else { $t{fail}++; push @fails, sprintf('%.3f %s', time, $why) }
                sleep($o{delay} // 0.01);
            }
            $t{unsent} = $count if $count;
            open my $fh, '>', $file;
            print $fh join(' ', map { "$_=$t{$_}" } keys %t), "\n", map { "$_\n" } @fails;
            close $fh;
            POSIX::_exit(0);
        }
        push @kids, [$pid, $file];
    }
    return sub {
        my %t;
        my @fails;
        for my $k (@kids) {
            waitpid($k->[0], 0);
            open my $fh, '<', $k->[1] or do { $t{fail} += 1000; next };
            my $line = <$fh> // '';
            push @fails, <$fh>;
            chomp $line;
            for (grep { length } split / /, $line) {
                my ($key, $v) = split /=/;
                $t{$key} += $v;
            }
        }
        $Test::Nginx::Consul::LastFailure = join '', @fails if @fails;
        return \%t;
    };
}

# Load: K clients connecting back to back (a connection every few ms each), for
# the moments a race would show. Returns a closure that stops them and returns
# the merged tally.
sub load {
    my (%o) = @_;
    my @bg = map { tally_background(delay => 0.002, %o) } 1 .. ($o{clients} // 3);
    return sub {
        my %t;
        my @fails;
        for my $b (@bg) {
            my $t = $b->();
            $t{$_} += $t->{$_} for keys %$t;
            push @fails, $Test::Nginx::Consul::LastFailure // '' if $t->{fail};
        }
        $Test::Nginx::Consul::LastFailure = join '', @fails;
        return \%t;
    };
}

sub children { Test::Nginx::Consul::_children(@_) }
sub workers_of { grep { Test::Nginx::Consul::_cmdline($_) =~ /worker process/ } children(@_) }
sub gone { my $pid = shift; waitpid($pid, WNOHANG); !kill(0, $pid) }
sub oldbin { "$Test::Nginx::Util::PidFile.oldbin" }

# USR2 to the master: the new binary's master starts beside the old one. Returns
# (old master, new master) once the new master has its workers.
sub usr2 {
    my $old = nginx_pid() or return;
    kill 'USR2', $old or return;
    my $new;
    wait_until(sub {
        $new = nginx_pid();
        return -s oldbin() && $new && $new != $old && workers_of($new) >= 2;
    }, 15) or return;
    return ($old, $new);
}

# Debian's `service nginx upgrade` (/etc/init.d/nginx, upgrade_nginx): USR2,
# wait for both pid files, QUIT to the old master. The init script looks every
# second; this looks every 50 ms, so QUIT comes as early as it can.
sub debian_upgrade {
    my $old = nginx_pid() or return;
    kill 'USR2', $old or return;
    wait_until(sub { -s oldbin() && nginx_pid() && nginx_pid() != $old }, 10, 0.05) or return;
    my $oldbin = Test::Nginx::Consul::_read_pid(oldbin());
    kill 'QUIT', $oldbin or return;
    wait_until(sub { gone($oldbin) }, 15) or return;
    return ($old, nginx_pid());
}

# WINCH to the old master: its workers quit gracefully (the new master is its
# child too, and stays).
sub winch {
    my $old = shift;
    kill 'WINCH', $old or return 0;
    return wait_until(sub { !workers_of($old) }, 15);
}

sub quit_master {
    my $pid = shift;
    kill 'QUIT', $pid or return 0;
    return wait_until(sub { gone($pid) }, 15);
}

# The goal: no connection failed (consul_upstream and the static baseline).
sub no_failure {
    my ($what, $t) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $tried = 0;
    $tried += $t->{$_} for grep { /^\d+$/ } keys %$t;
    ok($tried >= 20 && !$t->{fail} && !$t->{unsent}, "$what: $tried connections, none failed (" . tally_str($t) . ')')
        or diag("failures:\n" . ($Test::Nginx::Consul::LastFailure // ''));
}

# The lock file's writer: (master, pid); (0, 0) when it names none (no lock file
# yet, or one given up or being rewritten).
sub state_writer {
    my $lock = shift;
    open my $fh, '<', $lock or return (0, 0);
    my $l = <$fh> // '';
    return $l =~ /master=(\d+) pid=(\d+)/ ? ($1, $2) : (0, 0);
}

run_tests();

__DATA__

=== TEST 1: cold start with clients waiting for the port: none of the first 50 connections fails
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream static {
    server 127.0.0.1:6380;
    server 127.0.0.1:6381;
}
server {
    listen 127.0.0.1:$TEST_NGINX_STATIC_PORT reuseport;
    proxy_pass static;
}
--- check
for my $round (1 .. 3) {
    ok(nginx_stop(), "round $round: stopped");
    my $consul = first_connections(50);
    my $static = first_connections(50, port => $::STATIC_PORT);
    sleep 0.3;
    ok(nginx_restart(), "round $round: started");
    no_failure("round $round: consul_upstream", $consul->());
    no_failure("round $round: static servers", $static->());
}
is(log_count(qr/consul upstream "redis": 2 peers from redis\.service\.yunlu_office\.consul \(generation 1\)/), 4,
   'the set, from the master at each start (and the first one\'s)');
--- no_error_log
[error]
[warn]



=== TEST 2: a reload that adds an upstream: none of its first 50 connections fails
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance cache.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
my $bg = tally_background(delay => 0.01);
my $consul = first_connections(50, port => $::NEW_PORT);
my $static = first_connections(50, port => $::NEW_STATIC_PORT);
stream_config_set(<<'_EOC_');
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream cache {
    consul_upstream cache.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
server {
    listen 127.0.0.1:$TEST_NGINX_NEW_PORT;
    proxy_pass cache;
}
upstream cache_static {
    server 127.0.0.1:6381;
}
server {
    listen 127.0.0.1:$TEST_NGINX_NEW_STATIC_PORT;
    proxy_pass cache_static;
}
_EOC_
sleep 0.3;
ok(nginx_reload(), 'reloaded');
my $t = $consul->();
no_failure('the new consul_upstream', $t);
is(join(',', sort keys %$t), '6381', 'its own instance');
no_failure('the new static upstream', $static->());
no_failure('the upstream the reload kept', $bg->());
--- no_error_log
[error]
[warn]



=== TEST 3: a reload that renames the query of an upstream (its zone reused): nothing fails, the new query's instance serves at once
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis2.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
my $bg = load();
sleep 0.3;
stream_config_set(<<'_EOC_');
upstream redis {
    consul_upstream redis2.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
_EOC_
ok(nginx_reload(), 'reloaded');
sleep 0.5;
no_failure('across the reload', $bg->());
is_tally(tally(10), {6381 => 10}, 'the new query\'s instance only');
is(log_count(qr/consul upstream "redis": 1 peer from redis2\.service\.yunlu_office\.consul \(generation \d+\)/), 1,
   'the set of the new query, logged once');
--- no_error_log
[error]
[warn]



=== TEST 4: live binary upgrade (USR2, WINCH, QUIT) under load, without state=
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream static {
    server 127.0.0.1:6380;
    server 127.0.0.1:6381;
}
server {
    listen 127.0.0.1:$TEST_NGINX_STATIC_PORT;
    proxy_pass static;
}
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
for my $round (1 .. 2) {
    my $consul = load();
    my $static = load(port => $::STATIC_PORT);
    sleep 0.5;
    my ($old, $new) = usr2();
    ok($new, "round $round: USR2: the new binary runs beside the old one");
    sleep 1.5;
    ok(winch($old), "round $round: WINCH: the old workers are gone");
    sleep 1;
    ok(quit_master($old), "round $round: QUIT: the old master is gone");
    sleep 0.5;
    no_failure("round $round: consul_upstream", $consul->());
    no_failure("round $round: static servers", $static->());
}
--- no_error_log
[error]
[warn]



=== TEST 5: upgrade with state=: one worker 0 writes the state file at a time, never half-written; then the new one
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- setup
unlink glob("$TmpDir/upgrade.state*");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=200ms state=$TEST_NGINX_CONSUL_TMP/upgrade.state;
}
--- check
my $state = "$TmpDir/upgrade.state";
ok(wait_for_backends([6380]), 'discovered');
ok(wait_until(sub { -s $state }, 3), 'state file written');
my $bg = load();
my ($old, $new) = usr2();
ok($new, 'USR2: both binaries run');
# Both worker 0s follow Consul now: a change reaches both.
consul_register($::NAME, '127.0.0.1:6381');
my ($reads, $bad) = (0, 0);
my $t0 = time;
while (time - $t0 < 3) {
    if (open my $fh, '<', $state) {
        local $/;
        my $text = <$fh>;
        $reads++;
        $bad++ unless $text =~ /\n\z/ && eval { JSON::PP::decode_json($text)->{sources} };
    }
    sleep 0.002;
}
is($bad, 0, "the state file, read $reads times while both ran, was always whole");
like(do { local $/; open my $fh, '<', $state; <$fh> }, qr/127\.0\.0\.1:6381/, 'the change is saved');
my ($master) = state_writer("$state.lock");
is($master, $old, 'by the old binary, which was writing it');
is(log_count(qr/\[notice\] \d+#\d+: consul upstream "redis": state file "\Q$state\E" is written by process \d+ of nginx master $old, not by this process meanwhile$/), 1,
   'the new binary\'s worker 0 says once that it leaves the file to it');
ok(winch($old), 'WINCH');
ok(quit_master($old), 'QUIT');
consul_deregister($::NAME, '127.0.0.1:6380');
ok(wait_until(sub { (state_writer("$state.lock"))[0] == $new }, 5), 'the new binary writes the state file now');
ok(wait_until(sub { do { local $/; open my $fh, '<', $state; <$fh> } !~ /6380/ }, 3), 'the next change is saved');
is(log_count(qr/state file "\Q$state\E" taken over from process \d+$/), 1, 'and says it once');
no_failure('consul_upstream', $bg->());
--- no_error_log
[error]
[warn]



=== TEST 6: Debian's `service nginx upgrade` with state= while Consul is down: the state file carries the set
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- setup
unlink glob("$TmpDir/down.state*");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    state=$TEST_NGINX_CONSUL_TMP/down.state;
}
upstream static {
    server 127.0.0.1:6380;
    server 127.0.0.1:6381;
}
server {
    listen 127.0.0.1:$TEST_NGINX_STATIC_PORT;
    proxy_pass static;
}
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
ok(wait_until(sub { -s "$TmpDir/down.state" }, 3), 'state file written');
dns_stop();
for my $round (1 .. 2) {
    my $consul = load();
    my $static = load(port => $::STATIC_PORT);
    sleep 0.5;
    my ($old, $new) = debian_upgrade();
    ok($new, "round $round: upgraded, the old master gone");
    sleep 1;
    my $t = $consul->();
    no_failure("round $round: consul_upstream", $t);
    ok($t->{6380} && $t->{6381}, "round $round: both instances serve");
    no_failure("round $round: static servers", $static->());
}
ok(log_count(qr/2 peers from state file "[^"]*down\.state" \(generation 1\)/) >= 2, 'each new master loaded the state file');
--- no_error_log
[error]



=== TEST 7: Debian's `service nginx upgrade` without state=, Consul up
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream static {
    server 127.0.0.1:6380;
    server 127.0.0.1:6381;
}
server {
    listen 127.0.0.1:$TEST_NGINX_STATIC_PORT;
    proxy_pass static;
}
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
for my $round (1 .. 3) {
    my $consul = load();
    my $static = load(port => $::STATIC_PORT);
    sleep 0.5;
    my ($old, $new) = debian_upgrade();
    ok($new, "round $round: upgraded, the old master gone");
    sleep 1;
    no_failure("round $round: consul_upstream", $consul->());
    no_failure("round $round: static servers", $static->());
}
--- no_error_log
[error]
[warn]



=== TEST 8: roll back (USR2, WINCH, then HUP to the old master and QUIT to the new one): nothing lost, the old one writes the state file again
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- setup
unlink glob("$TmpDir/back.state*");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=200ms state=$TEST_NGINX_CONSUL_TMP/back.state;
}
--- check
my $state = "$TmpDir/back.state";
ok(wait_for_backends([6380]), 'discovered');
ok(wait_until(sub { -s $state }, 3), 'state file written');
my $bg = load();
my ($old, $new) = usr2();
ok($new, 'USR2');
ok(winch($old), 'WINCH: only the new binary serves');
consul_register($::NAME, '127.0.0.1:6381');
ok(wait_until(sub { (state_writer("$state.lock"))[0] == $new }, 5), 'the new binary took the state file over');
# The new binary misbehaves: back to the old one.
kill 'HUP', $old;
ok(wait_until(sub { workers_of($old) >= 2 }, 10), 'HUP: the old master has workers again');
ok(quit_master($new), 'QUIT to the new master');
ok(wait_until(sub { (nginx_pid() // 0) == $old }, 5), 'the old master is the one in the pid file again');
consul_deregister($::NAME, '127.0.0.1:6380');
ok(wait_until(sub { (state_writer("$state.lock"))[0] == $old }, 5), 'the old binary writes the state file again');
ok(wait_until(sub { do { local $/; open my $fh, '<', $state; <$fh> } !~ /6380/ }, 3), 'with the last change');
no_failure('consul_upstream', $bg->());
--- no_error_log
[error]
[warn]



=== TEST 9: Consul not answering at start: nginx starts within the bound and serves the state file's set
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- setup
unlink glob("$TmpDir/hole.state*");
# A resolver that accepts TCP connections and never answers.
$main::HOLE = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 64,
                                    Proto => 'tcp', ReuseAddr => 1) or die "hole: $!";
$ENV{TEST_NGINX_HOLE_PORT} = $main::HOLE->sockport;
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul
                    resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    timeout=30s state=$TEST_NGINX_CONSUL_TMP/hole.state;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
ok(wait_until(sub { -s "$TmpDir/hole.state" }, 3), 'state file written');
ok(nginx_stop(), 'stopped');
# Consul (the agent) hangs: every query goes to the black hole.
stream_config_set(<<'_EOC_');
upstream redis {
    consul_upstream redis.service.yunlu_office.consul
                    resolver=127.0.0.1:$TEST_NGINX_HOLE_PORT
                    timeout=30s state=$TEST_NGINX_CONSUL_TMP/hole.state;
}
_EOC_
my $consul = first_connections(50);
sleep 0.3;
my $t0 = time;
ok(nginx_restart(), 'started');
my $took = time - $t0;
# The bound is 2 s; the line's timeout (30 s) is not waited for.
ok($took < $::BOUND + 6, sprintf('started in %.1f s (bound %d s, timeout=30s)', $took, $::BOUND));
no_failure('clients waiting for the port', $consul->());
is_tally(tally(10), {6380 => 10}, 'the state file\'s set serves');
is(log_count(qr/\[warn\] .*resolving redis\.service\.yunlu_office\.consul failed: 127\.0\.0\.1:\d+ timed out, keeping 1 peer$/), 1,
   'the usual warning, once');
close $main::HOLE;
--- no_error_log
[error]



=== TEST 10: Consul refusing at start: at once, the state file's set, one warning for the streak; recovery said once
--- workers: 2
--- setup
open my $f, '>', "$TmpDir/refused.state" or die;
print $f '{"format":"ngx-consul-state","version":3,"upstream":"redis","saved_at":' . int(time()) . ','
       . '"sources":[{"query":"redis.service.yunlu_office.consul","confirmed_at":' . int(time()) . ','
       . '"peers":[{"addr":"127.0.0.1:6380","weight":1,"priority":1}]}]}' . "\n";
close $f;
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=500ms state=$TEST_NGINX_CONSUL_TMP/refused.state;
}
--- check
is_tally(tally(10), {6380 => 10}, 'the state file\'s set serves');
sleep 3;
is(log_count(qr/\[warn\] .*resolving redis\.service\.yunlu_office\.consul failed: cannot connect to 127\.0\.0\.1:\d+, keeping 1 peer$/), 1,
   'one warning for the streak (the master\'s), not one more from worker 0');
dns_start(records => "instance $::NAME 127.0.0.1:6381\n");
ok(wait_for_backends([6381], only => 1, first_set => 0), 'Consul back: its set');
ok(wait_for_log(qr/\[notice\] .*resolver recovered after (\d+) failed attempts/, 3), 'recovery said');
my ($n) = error_log_text() =~ /resolver recovered after (\d+) failed attempts/;
ok($n >= 3, "counting the master's attempt and worker 0's ($n)");
--- no_error_log
[error]



=== TEST 11: a reload that keeps every zone: the master asks nothing (worker 0's one query only)
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=60s;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
my $srv = qr/query: redis\.service\.yunlu_office\.consul IN SRV/;
sleep 1;    # the start's queries (the master's, worker 0's first) are logged
my $q0 = dns_queries($srv);
ok(nginx_reload(), 'reloaded');
ok(wait_until(sub { dns_queries($srv) > $q0 }, 3), 'the new worker 0 asks at once');
sleep 1;
is(dns_queries($srv) - $q0, 1, 'one query: the zone held the set, the master asked nothing');
--- no_error_log
[error]
[warn]



=== TEST 12: nginx -t sends no DNS query (it stays fast and offline)
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- setup
# A resolver that counts what reaches it, TCP and UDP on one port.
$main::TCP = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 8,
                                   Proto => 'tcp', ReuseAddr => 1) or die "tcp: $!";
$main::UDP = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $main::TCP->sockport,
                                   Proto => 'udp') or die "udp: $!";
$ENV{TEST_NGINX_SPY_PORT} = $main::TCP->sockport;
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- check
my $conf = <<'_EOC_';
load_module $TEST_NGINX_CONSUL_MODULE;
pid logs/nginx.pid;
error_log logs/error.log;
events {}
stream {
    upstream tcp {
        consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_SPY_PORT timeout=5s;
    }
    upstream udp {
        consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_SPY_PORT udp timeout=5s
                        state=logs/udp.state;
    }
    server { listen 127.0.0.1:1999; proxy_pass tcp; }
    server { listen 127.0.0.1:1998; proxy_pass udp; }
}
_EOC_
my $t0 = time;
my ($rc, $out, $path) = nginx_t($conf);
my $took = time - $t0;
is($rc, 0, 'nginx -t: ok') or diag($out);
ok($took < 2, sprintf('in %.2f s', $took));
my $spy = IO::Select->new($main::TCP, $main::UDP);
my @asked = $spy->can_read(0.3);
is(scalar(@asked), 0, 'no connection, no datagram reached the resolver');
# The same configuration, started for real, does ask it (the spy works).
(my $prefix = $path) =~ s{conf/nginx\.conf$}{};
system("$NginxBinary -p $prefix -c $path -e ${prefix}logs/error.log >/dev/null 2>&1");
@asked = $spy->can_read(10);
ok(scalar(@asked), 'nginx itself asks it');
my $pid;
wait_until(sub { $pid = Test::Nginx::Consul::_read_pid("${prefix}logs/nginx.pid") }, 10);
ok($pid && kill('QUIT', $pid), 'that nginx runs');
ok(wait_until(sub { !$pid || ::gone($pid) }, 10), 'that nginx stopped');
--- no_error_log
[error]



=== TEST 13: the master's lookup against each hostile DNS behaviour: the start stays bounded, nothing crashes, the state file's set serves
--- workers: 2
--- backends: 6380 6381
--- setup
unlink glob("$TmpDir/hostile-*.state*");
hostile_start(instances => "instance $::NAME 127.0.0.1:6380\ninstance $::NAME 127.0.0.1:6381\n");
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT
                    timeout=500ms state=$TEST_NGINX_CONSUL_TMP/hostile-tcp.state;
}
upstream hostile_udp {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_HOSTILE_PORT
                    udp timeout=500ms state=$TEST_NGINX_CONSUL_TMP/hostile-udp.state;
}
server {
    listen 127.0.0.1:$TEST_NGINX_STATIC_PORT;
    proxy_pass hostile_udp;
}
--- check
ok(wait_for_backends([6380, 6381]), 'tcp: discovered');
ok(wait_for_backends([6380, 6381], port => $::STATIC_PORT, first_set => 0), 'udp: discovered');
ok(wait_until(sub { -s "$TmpDir/hostile-tcp.state" && -s "$TmpDir/hostile-udp.state" }, 3), 'state files written');
for my $mode (qw(slow never random wrong_id long_prefix lying_counts ptr_loop
                 wrong_question other_name count_10k close_mid servfail nxdomain)) {
    ok(nginx_stop(), "$mode: stopped");
    hostile_mode($mode);
    my $q0 = hostile_queries(mode => $mode);
    my $t0 = time;
    ok(nginx_restart(), "$mode: started");
    my $took = time - $t0;
    # Within the lines' timeout (500ms; TEST 9 shows the 2 s bound).
    ok($took < $::BOUND + 6, sprintf('%s: in %.1f s', $mode, $took));
    ok(hostile_queries(mode => $mode) > $q0, "$mode: asked");
    # The state file's set: kept whatever the answer (on_empty and on_error keep).
    for my $line ([tcp => stream_port()], [udp => $::STATIC_PORT]) {
        my $t = tally(6, port => $line->[1]);
        ok(!$t->{fail} && ($t->{6380} // 0) + ($t->{6381} // 0) == 6, "$mode: $line->[0] line: " . tally_str($t));
    }
    hostile_mode('ok');
}
hostile_stop();
--- no_error_log
[error]



=== TEST 14: an api= line at a cold start, clients waiting for the port: none of the first 50 connections fails; worker 0 goes on from the master's answer
--- workers: 2
--- consul_api
instance redis 127.0.0.1:6380
instance redis 127.0.0.1:6381
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT;
}
--- config
location = /status { consul_upstream_status; }
--- check
for my $round (1 .. 3) {
    ok(nginx_stop(), "round $round: stopped");
    api_clear_requests();
    my $consul = first_connections(50);
    sleep 0.3;
    ok(nginx_restart(), "round $round: started");
    no_failure("round $round: api= line", $consul->());
}
my $r;
ok(wait_until(sub { $r = health_requests('redis'); @$r >= 2 }, 5), "the master's request, then worker 0's");
is("$r->[0]{index} $r->[0]{wait}", '0 ', "the master's: no index, no wait");
my $line = status_line();
ok($line->{index} >= 1 && $line->{index} <= api_state()->{index}, "the status shows the index of the master's answer ($line->{index})");
is($line->{lookups}{ok}, 1, '... and its one lookup, worker 0 still waiting');
is($line->{set}, 'live', '... a live set');
is($r->[1]{index}, $line->{index}, "worker 0's first request blocks on that index, at once");
isnt($r->[1]{conn}, $r->[0]{conn}, "the master's connection is its own");
sleep 1;
is(scalar(@{ health_requests('redis') }), 2, 'nothing more while nothing changes');
api_deregister('redis', '127.0.0.1:6381');
ok(wait_for_backends([6380], only => 1, first_set => 0, timeout => 5), 'a change comes in one round trip');
--- no_error_log
[error]
[warn]



=== TEST 15: an api=https:// line at a cold start: the master's request over TLS gives the set before the workers accept
--- workers: 2
--- consul_api
instance redis 127.0.0.1:6380
instance redis 127.0.0.1:6381
--- consul_api_tls
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream service=redis api=https://127.0.0.1:$TEST_NGINX_API_TLS_PORT api_ca=$TEST_NGINX_API_CA;
}
--- config
location = /status { consul_upstream_status; }
--- check
for my $round (1 .. 2) {
    ok(nginx_stop(), "round $round: stopped");
    api_clear_requests();
    my $consul = first_connections(50);
    sleep 0.3;
    ok(nginx_restart(), "round $round: started");
    no_failure("round $round: api=https:// line", $consul->());
}
my $r;
ok(wait_until(sub { $r = health_requests('redis'); @$r >= 2 }, 5), 'two requests over TLS');
is($r->[0]{index}, 0, "the master's, without index");
my $line = status_line();
is($line->{lookups}{ok}, 1, 'the set is the master\'s answer');
is($r->[1]{index}, $line->{index}, "worker 0's blocks on its index ($line->{index})");
--- no_error_log
[error]
[warn]



=== TEST 16: an api= line with state= and the agent down at start: the state file's set from the first connection, one warning (the master's), recovery
--- workers: 2
--- consul_api
instance redis 127.0.0.1:6380
--- backends: 6380 6381
--- setup
unlink glob("$TmpDir/api.state*");
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:$TEST_NGINX_API_PORT interval=500ms
                    state=$TEST_NGINX_CONSUL_TMP/api.state;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
# Worker 0's first request blocks on the master's index: it writes the state
# file when it takes the zone over, not minutes later with its first answer.
ok(wait_until(sub { -s "$TmpDir/api.state" }, 3), 'state file written at once');
ok(nginx_stop(), 'stopped');
api_stop();
my $consul = first_connections(50);
sleep 0.3;
ok(nginx_restart(), 'started with the agent down');
no_failure('clients waiting for the port', $consul->());
is_tally(tally(10), {6380 => 10}, 'the state file\'s set serves');
ok(wait_for_log(qr/consul upstream "redis": 1 peer from state file "\Q$TmpDir\E\/api\.state" \(generation 1\)/, 1),
   'from the state file, by the master');
sleep 2;
is(log_count(qr/\[warn\] .*consul upstream "redis": resolving \S+ failed: cannot connect to 127\.0\.0\.1:\d+ \(Connection refused\), keeping 1 peer$/), 1,
   'one warning for the streak (the master\'s), not one more from worker 0');
api_start(init => "instance redis 127.0.0.1:6381\n");
ok(wait_for_backends([6381], only => 1, first_set => 0, timeout => 8), 'the agent back: its set');
ok(wait_for_log(qr/\[notice\] .*consul upstream "redis": agent recovered after (\d+) failed attempts/, 3), 'recovery said');
my ($n) = error_log_text() =~ /agent recovered after (\d+) failed attempts/;
ok($n >= 2, "counting the master's attempt and worker 0's ($n)");
--- no_error_log
[error]
