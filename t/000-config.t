# Configuration errors: nginx refuses to start (as `nginx -t` does) with the
# exact message and the file:line of the offending directive.
#
# A line ending in "# emerg: MESSAGE" makes its block a must_die block that
# expects "[emerg] MESSAGE in .../stream.conf:LINE" for that very line.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';

# --- nginx -t itself, on complete files ------------------------------------
{
    my ($rc, $out, $conf) = nginx_t(<<'_EOC_');
load_module $TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream redis {
        consul_upstream redis.service.yunlu_office.consul foo;
    }
    server { listen 127.0.0.1:1986; proxy_pass redis; }
}
_EOC_
    isnt($rc, 0, 'nginx -t fails on an unknown parameter');
    like($out, qr/^nginx: \[emerg\] invalid parameter "foo" in \Q$conf\E:5$/m,
         'nginx -t names the message, the file and the line') or diag $out;
    like($out, qr/test failed/, 'nginx -t says the test failed');

    ($rc, $out, $conf) = nginx_t(<<'_EOC_');
load_module $TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream redis {
        consul_upstream service=redis tag=primary datacenter=yunlu_office domain=consul
                        resolver=127.0.0.1:8600 resolver=127.0.0.2 resolver=[::1]:8600
                        interval=2s timeout=500ms udp on_empty=fail on_error=fail
                        max_stale=30s zone=128k state=$TEST_NGINX_CONSUL_TMP/t.state
                        max_fails=3 fail_timeout=5s;
        server 127.0.0.1:6382;
    }
    upstream plain {
        consul_upstream redis.service.yunlu_office.consul tcp;
    }
    upstream rfc2782 {
        consul_upstream _redis._primary.service.consul;
    }
    server { listen 127.0.0.1:1986; proxy_pass redis; }
}
_EOC_
    is($rc, 0, 'nginx -t accepts every documented parameter') or diag $out;
    like($out, qr/syntax is ok/, 'syntax is ok');

    # `zone` is what every nginx user writes in a dynamic upstream (nginx's own
    # `resolve` requires it). nginx's zone module copies the block's round-robin
    # peers: without static servers there were none, and nginx -t crashed.
    ($rc, $out, $conf) = nginx_t(<<'_EOC_');
load_module $TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream zone_first {
        zone zone_first 64k;
        consul_upstream redis.service.dc1.consul;
    }
    upstream zone_after {
        consul_upstream redis.service.dc2.consul;
        zone zone_after 64k;
    }
    upstream zone_and_servers {
        zone shared 64k;
        consul_upstream redis.service.dc3.consul;
        server 127.0.0.1:6382;
        server 127.0.0.1:6383 backup;
    }
    upstream zone_shared {
        zone shared;
        consul_upstream redis.service.dc4.consul;
    }
    server { listen 127.0.0.1:1986; proxy_pass zone_first; }
}
_EOC_
    is($rc, 0, 'zone beside consul_upstream: nginx -t passes (no crash)') or diag $out;
    like($out, qr/test is successful/, 'zone: test is successful') or diag $out;

    # How nginx users spell a last-resort server.
    ($rc, $out, $conf) = nginx_t(<<'_EOC_');
load_module $TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream redis {
        consul_upstream redis.service.dc1.consul;
        server 127.0.0.1:6382 backup;
    }
    server { listen 127.0.0.1:1986; proxy_pass redis; }
}
_EOC_
    is($rc, 0, 'a backup server beside consul_upstream: nginx -t passes') or diag $out;
    unlike($out, qr/no servers in upstream/, 'not "no servers in upstream"');

    # Two methods in one upstream: nginx's own warning, as without consul_upstream.
    ($rc, $out, $conf) = nginx_t(<<'_EOC_');
