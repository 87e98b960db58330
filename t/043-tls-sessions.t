# TLS session reuse to discovered peers (issue 16, item 8): under `proxy_ssl on`
# each worker keeps one session per peer, as nginx's round robin does for
# static servers, and offers it on the next connection to that same peer only.
#
# The backend is `openssl s_server -www` on *:7443: one process behind two
# peers, 127.0.0.1:7443 and 127.0.0.2:7443, so that a session of one peer
# offered to the other would be resumed, and show. Its page says "New, TLS..."
# for a full handshake and "Reused, TLS..." for a resumed one. The certificate
# is made at test time.
use lib 't/lib';
use Test::Nginx::Consul 'no_plan';
use Time::HiRes qw(time sleep);
use IO::Select ();
use POSIX ();

our $NAME = 'redis.service.yunlu_office.consul';
our ($TlsPid, $TlsOwner);

# A self-signed certificate and s_server on port 7443 of every address.
sub tls_start {
    return if $TlsPid && kill 0, $TlsPid;
    my $dir = "$TmpDir/tls";
    mkdir $dir;
    system('openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
           '-nodes', '-days', '1', '-subj', '/CN=backend', '-keyout', "$dir/key.pem",
           '-out', "$dir/cert.pem") == 0 or die "openssl req failed\n"
        unless -f "$dir/cert.pem";
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', "$dir/s_server.log";
        open STDERR, '>&', \*STDOUT;
        exec('openssl', 's_server', '-accept', '7443', '-cert', "$dir/cert.pem",
             '-key', "$dir/key.pem", '-www') or POSIX::_exit(127);
    }
    ($TlsPid, $TlsOwner) = ($pid, $$);
    wait_until(sub { IO::Socket::INET->new(PeerAddr => '127.0.0.2', PeerPort => 7443, Proto => 'tcp') }, 5)
        or die "s_server does not listen\n";
}

END {
    if ($TlsPid && $$ == $TlsOwner) {
        local $?;
        kill 'TERM', $TlsPid;
        waitpid $TlsPid, 0;
    }
}

# One connection through nginx (stream port, or PORT): 'New' or 'Reused' as
# the backend saw the handshake, or 'fail'.
sub handshake {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port // stream_port(),
                                  Proto => 'tcp', Timeout => 3) or return 'fail';
    syswrite $s, "GET / HTTP/1.0\r\n\r\n";
    my ($page, $sel) = ('', IO::Select->new($s));
    while ($sel->can_read(5)) {
        sysread($s, $page, 65536, length $page) or last;
    }
    close $s;
    return $page =~ /^(New|Reused), TLS/m ? $1 : 'fail';
}

sub handshakes {
    my ($n, $port) = @_;
    return join ' ', map { handshake($port) } 1 .. $n;
}

# The SRV record of ADDR (127.0.0.x:7443) added or removed, in one update.
sub srv { "$NAME. 0 SRV 1 1 7443 " . sprintf('7f0000%02x', (split /\./, $_[0])[3]) . ".addr.yunlu_office.consul." }

run_tests();

__DATA__

=== TEST 1: sessions are resumed with the peer that issued them, never with another one, never after the peer left
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:7443
7f000002.addr.yunlu_office.consul. 0 IN A 127.0.0.2
--- setup
main::tls_start();
--- stream_config
log_format peer $upstream_addr;
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=200ms;
}
upstream static {
    server 127.0.0.3:7443;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass static;
    proxy_ssl on;
}
--- stream_server_config
proxy_pass redis;
proxy_ssl on;
access_log logs/peers.log peer;
--- check
is(main::handshakes(3, 1990), 'New Reused Reused', "nginx's own round robin resumes with this backend");
ok(wait_for_log(qr/1 peer from/, 5), 'one peer discovered');
is(main::handshakes(4), 'New Reused Reused Reused', 'a discovered peer: one full handshake, then resumed');

nsupdate('update delete ' . main::srv('127.0.0.1'), 'update add ' . main::srv('127.0.0.2'));
ok(wait_for_log(qr/\(generation 2\)/, 5), 'the instance moved to another address');
is(main::handshakes(2), 'New Reused', "the new address: a full handshake (the old peer's session is not offered)");

nsupdate('update delete ' . main::srv('127.0.0.2'), 'update add ' . main::srv('127.0.0.1'));
ok(wait_for_log(qr/\(generation 3\)/, 5), 'and back');
is(main::handshakes(2), 'New Reused', 'a peer that left and came back: a full handshake (its old session was dropped)');

