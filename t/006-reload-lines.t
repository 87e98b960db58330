# Reloads that change the consul_upstream lines: after any reload the zone holds
# exactly the configured lines' parts, whatever DNS does. A line whose query is
# new (added, or renamed) serves nothing until its first answer, as nginx's own
# `resolve` servers do; a line that stays keeps its part and its counters.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);

our $RA = 'ra.service.yunlu_office.consul';
our $RB = 'rb.service.yunlu_office.consul';

our $TWO_LINES = <<'_EOC_';
upstream redis {
    consul_upstream ra.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    consul_upstream rb.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
_EOC_

our $ONLY_RA = <<'_EOC_';
upstream redis {
    consul_upstream ra.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
_EOC_

run_tests();

__DATA__

=== TEST 1: a reload removes a line while DNS is down: its peers are gone at once
--- workers: 2
--- dns
instance ra.service.yunlu_office.consul 127.0.0.1:6380
instance rb.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config eval
$::TWO_LINES
--- check
ok(wait_for_backends([6380, 6381]), 'both lines discovered');
dns_stop();
stream_config_set($::ONLY_RA);
ok(nginx_reload(), 'reloaded without the rb line');
my $t = tally(40);
is_tally($t, {6380 => 40}, "rb's instance gets nothing right after the reload, DNS down");
ok(wait_for_log(qr/consul upstream "redis": dropping 1 peer of removed "consul_upstream" lines, 1 peer in all \(generation \d+\)/, 2),
   'the drop is logged');
--- no_error_log
[error]



=== TEST 2: the same with DNS up and the remaining answer unchanged
--- workers: 2
--- dns
instance ra.service.yunlu_office.consul 127.0.0.1:6380
instance rb.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config eval
$::TWO_LINES
--- check
ok(wait_for_backends([6380, 6381]), 'both lines discovered');
stream_config_set($::ONLY_RA);
ok(nginx_reload(), 'reloaded without the rb line');
is_tally(tally(40), {6380 => 40}, "rb's instance gets nothing after the reload");
sleep 2.5;
is_tally(tally(20), {6380 => 20}, 'nor later, while ra answers the same set');
--- no_error_log
[error]
[warn]



=== TEST 3: a line added by a reload: its instances join, the others stay
--- workers: 2
--- dns
instance ra.service.yunlu_office.consul 127.0.0.1:6380
instance rb.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config eval
$::ONLY_RA
--- check
ok(wait_for_backends([6380]), 'ra discovered');
stream_config_set($::TWO_LINES);
ok(nginx_reload(), 'reloaded with an rb line');
ok(wait_for_backends([6380, 6381], first_set => 0, timeout => 3), 'rb joins within its first answer');
ok(wait_for_log(qr/1 peer from rb\.service\.yunlu_office\.consul, 2 peers in all/, 3), 'logged');
--- no_error_log
[error]
[warn]



=== TEST 4: a renamed query: the old query's peers leave, the new one's come
--- workers: 2
--- dns
instance ra.service.yunlu_office.consul 127.0.0.1:6380
instance rc.service.yunlu_office.consul 127.0.0.1:6382
--- backends: 6380 6382
--- stream_listen_options: reuseport
--- stream_config eval
$::ONLY_RA
--- check
ok(wait_for_backends([6380]), 'ra discovered');
stream_config_set(<<'_EOC_');
upstream redis {
    consul_upstream rc.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
_EOC_
ok(nginx_reload(), 'reloaded with the query renamed');
ok(wait_for_backends([6382], only => 1, first_set => 0, timeout => 3), 'only the new query serves');
--- no_error_log
[error]



=== TEST 5: a renamed query while DNS is down serves nothing of the old one
--- workers: 2
--- dns
instance ra.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6382
--- stream_listen_options: reuseport
--- stream_config eval
$::ONLY_RA
--- check
ok(wait_for_backends([6380]), 'ra discovered');
dns_stop();
stream_config_set(<<'_EOC_');
upstream redis {
    consul_upstream rc.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
    server 127.0.0.1:6382;
}
_EOC_
ok(nginx_reload(), 'reloaded with the query renamed and a fallback server');
is_tally(tally(20), {6382 => 20}, "the fallback serves, not the old query's instance");
--- no_error_log
[emerg]



=== TEST 6: a reload that changes zone= while Consul is down keeps the set
--- workers: 2
--- dns
instance ra.service.yunlu_office.consul 127.0.0.1:6380
instance ra.service.yunlu_office.consul 127.0.0.1:6381 weight=3
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config eval
$::ONLY_RA
--- check
ok(wait_for_backends([6380, 6381]), 'discovered');
dns_stop();
ok(wait_for_log(qr/resolving ra\.service\.yunlu_office\.consul failed: .+, keeping 2 peers/, 4), 'DNS down noticed');
my $bg = tally_background(delay => 0.01);
stream_config_set(<<'_EOC_');
upstream redis {
    consul_upstream ra.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s zone=512k;
}
_EOC_
ok(nginx_reload(), 'reloaded with zone=512k');
sleep 1;
my $t = $bg->();
ok(!$t->{fail}, 'no connection failed across the reload: ' . tally_str($t));
my $mark = log_mark();
$t = tally(40);
ok(!$t->{fail}, 'no connection failed after the reload: ' . tally_str($t));
split_is_exact(worker_tally($mark), {6380 => 1, 6381 => 3},
               'the set, weights included, lives on in the new zone (each worker 1:3)');
--- no_error_log
[error]



=== TEST 7: max_stale counts per line from its own last answer, across a reload
--- workers: 2
--- dns
instance ra.service.yunlu_office.consul 127.0.0.1:6380
instance rb.service.yunlu_office.consul 127.0.0.1:6381
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    consul_upstream ra.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s max_stale=6s;
    consul_upstream rb.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_backends([6380, 6381]), 'both lines discovered');
consul_deregister_all($::RA);
my $t0 = time;
ok(wait_for_log(qr/ra\.service\.yunlu_office\.consul has no healthy instances \(NXDOMAIN\), keeping 1 peer/, 3),
   'ra has no instance now (kept)');
sleep 4 - (time - $t0);
# rb keeps answering: the reload must not give ra a fresh max_stale window.
ok(nginx_reload(), 'reloaded 4 s after ra\'s last answer');
ok(wait_for_log(qr/no successful answer for \d+s \(max_stale\), dropping 1 peer/, 10), 'ra dropped');
my $took = time - $t0;
ok($took < 8, sprintf("dropped %.1f s after ra's last answer (max_stale=6s; a reset at the reload: >= 10 s)", $took));
ok(wait_for_backends([6381], only => 1, first_set => 0, timeout => 3), 'rb alone serves');
--- no_error_log
[error]



=== TEST 8: zone=1024m costs what its peers use; a reload reuses it, a zone= change copies the set
The zone's memory is touched only where peers are (as nginx's own zones):
no process maps more than a few MB of it, before and after the reloads.
--- workers: 2
--- dns
instance ra.service.yunlu_office.consul 127.0.0.1:6380
instance ra.service.yunlu_office.consul 127.0.0.1:6381 weight=3
--- backends: 6380 6381
--- stream_listen_options: reuseport
--- stream_config
upstream redis {
    least_conn;
    consul_upstream ra.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s zone=1024m;
}
--- check
# Shared memory each nginx process has touched (kB), from /proc.
my $touched = sub {
    my %kb;
    for my $pid (nginx_pid(), nginx_worker_pids()) {
        open my $fh, '<', "/proc/$pid/status" or next;
        while (<$fh>) { $kb{$pid} = $1 if /^RssShmem:\s+(\d+)/ }
    }
    my @over = grep { $kb{$_} > 32 * 1024 } sort keys %kb;
    return join(' ', map { "$_: $kb{$_} kB" } @over);
};
ok(wait_for_backends([6380, 6381]), 'discovered');
my $t = tally(40);
ok(!$t->{fail} && $t->{6380} && $t->{6381}, 'both serve: ' . tally_str($t));
is($touched->(), '', 'no process has touched more than 32 MB of shared memory');
ok(nginx_reload(), 'reloaded (the zone is reused)');
$t = tally(40);
ok(!$t->{fail} && $t->{6380} && $t->{6381}, 'both serve after the reload: ' . tally_str($t));
dns_stop();
ok(wait_for_log(qr/resolving ra\.service\.yunlu_office\.consul failed: .+, keeping 2 peers/, 4), 'DNS down noticed');
stream_config_set(<<'_EOC_');
upstream redis {
    least_conn;
    consul_upstream ra.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s zone=512m;
}
_EOC_
ok(nginx_reload(), 'reloaded with zone=512m while Consul is down');
$t = tally(40);
ok(!$t->{fail} && $t->{6380} && $t->{6381}, 'the new zone has the set: ' . tally_str($t));
is($touched->(), '', 'still no process over 32 MB');
--- no_error_log
[error]