load_module $TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream redis {
        least_conn;
        consul_upstream redis.service.dc1.consul;
        random;
    }
    server { listen 127.0.0.1:1986; proxy_pass redis; }
}
_EOC_
    is($rc, 0, 'two methods: nginx -t passes') or diag $out;
    like($out, qr/\[warn\] load balancing method redefined in \Q$conf\E:7$/m, "with nginx's warning")
        or diag $out;
    unlike($out, qr/redefined in \Q$conf\E:6$/m, 'consul_upstream itself redefines nothing');

    # The example configurations in nginx-conf/ are valid as shipped (paths
    # moved under the test's prefix).
    for my $file (glob("$Test::Nginx::Consul::RootDir/nginx-conf/*.conf")) {
        open my $fh, '<', $file or die "$file: $!";
        my $text = do { local $/; <$fh> };
        $text =~ s{^load_module \S+;}{load_module \$TEST_NGINX_CONSUL_MODULE;}m;
        $text =~ s{/var/log/nginx/}{logs/}g;
        $text =~ s{/run/nginx\.pid}{logs/nginx.pid}g;
        $text =~ s{/var/lib/nginx/(?:consul/)?}{logs/}g;
        if ($text =~ m{/etc/nginx/consul\.token}) {    # consul-api.conf's ACL token
            open my $tf, '>', "$TmpDir/consul.token" or die;
            print $tf "0b7d9e0c-2f2e-4d6a-9c1e-5f0d7a1b2c3d\n";
            close $tf;
            $text =~ s{/etc/nginx/consul\.token}{$TmpDir/consul.token}g;
        }
        ($rc, $out, $conf) = nginx_t($text);
        is($rc, 0, "nginx-conf/" . ($file =~ s{.*/}{}r) . ' passes nginx -t') or diag $out;
    }

    # hash/random, a backup server and consul_upstream: every order is
    # accepted (main at 3025645 refused method, backup, consul_upstream).
    # Without consul_upstream, nginx's own refusal of backup stays, at its line.
    my @parts = ('server 127.0.0.1:6382 backup;', 'consul_upstream redis.service.dc1.consul;');
    for my $method ('hash $remote_addr;', 'hash $remote_addr consistent;', 'random;', 'random two least_conn;') {
        for my $order ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]) {
            my $body = join "\n        ", ($method, @parts)[@$order];
            ($rc, $out, $conf) = nginx_t(<<"_EOC_");
load_module \$TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream redis {
        $body
    }
    server { listen 127.0.0.1:1986; proxy_pass redis; }
}
_EOC_
            is($rc, 0, "accepted: " . ($body =~ s/\s+/ /gr)) or diag $out;
        }
        ($rc, $out, $conf) = nginx_t(<<"_EOC_");
