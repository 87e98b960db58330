# README.zh-CN.md documents the same consul_upstream parameters as README.md.
#
# From each file: the parameters of the "Syntax:" block (name=..., and the bare
# words of [a | b] alternatives such as tcp | udp) and those of the parameter
# list that follows it (lines starting with "- `"), up to the next "## " heading.
# A parameter in one file and not in the other fails the test. No nginx needed.
use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);

my $root = abs_path(dirname(abs_path(__FILE__)) . '/..');

sub read_text {
    my $file = shift;
    open my $fh, '<:encoding(UTF-8)', $file or die "cannot read $file: $!\n";
    local $/;
    return scalar <$fh>;
}

# (syntax params, list params) of one README, as hashes name => 1
sub documented {
    my $text = shift;
    my (%syntax, %list);
    my ($block) = $text =~ /^Syntax:\s*(consul_upstream\b.*?;)\s*$/ms
        or return ({}, {});
    $syntax{$1} = 1 while $block =~ /\b([a-z_]+)=/g;
    while ($block =~ /\[\s*([a-z_]+)\s*\|\s*([a-z_]+)\s*\]/g) {
        $syntax{$1} = $syntax{$2} = 1;
    }
    $syntax{query} = 1 if $block =~ /^consul_upstream\s+query\b/;

    my $after = substr($text, index($text, $block) + length $block);
    $after =~ s/^## .*//ms;    # up to the next section
    for my $line (grep { /^- `/ } split /\n/, $after) {
        while ($line =~ /`([^`]+)`/g) {
            my $span = $1;
            $list{$1} = 1 while $span =~ /\b([a-z_]+)=/g;
            $list{$span} = 1 if $span =~ /^[a-z_]+$/;
        }
    }
    return (\%syntax, \%list);
}

my %doc;
for my $f ('README.md', 'README.zh-CN.md') {
    my $text = read_text("$root/$f");
    my ($syntax, $list) = documented($text);
    $doc{$f} = { syntax => $syntax, list => $list, text => $text };
    # not vacuous: the parser found the reference
    ok(keys(%$syntax) >= 10, "$f: a Syntax block with the parameters ("
        . join(' ', sort keys %$syntax) . ')');
    ok(keys(%$list) >= 10, "$f: a parameter list (" . join(' ', sort keys %$list) . ')');
    my @unlisted = grep { !$list->{$_} } sort keys %$syntax;
    is("@unlisted", '', "$f: every parameter of the Syntax block is in the list");
}

my ($en, $zh) = @doc{'README.md', 'README.zh-CN.md'};
for my $part (qw(syntax list)) {
    my @missing_zh = grep { !$zh->{$part}{$_} } sort keys %{ $en->{$part} };
    my @missing_en = grep { !$en->{$part}{$_} } sort keys %{ $zh->{$part} };
    is("@missing_zh", '', "$part: every parameter of README.md is in README.zh-CN.md");
    is("@missing_en", '', "$part: every parameter of README.zh-CN.md is in README.md");
}

like($en->{text}, qr/\(README\.zh-CN\.md\)/, 'README.md links README.zh-CN.md');
like($zh->{text}, qr/\(README\.md\)/, 'README.zh-CN.md links README.md');

done_testing();
