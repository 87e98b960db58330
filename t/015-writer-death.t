# Worker 0 killed in the middle of writing the set (the OOM killer, SIGKILL):
# gdb stops it inside the write, with the zone's lock held and half of the new
# set written, and kills it there. The published set must stay whole and
# readable by every worker, the lock must not stay taken, and the respawned
# worker 0 must serve the set even while Consul is down.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);
use POSIX qw(WNOHANG);

our $NAME = 'redis.service.yunlu_office.consul';

# Attaches gdb to PID, stops it at the first record write of a publish, touches
# HIT, waits for GO, then kills the process. Returns gdb's pid.
sub kill_inside_write {
    my ($pid, $hit, $go) = @_;
    my $gdb = fork();
    die "fork: $!" unless defined $gdb;
    if ($gdb == 0) {
        open STDOUT, '>', "$TmpDir/gdb.out";
        open STDERR, '>&', \*STDOUT;
        # `break` finds the function by its debug info (debug builds); release
        # builds have none, and only `rbreak` matches their symbols (which carry a
        # hash suffix). Whichever fails just says so. Never more than 60 s.
        { exec 'timeout', '60', 'gdb', '-nx', '-p', $pid, '-batch',
            '-ex', 'set pagination off',
            '-ex', 'break ngx_consul_core::zone::records::Record::store',
            '-ex', 'rbreak ^ngx_consul_core::zone::records::Record::store',
            '-ex', 'continue',
            '-ex', "shell touch $hit; while [ ! -e $go ]; do sleep 0.05; done",
            '-ex', 'kill' }
        POSIX::_exit(127);
    }
    return $gdb;
}

run_tests();

__DATA__

=== TEST 1: worker 0 killed mid-write, lock held, then Consul down: the respawned worker serves
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
instance redis.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381 6382
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both discovered');
# (The master found the set before the workers started; worker 0 asks next one
# interval later.)
my $w0;
wait_until(sub { ($w0) = grep { _is_worker0($_) } nginx_worker_pids(); $w0 }, 5);
sub _is_worker0 {
    my $pid = shift;
    # worker 0 is the one that queries: it holds the TCP connection to BIND
    my $out = `ss -Htnp state established '( dport = :$DnsPort )' 2>/dev/null`;
    return $out =~ /pid=$pid\b/;
}
ok($w0, "worker 0 found (pid " . ($w0 // '?') . ')');
my ($hit, $go) = ("$TmpDir/gdb.hit", "$TmpDir/gdb.go");
unlink $hit, $go;
my $gdb = main::kill_inside_write($w0, $hit, $go);
ok(wait_until(sub { -s "$TmpDir/gdb.out" && `cat $TmpDir/gdb.out` =~ /Breakpoint \d+ at/ }, 20), 'gdb attached')
    or diag `cat $TmpDir/gdb.out`;
consul_register($::NAME, '127.0.0.1:6382');
my $stopped = ok(wait_until(sub { -e $hit }, 10), 'worker 0 stopped inside the write of the new set')
    or diag `cat $TmpDir/gdb.out`;
dns_stop();
open my $f, '>', $go; close $f;
kill 'TERM', $gdb unless $stopped;
waitpid($gdb, 0);
ok(wait_until(sub { !kill(0, $w0) }, 5), 'worker 0 killed');
ok(wait_until(sub { my @w = nginx_worker_pids(); @w == 2 && !grep { $_ == $w0 } @w }, 5), 'respawned');
my $t = tally(40);
ok(!$t->{fail}, 'no connection failed in either worker, Consul down: ' . tally_str($t));
ok($t->{6380} && $t->{6381} && !$t->{6382}, 'the last whole set serves: ' . tally_str($t));
dns_start(records => join "\n", map { "instance $::NAME 127.0.0.1:$_" } 6380, 6381, 6382);
ok(wait_for_backends([6380, 6381, 6382], first_set => 0, timeout => 6),
   'Consul back: the respawned worker 0 writes again (the lock was freed)');
is(log_count(qr/\[alert\]/), 2, 'no alert but the death and the lock nginx freed');
--- allow_alert
--- error_log eval
[qr/\[alert\] \d+#\d+: worker process \d+ exited on signal 9/,
 qr/\[alert\] \d+#\d+: shared memory zone "consul_upstream:v\d+:stream:redis" was locked by \d+/]
--- no_error_log
[crit]
panicked