load_module \$TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream plain {
        $method
        server 127.0.0.1:6380;
        server 127.0.0.1:6382 backup;
    }
    server { listen 127.0.0.1:1986; proxy_pass plain; }
}
_EOC_
        isnt($rc, 0, "without consul_upstream, $method then a backup server is refused");
        like($out, qr/\[emerg\] balancing method does not support parameter "backup" in \Q$conf\E:7$/m,
             "with nginx's own message and line") or diag $out;
    }

    # nginx's `zone` named like the zone of a consul_upstream upstream, before
    # or after it: refused (main at 3025645 shared the zone or took it over).
    my ($layout) = do {
        open my $fh, '<', "$Test::Nginx::Consul::RootDir/core/src/zone/layout.rs" or die $!;
        map { /^pub const LAYOUT: u32 = (\d+);/ ? $1 : () } <$fh>;
    };
    my $zone_name = "consul_upstream:v$layout:stream:b";
    for my $case (['before', "upstream a { zone $zone_name 256k; server 127.0.0.1:6380; }",
                   'upstream b { consul_upstream b.service.consul; }', 7,
                   qr/shared memory zone "\Q$zone_name\E" is already declared for a different use: this name is the zone of "consul_upstream" in upstream "b"/],
                  ['after', 'upstream b { consul_upstream b.service.consul; }',
                   "upstream a { zone $zone_name 256k; server 127.0.0.1:6380; }", 7,
                   qr/zone "\Q$zone_name\E" is the zone of "consul_upstream" in upstream "b": choose another name/],
                  ['in the same upstream, without a size', "upstream b { consul_upstream b.service.consul;",
                   "zone $zone_name; }", 7,
                   qr/zone "\Q$zone_name\E" is the zone of "consul_upstream" in upstream "b": choose another name/]) {
        my ($what, $first, $second, $line, $msg) = @$case;
        ($rc, $out, $conf) = nginx_t(<<"_EOC_");
load_module \$TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream c { zone c 64k; server 127.0.0.1:6380; }
    server { listen 127.0.0.1:1986; proxy_pass b; }
    $first
    $second
}
_EOC_
        isnt($rc, 0, "nginx's zone named like consul_upstream's zone, $what: refused");
        like($out, qr/\[emerg\] $msg in \Q$conf\E:$line$/m, "clearly, at the zone's or consul_upstream's line")
            or diag $out;
    }

    # zone= costs what its peers use, at nginx -t too: three zone=1024m
    # upstreams against nginx's own three `zone ... 1024m` in the same run
    # (main at 3025645: 3 GB and 10 s against 27 MB and 0.04 s).
    my %ru;
    for my $kind (qw(nginx consul_upstream)) {
        my $blocks = join '', map {
            $kind eq 'nginx' ? "    upstream $_ { zone $_ 1024m; server 127.0.0.1:6380; }\n"
                             : "    upstream $_ { consul_upstream $_.service.consul zone=1024m; }\n"
        } qw(a b c);
        ($rc, $out, $conf, $ru{$kind}) = nginx_t(<<"_EOC_", rusage => 1);
load_module \$TEST_NGINX_CONSUL_MODULE;
events { }
stream {
$blocks    server { listen 127.0.0.1:1986; proxy_pass a; }
}
_EOC_
        is($rc, 0, "three 1024m zones ($kind): nginx -t passes") or diag $out;
    }
    my ($ours, $theirs) = map { $ru{$_}{maxrss_kb} } qw(consul_upstream nginx);
    diag(sprintf 'nginx -t with three 1024m zones: consul_upstream %d kB %.2f s, nginx %d kB %.2f s',
         $ours, $ru{consul_upstream}{wall_s}, $theirs, $ru{nginx}{wall_s});
    cmp_ok($ours / $theirs, '<', 1.5,
           "three zone=1024m cost nginx -t about what nginx's own 1024m zones cost ($ours kB, $theirs kB)");

    # 33 lines: one more than the zone keeps line records for.
    my $lines = join '', map { "        consul_upstream r$_.service.consul;\n" } 1 .. 33;
    ($rc, $out, $conf) = nginx_t(<<"_EOC_");
load_module \$TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream redis {
$lines    }
    server { listen 127.0.0.1:1986; proxy_pass redis; }
}
_EOC_
    isnt($rc, 0, '33 consul_upstream lines are refused');
    like($out, qr/\[emerg\] too many "consul_upstream" lines in one upstream \(at most 32\) in \Q$conf\E:37$/m,
         'and the 33rd line is named') or diag $out;
}

