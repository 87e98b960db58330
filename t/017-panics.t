# A panic (a bug) in one step of discovery or of the balancer ends that step
# only: the line keeps resolving, the worker keeps serving. Debug builds carry a
# fault hook (NGX_CONSUL_FAULT, see src/fault.rs) that makes a step panic once;
# release builds have none, and these blocks are skipped for them.
use lib 't/lib';
use Test::Nginx::Consul;

our $NAME = 'redis.service.yunlu_office.consul';

# The hook's variable name is in the module's file only when the hook is.
my $hooked = do {
    open my $f, '<:raw', $ModulePath or die "$ModulePath: $!";
    local $/;
    index(<$f>, 'NGX_CONSUL_FAULT') >= 0;
};
if ($hooked) {
    plan('no_plan');
} else {
    plan(skip_all => "no fault hook in $ModulePath (a release build)");
}

run_tests();

__DATA__

=== TEST 1: applying an answer panics once: the line goes on and sees the next change
--- main_config
env NGX_CONSUL_FAULT=apply;
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380 6381
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_log(qr/\[alert\] .*consul upstream "redis": applying the answer for redis\.service\.yunlu_office\.consul failed \(panic\); next query in 1000ms/, 4),
   'the panic is reported');
ok(wait_for_backends([6380], timeout => 4), 'the next answer is applied');
consul_register($::NAME, '127.0.0.1:6381');
ok(wait_for_backends([6380, 6381], first_set => 0, timeout => 4), 'and changes after it');
--- allow_alert
--- error_log
fault injected into apply
--- no_error_log
exited on signal



=== TEST 2: a lookup panics once: a failed lookup, then the next one works
--- main_config
env NGX_CONSUL_FAULT=lookup;
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
# (The master's lookup before the workers started gave the set: it is kept.)
ok(wait_for_log(qr/\[warn\] .*resolving redis\.service\.yunlu_office\.consul failed: internal error in the DNS client \(panic\), keeping 1 peer$/m, 4),
   'reported as a failed lookup');
ok(wait_for_backends([6380], first_set => 0, timeout => 4), 'the next lookup works');
ok(wait_for_log(qr/resolver recovered after 1 failed attempts/, 2), 'recovery noticed');
--- allow_alert
--- error_log
fault injected into lookup
--- no_error_log
exited on signal



=== TEST 3: picking a peer panics once: that connection fails, the worker lives on
--- workers: 1
--- main_config
env NGX_CONSUL_FAULT=get;
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
ok(wait_for_log(qr/1 peer from/, 4), 'discovered');
my @before = nginx_worker_pids();
my $t = tally(10);
is($t->{fail}, 1, 'one connection failed: ' . tally_str($t));
is($t->{6380}, 9, 'the others were served');
is_deeply([nginx_worker_pids()], \@before, 'the same worker serves');
--- allow_alert
--- error_log
balancer callback failed (panic)
--- no_error_log
exited on signal



=== TEST 4: the master's fill before the workers start panics: said, nginx starts, worker 0 discovers
--- workers: 2
--- setup
# In nginx's own environment: the master sees it (the workers do not).
$ENV{NGX_CONSUL_FAULT} = 'prefill';
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:6380
--- backends: 6380
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=1s;
}
--- check
delete $ENV{NGX_CONSUL_FAULT};
ok(wait_for_log(qr/\[alert\] .*consul upstream: filling the zones before the workers start failed \(panic\)/, 4),
   'the panic is reported');
ok(wait_for_backends([6380], first_set => 0, timeout => 4), 'worker 0 discovers as before');
is(scalar(nginx_worker_pids()), 2, 'both workers run');
--- allow_alert
--- no_error_log
exited on signal