nsupdate('update add ' . main::srv('127.0.0.2'));
ok(wait_for_log(qr/\(generation 4\)/, 5), 'both peers');
my $mark = -s "$Test::Nginx::Util::ServRoot/logs/peers.log";
my @got = split / /, main::handshakes(8);
open my $fh, '<', "$Test::Nginx::Util::ServRoot/logs/peers.log" or die;
seek $fh, $mark, 0;
chomp(my @peers = <$fh>);
close $fh;
is(scalar(@peers), 8, 'eight connections logged');
my %by;
push @{ $by{ $peers[$_] } }, $got[$_] for 0 .. $#got;
is(join(' ', @{ $by{'127.0.0.1:7443'} // [] }), 'Reused Reused Reused Reused',
   'the peer that stayed keeps its session across the set change');
is(join(' ', @{ $by{'127.0.0.2:7443'} // [] }), 'New Reused Reused Reused',
   'the newcomer: one full handshake');
--- no_error_log
[error]



=== TEST 2: proxy_ssl_session_reuse off: every handshake is a full one
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:7443
--- setup
main::tls_start();
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT;
}
server {
    listen 127.0.0.1:1990;
    proxy_pass redis;
    proxy_ssl on;
}
--- stream_server_config
proxy_pass redis;
proxy_ssl on;
proxy_ssl_session_reuse off;
--- check
ok(wait_for_log(qr/1 peer from/, 5), 'discovered');
is(main::handshakes(3), 'New New New', 'no session offered');
is(main::handshakes(3, 1990), 'New Reused Reused', 'another server of the same upstream with reuse on');
--- no_error_log
[error]



=== TEST 3: two workers, each with its own sessions; a peer's session survives a weight change
--- workers: 2
--- stream_listen_options: reuseport
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:7443
--- setup
main::tls_start();
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=200ms;
}
--- stream_server_config
proxy_pass redis;
proxy_ssl on;
--- check
ok(wait_for_log(qr/1 peer from/, 5), 'discovered');
my @got = split / /, main::handshakes(20);
my $new = grep { $_ eq 'New' } @got;
ok($new >= 1 && $new <= 2, "at most one full handshake per worker: $new of 20") or diag "@got";
is(scalar(grep { $_ eq 'fail' } @got), 0, 'none failed');
nsupdate('update delete ' . main::srv('127.0.0.1'),
         "update add $::NAME. 0 SRV 1 5 7443 7f000001.addr.yunlu_office.consul.");
ok(wait_for_log(qr/\(generation 2\)/, 5), 'weight 5: a new set, the same peer');
@got = split / /, main::handshakes(20);
is(scalar(grep { $_ ne 'Reused' } @got), 0, 'every handshake resumed') or diag "@got";
--- no_error_log
[error]



=== TEST 4: a peer that takes over the slot of one that left never gets the leaver's session
zone=32k holds 128 peers: with 128 in the set, the one that joins as another
leaves takes the leaver's slot (under a new epoch), and back again.
--- dns
instance redis.service.yunlu_office.consul 127.0.0.1:7443
instance redis.service.yunlu_office.consul 127.0.1.1-127:7443 priority=2
7f000002.addr.yunlu_office.consul. 0 IN A 127.0.0.2
--- setup
main::tls_start();
--- stream_config
upstream redis {
    consul_upstream redis.service.yunlu_office.consul resolver=127.0.0.1:$TEST_NGINX_DNS_PORT interval=200ms zone=32k;
}
--- stream_server_config
proxy_pass redis;
proxy_ssl on;
--- check
ok(wait_for_log(qr/zone=32k holds 128 peers/, 5), 'the zone holds 128 peers');
ok(wait_for_log(qr/128 peers from/, 5), 'and the set has 128');
is(main::handshakes(2), 'New Reused', 'priority 1: one full handshake, then resumed');
nsupdate('update delete ' . main::srv('127.0.0.1'), 'update add ' . main::srv('127.0.0.2'));
ok(wait_for_log(qr/\(generation 2\)/, 5), 'another instance in its place');
is(main::handshakes(2), 'New Reused', "the newcomer in the leaver's slot: a full handshake");
nsupdate('update delete ' . main::srv('127.0.0.2'), 'update add ' . main::srv('127.0.0.1'));
ok(wait_for_log(qr/\(generation 3\)/, 5), 'and back');
is(main::handshakes(2), 'New Reused', "the first one again, in the same slot: a full handshake");
--- no_error_log
[error]