# --- http { upstream {} } (issue 17) ----------------------------------------
{
    my ($version) = `$Test::Nginx::Consul::NginxBinary -v 2>&1` =~ m{nginx version: [^/\s]+/(\d+\.\d+\.\d+)};
    my $vnum = sprintf '%d%03d%03d', split /\./, $version;
    # One http config around BODY (lines 1-4 come first: BODY starts at line 5).
    my $http = sub {
        my ($body, $extra) = @_;
        return nginx_t(<<"_EOC_");
load_module \$TEST_NGINX_CONSUL_MODULE;
events { }
http {
    server { listen 127.0.0.1:1986; location / { proxy_pass http://api; } }
$body
}
${\ ($extra // '')}
_EOC_
    };

    my ($rc, $out, $conf) = $http->(<<'_EOC_');
    upstream api {
        consul_upstream service=api tag=v2 datacenter=dc1 domain=consul
                        resolver=127.0.0.1:8600 interval=2s timeout=500ms tcp on_empty=keep
                        on_error=keep max_stale=30s zone=128k state=$TEST_NGINX_CONSUL_TMP/api.state
                        max_fails=3 fail_timeout=5s slow_start=10s max_conns=100;
        consul_upstream api.service.dc2.consul;
        consul_upstream api=http://127.0.0.1:8500 service=api only_passing;
        server 127.0.0.1:8083 backup;
        keepalive 16;
    }
_EOC_
    is($rc, 0, 'http: nginx -t accepts every parameter, DNS and api= lines, backup and keepalive') or diag $out;

    ($rc, $out, $conf) = nginx_t(<<'_EOC_');
load_module $TEST_NGINX_CONSUL_MODULE;
events { }
http {
    server {
        listen 127.0.0.1:1986;
        consul_upstream api.service.consul;
    }
}
_EOC_
    isnt($rc, 0, 'http: consul_upstream outside upstream {} is refused');
    like($out, qr/\[emerg\] "consul_upstream" directive is not allowed here in \Q$conf\E:6$/m,
         "with nginx's message and line") or diag $out;

    ($rc, $out, $conf) = $http->(<<'_EOC_');
    upstream api {
        consul_upstream api.service.consul;
        consul_upstream service=api;
    }
_EOC_
    isnt($rc, 0, 'http: the same query twice is refused');
    like($out, qr/\[emerg\] "consul_upstream" directive is duplicate: query "api\.service\.consul" is already in \Q$conf\E:6 in \Q$conf\E:7$/m,
         'naming the first line') or diag $out;

    # Another balancer beside consul_upstream: where this nginx has it, refused
    # in either order; where it does not, nginx's own "unknown directive".
    for my $case (['sticky cookie srv_id;', 'sticky', 1029006], ['least_time header;', 'least_time', 1031000]) {
        my ($line, $name, $since) = @$case;
        for my $order ([$line, 'consul_upstream api.service.consul;'], ['consul_upstream api.service.consul;', $line]) {
            ($rc, $out, $conf) = $http->("    upstream api {\n        $order->[0]\n        $order->[1]\n    }\n");
            isnt($rc, 0, "http: $order->[0] $order->[1] refused");
            my $msg = $vnum >= $since ? qr/"consul_upstream" cannot be combined with "\Q$name\E"/
                                      : qr/unknown directive "\Q$name\E"/;
            my $at = $vnum >= $since ? 7 : ($order->[0] eq $line ? 6 : 7);
            like($out, qr/\[emerg\] $msg in \Q$conf\E:$at$/m, "clearly, at line $at (nginx $version)") or diag $out;
        }
    }

    # An http and a stream upstream of the same name: both fine (zones,
    # status entries and log lines of their own); one state file for both is
    # refused, naming the other.
    ($rc, $out, $conf) = $http->(<<'_EOC_', <<'_EOS_');
    upstream api { consul_upstream api.service.consul state=$TEST_NGINX_CONSUL_TMP/api.state; }
_EOC_
stream {
    upstream api { consul_upstream api.service.consul state=$TEST_NGINX_CONSUL_TMP/api-stream.state; }
    server { listen 127.0.0.1:1987; proxy_pass api; }
}
_EOS_
    is($rc, 0, 'an http and a stream upstream named "api": nginx -t passes') or diag $out;

    ($rc, $out, $conf) = $http->(<<'_EOC_', <<'_EOS_');
    upstream api { consul_upstream api.service.consul state=$TEST_NGINX_CONSUL_TMP/api.state; }
_EOC_
stream {
    upstream api { consul_upstream api.service.consul state=$TEST_NGINX_CONSUL_TMP/api.state; }
    server { listen 127.0.0.1:1987; proxy_pass api; }
}
_EOS_
    isnt($rc, 0, 'one state file for an http and a stream upstream: refused');
    like($out, qr/\[emerg\] state file "[^"]+\/api\.state" is already used by http upstream "api" in \Q$conf\E:9$/m,
         'naming the http upstream') or diag $out;

    ($rc, $out, $conf) = nginx_t(<<'_EOC_');
load_module $TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream api { consul_upstream api.service.consul state=$TEST_NGINX_CONSUL_TMP/api.state; }
    server { listen 127.0.0.1:1987; proxy_pass api; }
}
http {
    upstream api { consul_upstream api.service.consul state=$TEST_NGINX_CONSUL_TMP/api.state; }
    server { listen 127.0.0.1:1986; location / { proxy_pass http://api; } }
}
_EOC_
    isnt($rc, 0, 'the same, stream first: refused');
    like($out, qr/\[emerg\] state file "[^"]+\/api\.state" is already used by upstream "api" in \Q$conf\E:8$/m,
         'naming the stream upstream') or diag $out;

    # nginx's ip_hash is http's: in stream it stays an unknown directive.
    ($rc, $out, $conf) = nginx_t(<<'_EOC_');
load_module $TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream api {
        ip_hash;
        consul_upstream api.service.consul;
    }
    server { listen 127.0.0.1:1987; proxy_pass api; }
}
_EOC_
    isnt($rc, 0, 'ip_hash in stream is refused');
    like($out, qr/\[emerg\] "ip_hash" directive is not allowed here in \Q$conf\E:5$/m, "with nginx's message") or diag $out;

    # Methods and keepalive in every order, a backup server after hash: accepted.
    for my $body ('ip_hash; consul_upstream api.service.consul; keepalive 8;',
                  'keepalive 8; hash $request_uri; consul_upstream api.service.consul;',
                  'hash $request_uri consistent; server 127.0.0.1:8083 backup; consul_upstream api.service.consul;',
                  'consul_upstream api.service.consul; random two least_conn; keepalive 8; zone api 64k;') {
        ($rc, $out, $conf) = $http->("    upstream api { $body }\n");
        is($rc, 0, "http: accepted: $body") or diag $out;
    }
    ($rc, $out, $conf) = $http->("    upstream api {\n        hash \$request_uri;\n        server 127.0.0.1:8083 backup;\n    }\n");
    isnt($rc, 0, 'http: without consul_upstream, hash then a backup server is refused');
    like($out, qr/\[emerg\] balancing method does not support parameter "backup" in \Q$conf\E:7$/m,
         "with nginx's own message and line") or diag $out;
    # The same with only that backup server (nginx's message, not "no servers
    # in upstream" from initializing the block: checked before it, in both).
    ($rc, $out, $conf) = nginx_t(<<'_EOC_');
load_module $TEST_NGINX_CONSUL_MODULE;
events { }
stream {
    upstream api {
        random;
        server 127.0.0.1:8083 backup;
    }
    server { listen 127.0.0.1:1987; proxy_pass api; }
}
_EOC_
    like($out, qr/\[emerg\] balancing method does not support parameter "backup" in \Q$conf\E:6$/m,
         "stream, random then only a backup server: nginx's own message and line") or diag $out;
    ($rc, $out, $conf) = $http->("    upstream api {\n        keepalive 8 local;\n        consul_upstream api.service.consul;\n    }\n");
    if ($vnum >= 1029007) {
        is($rc, 0, 'keepalive N local (nginx >= 1.29.7): accepted') or diag $out;
    } else {
        like($out, qr/\[emerg\] invalid number of arguments in "keepalive" directive in \Q$conf\E:6$/m,
             "keepalive N local: nginx ${version}'s own refusal") or diag $out;
    }
}

run_tests();

__DATA__

=== TEST 1: unknown parameter
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul foo;   # emerg: invalid parameter "foo"
}



=== TEST 2: unknown key=value parameter
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul weight=2;   # emerg: invalid parameter "weight=2"
}



