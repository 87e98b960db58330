# state=PATH: what it holds, where it goes, how it is written, and what a
# restart during an outage makes of it. Faults around it (a FIFO, a missing
# directory, another upstream's or query's file) are logged and never block.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);
use POSIX qw(mkfifo);

our $NAME = 'redis.service.yunlu_office.consul';

run_tests();

__DATA__

=== TEST 1: state= names a FIFO: nothing blocks, discovery runs, the FIFO is reported
--- workers: 2
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- setup
unlink "$TmpDir/fifo.state";
mkfifo("$TmpDir/fifo.state", 0644) or die "mkfifo: $!";
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s state=$TEST_NGINX_CONSUL_TMP/fifo.state;
}
--- check
ok(wait_for_backends([6380], timeout => 5), 'worker 0 did not block: discovered and serving');
is_tally(tally(10), {6380 => 10}, 'every connection served');
ok(wait_until(sub { -f "$TmpDir/fifo.state" }, 3), 'the set is saved as a regular file in its place');
--- error_log eval
qr/\[error\] \d+#\d+: consul upstream "redis": state file "[^"]*\/fifo\.state" ignored: not a regular file$/m



=== TEST 2: a relative state= is under nginx's prefix, mode 0644 whatever the umask
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- setup
$main::UMASK = umask 077;
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s state=logs/redis.state;
}
--- check
umask $main::UMASK;
ok(wait_for_backends([6380]), 'discovered');
# (logs/: Test::Nginx removes only the directories it made under the prefix.)
my $state = "$Test::Nginx::Util::ServRoot/logs/redis.state";
ok(wait_until(sub { -s $state }, 3), "written under the prefix: $state");
ok(!-e 'logs/redis.state', 'not under the directory nginx was started from');
my $mode = (stat $state)[2] & 07777;
is(sprintf('%04o', $mode), '0644', 'mode 0644 under umask 077');
my @tmp = glob("$Test::Nginx::Util::ServRoot/logs/redis.state.tmp*");
is(scalar @tmp, 0, 'no temporary file left');
--- no_error_log
[error]



=== TEST 3: a restart during an outage knows the set's age: max_stale counts from its last answer
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- setup
unlink "$TmpDir/age.state";
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s max_stale=8s state=$TEST_NGINX_CONSUL_TMP/age.state;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
# Stable, successful answers for longer than max_stale: the set never changes.
sleep 12;
dns_stop();
my $stopped = time;
ok(nginx_restart(), 'restarted with Consul down');
is_tally(tally(10), {6380 => 10}, 'the saved set serves at once after the restart');
ok(!log_count(qr/\(max_stale\), dropping/), 'not dropped as if it were 12 s old');
ok(wait_for_log(qr/no successful answer for \d+s \(max_stale\), dropping 1 peer/, 12),
   'max_stale still ends it');
my $took = time - $stopped;
ok($took <= 10, sprintf('%.1f s after the last answer (max_stale=8s)', $took));



=== TEST 4: the state file's directory does not exist: said once, discovery goes on
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    interval=1s state=$TEST_NGINX_CONSUL_TMP/no-such-dir/redis.state;
}
--- check
ok(wait_for_backends([6380]), 'discovered');
sleep 3;
is(log_count(qr/\[error\] .*cannot save state file "[^"]*no-such-dir\/redis\.state": No such file or directory/), 1,
   'said once, not per answer');
mkdir "$TmpDir/no-such-dir" or die;
consul_register($::NAME, '127.0.0.1:6381');
ok(wait_for_log(qr/\[notice\] .*state file "[^"]*no-such-dir\/redis\.state" written again/, 4),
   'the next change is saved, and that is said');
ok(-s "$TmpDir/no-such-dir/redis.state", 'the file exists');



=== TEST 5: a state file of other queries, or of another upstream, is not used
--- setup
open my $f, '>', "$TmpDir/other-query.state" or die;
print $f '{"format":"ngx-consul-state","version":3,"upstream":"redis","saved_at":1,'
       . '"sources":[{"query":"other.service.consul","confirmed_at":1,'
       . '"peers":[{"addr":"127.0.0.1:6381","weight":1,"priority":1}]}]}' . "\n";
close $f;
open $f, '>', "$TmpDir/other-upstream.state" or die;
print $f '{"format":"ngx-consul-state","version":3,"upstream":"cache","saved_at":1,'
       . '"sources":[{"query":"redis.service.yunlu_office.consul","confirmed_at":1,'
       . '"peers":[{"addr":"127.0.0.1:6381","weight":1,"priority":1}]}]}' . "\n";
close $f;
--- backends: 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    state=$TEST_NGINX_CONSUL_TMP/other-query.state;
}
upstream second {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    state=$TEST_NGINX_CONSUL_TMP/other-upstream.state;
}
--- check
is_tally(tally(3), {fail => 3}, 'no peers from either file (DNS down)');
--- error_log eval
[qr/consul upstream "redis": state file "[^"]*other-query\.state" ignored: written for other\.service\.consul$/m,
 qr/consul upstream "second": state file "[^"]*other-upstream\.state" ignored: written for upstream "cache"$/m]



=== TEST 6: a state file of the previous format (version 2) is still read
--- setup
open my $f, '>', "$TmpDir/v2.state" or die;
print $f '{"format":"ngx-consul-state","version":2,"upstream":"redis","saved_at":' . int(time()) . ','
       . '"sources":[{"query":"redis.service.yunlu_office.consul",'
       . '"peers":[{"addr":"127.0.0.1:6380","weight":1,"priority":1}]}]}' . "\n";
close $f;
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT
                    state=$TEST_NGINX_CONSUL_TMP/v2.state;
}
--- check
is_tally(tally(4), {6380 => 4}, 'the saved peer serves (DNS down)');
--- error_log eval
qr/consul upstream "redis": 1 peer from state file "[^"]*v2\.state" \(generation 1\)/