=== TEST 3: bad time in interval=
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul interval=abc;   # emerg: invalid parameter "interval=abc"
}



=== TEST 4: bad time in timeout=
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul
                    timeout=1x;   # emerg: invalid parameter "timeout=1x"
}



=== TEST 5: bad time in max_stale=
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul max_stale=soon;   # emerg: invalid parameter "max_stale=soon"
}



=== TEST 6: bad time in fail_timeout=
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul fail_timeout=ten;   # emerg: invalid parameter "fail_timeout=ten"
}



=== TEST 7: bad on_empty= value
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul on_empty=drop;   # emerg: invalid parameter "on_empty=drop"
}



=== TEST 8: bad on_error= value
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul on_error=retry;   # emerg: invalid parameter "on_error=retry"
}



=== TEST 9: bad max_fails= value
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul max_fails=many;   # emerg: invalid parameter "max_fails=many"
}



=== TEST 10: bad zone= size
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul zone=big;   # emerg: invalid parameter "zone=big"
}



=== TEST 11: resolver is a host name
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=consul.local;   # emerg: invalid resolver address "consul.local"
}



=== TEST 12: resolver port out of range
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:99999;   # emerg: invalid resolver address "127.0.0.1:99999"
}



=== TEST 13: resolver IPv6 without closing bracket
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=[::1:8600;   # emerg: invalid resolver address "[::1:8600"
}



=== TEST 14: second resolver bad, first fine
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul
                    resolver=127.0.0.1:8600
                    resolver=300.1.1.1;   # emerg: invalid resolver address "300.1.1.1"
}



=== TEST 15: duplicate directive, naming the earlier line
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul;
    consul_upstream redis.service.yunlu_office.consul;
}
--- must_die
--- error_log eval
qr/\[emerg\] \d+#\d+: "consul_upstream" directive is duplicate: query "redis\.service\.yunlu_office\.consul" is already in \S*\/stream\.conf:3 in \S*\/stream\.conf:4\s*$/



=== TEST 15b: the same query twice, with other parameters, is a duplicate too
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul;
    consul_upstream redis.service.yunlu_office.consul interval=5s;
}
--- must_die
--- error_log eval
qr/\[emerg\] \d+#\d+: "consul_upstream" directive is duplicate: query "redis\.service\.yunlu_office\.consul" is already in \S*\/stream\.conf:3 in \S*\/stream\.conf:4\s*$/



=== TEST 15d: the same query written another way is a duplicate, naming the earlier line
--- stream_config
upstream redis {
    consul_upstream service=redis datacenter=yunlu_office;
    consul_upstream interval=2s
                    Redis.Service.Yunlu_Office.Consul.;
}
--- must_die
--- error_log eval
qr/\[emerg\] \d+#\d+: "consul_upstream" directive is duplicate: query "redis\.service\.yunlu_office\.consul" is already in \S*\/stream\.conf:3 in \S*\/stream\.conf:5\s*$/



=== TEST 15e: two queries whose 32-bit tags collide are two lines (main: "cannot be told apart")
--- stream_config
upstream redis {
    consul_upstream s31597.service.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    consul_upstream s618190.service.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- no_error_log
[emerg]



=== TEST 15f: a service name where the query goes
--- stream_config
upstream redis {
    consul_upstream redis resolver=127.0.0.1:8600;   # emerg: invalid parameter "redis": a query is an SRV name such as "redis.service.consul", or use "service=redis"
}



=== TEST 15g: a repeated unit in a time, as nginx's own times refuse it
--- stream_config
upstream redis {
    consul_upstream redis.service.consul interval=1s1s;   # emerg: invalid parameter "interval=1s1s"
}



=== TEST 15h: units out of order in a time, as nginx's own times refuse them
--- stream_config
upstream redis {
    consul_upstream redis.service.consul timeout=30s1m;   # emerg: invalid parameter "timeout=30s1m"
}



=== TEST 15i: tcp and udp together
--- stream_config
upstream redis {
    consul_upstream redis.service.consul tcp udp;   # emerg: "tcp" and "udp" cannot both be given
}



=== TEST 15j: a parameter given twice is named as written, without a stray "="
--- stream_config
upstream redis {
    consul_upstream redis.service.consul interval=1s interval=2s;   # emerg: duplicate parameter "interval"
}



=== TEST 15k: max_conns= is a count as nginx reads it (no sign), as max_fails= is
--- stream_config
upstream redis {
    consul_upstream redis.service.consul max_conns=+3;   # emerg: invalid parameter "max_conns=+3"
}



=== TEST 15l: a parameter's own name alone is not taken for a service name
--- stream_config
upstream redis {
    consul_upstream max_conns;   # emerg: invalid parameter "max_conns"
}



=== TEST 15m: a flag of an API line given twice
--- stream_config
upstream redis {
    consul_upstream service=redis api=http://127.0.0.1:8500 only_passing only_passing;   # emerg: duplicate parameter "only_passing"
}



=== TEST 15c: upstream-wide parameters only on the first line
--- stream_config
upstream redis {
    consul_upstream redis.service.dc1.consul;
    consul_upstream redis.service.dc2.consul zone=128k;   # emerg: invalid parameter "zone=128k": it belongs on the first "consul_upstream" line of the upstream
}



=== TEST 16: directive in stream {}
--- stream_config
consul_upstream redis.service.yunlu_office.consul;   # emerg: "consul_upstream" directive is not allowed here
upstream redis { server 127.0.0.1:6380; }



=== TEST 17: directive in server {}
--- stream_config
upstream redis { server 127.0.0.1:6380; }
--- stream_server_config
    consul_upstream redis.service.yunlu_office.consul;   # emerg: "consul_upstream" directive is not allowed here
    proxy_pass redis;



=== TEST 18: directive in an http location (http upstreams take it since issue 17, nothing else)
--- http_config
upstream web { server 127.0.0.1:8081; }
--- config
location /x {
    consul_upstream web.service.yunlu_office.consul;
}
--- stream_config
upstream redis { server 127.0.0.1:6380; }
--- must_die
--- error_log eval
qr/\[emerg\] \d+#\d+: "consul_upstream" directive is not allowed here in \S+nginx\.conf:\d+/



=== TEST 19: nginx's balancing methods beside consul_upstream, before or after it, start
--- stream_config
upstream redis {
    hash $remote_addr;
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream b {
    consul_upstream b.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    hash $remote_addr consistent;
}
upstream c {
    least_conn;
    consul_upstream c.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream d {
    consul_upstream d.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    least_conn;
}
upstream e {
    random two least_conn;
    consul_upstream e.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
upstream f {
    consul_upstream f.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
    random;
}
upstream plain_hash {
    hash $remote_addr;
    server 127.0.0.1:6380;
}
--- no_error_log
[emerg]
load balancing method redefined



=== TEST 20: nginx still checks its directives' arguments
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul;
    hash $remote_addr sometimes;   # emerg: invalid parameter "sometimes"
}



=== TEST 22: random's arguments are nginx's
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul;
    random two most_conn;   # emerg: invalid parameter "most_conn"
}



=== TEST 23: slow_start= is upstream-wide
--- stream_config
upstream redis {
    consul_upstream redis.service.dc1.consul slow_start=30s;
    consul_upstream redis.service.dc2.consul slow_start=30s;   # emerg: invalid parameter "slow_start=30s": it belongs on the first "consul_upstream" line of the upstream
}



=== TEST 25: invalid query: empty label
--- stream_config
upstream redis {
    consul_upstream redis..service.yunlu_office.consul;   # emerg: invalid query "redis..service.yunlu_office.consul"
}



=== TEST 26: invalid query: character outside a DNS name
--- stream_config
upstream redis {
    consul_upstream "re dis.service.consul";   # emerg: invalid query "re dis.service.consul"
}



=== TEST 27: invalid query: label longer than 63
--- stream_config
upstream redis {
    consul_upstream aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.service.consul;   # emerg: invalid query "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.service.consul"
}



=== TEST 28: service= with a dot
--- stream_config
upstream redis {
    consul_upstream service=redis.primary;   # emerg: invalid parameter "service=redis.primary"
}



=== TEST 29: zone= too small (nginx needs 32k)
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul zone=1k;
}
--- must_die
--- error_log eval
qr/\[emerg\] \d+#\d+: invalid parameter "zone=1k"(?::[^"]*)? in \S*\/stream\.conf:3\s*$/



=== TEST 29b: zone= too large
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul zone=2g;   # emerg: invalid parameter "zone=2g"
}



=== TEST 29c: interval= longer than nginx's timers can take
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul interval=9223372036854775s;   # emerg: invalid parameter "interval=9223372036854775s": at most 24d is allowed
}



=== TEST 29d: max_stale= and fail_timeout= are bounded too
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul fail_timeout=25d;   # emerg: invalid parameter "fail_timeout=25d": at most 24d is allowed
}



=== TEST 29e: one state file for two upstreams
--- stream_config
upstream a {
    consul_upstream a.service.consul state=$TEST_NGINX_CONSUL_TMP/x.state;
}
upstream redis {
    consul_upstream b.service.consul state=$TEST_NGINX_CONSUL_TMP/x.state;
}
--- must_die
--- error_log eval
qr/\[emerg\] \d+#\d+: state file "[^"]+\/x\.state" is already used by upstream "a" in \S*\/stream\.conf:6\s*$/



=== TEST 29f: one state file under two spellings: ".", "..", "//"
--- setup
use File::Path qw(make_path);
make_path("$Test::Nginx::Consul::TmpDir/st/sub");
--- stream_config
upstream a {
    consul_upstream a.service.consul state=$TEST_NGINX_CONSUL_TMP/st/s.state;
}
upstream b {
    consul_upstream b.service.consul state=$TEST_NGINX_CONSUL_TMP/./st/sub/..//s.state;
}
upstream redis {
    consul_upstream c.service.consul state=$TEST_NGINX_CONSUL_TMP/st/c.state;
}
--- must_die
--- error_log eval
qr/\[emerg\] \d+#\d+: state file "[^"]+\/\.\/st\/sub\/\.\.\/\/s\.state" is already used by upstream "a" \(as "[^"]+\/st\/s\.state"\) in \S*\/stream\.conf:6\s*$/



=== TEST 29g: one state file through a symbolic link to its directory
--- setup
use File::Path qw(make_path);
make_path("$Test::Nginx::Consul::TmpDir/st");
unlink "$Test::Nginx::Consul::TmpDir/link";
symlink("$Test::Nginx::Consul::TmpDir/st", "$Test::Nginx::Consul::TmpDir/link") or die "symlink: $!";
--- stream_config
upstream a {
    consul_upstream a.service.consul state=$TEST_NGINX_CONSUL_TMP/st/s.state;
}
upstream redis {
    consul_upstream b.service.consul state=$TEST_NGINX_CONSUL_TMP/link/s.state;
}
--- must_die
--- error_log eval
qr/\[emerg\] \d+#\d+: state file "[^"]+\/link\/s\.state" is already used by upstream "a" \(as "[^"]+\/st\/s\.state"\) in \S*\/stream\.conf:6\s*$/



=== TEST 29h: a directory that does not exist yet is judged as written
--- stream_config
upstream a {
    consul_upstream a.service.consul state=$TEST_NGINX_CONSUL_TMP/later/s.state;
}
upstream redis {
    consul_upstream b.service.consul state=$TEST_NGINX_CONSUL_TMP/later/x/../s.state;
}
--- must_die
--- error_log eval
qr/\[emerg\] \d+#\d+: state file "[^"]+\/later\/x\/\.\.\/s\.state" is already used by upstream "a" \(as "[^"]+\/later\/s\.state"\) in \S*\/stream\.conf:6\s*$/



=== TEST 30: a valid upstream starts (and the error log names no emerg)
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
--- no_error_log
[emerg]
[error]
