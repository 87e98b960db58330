#!/usr/bin/env bash
# Fuzzing of core's input parsers with cargo fuzz (libFuzzer + AddressSanitizer):
#   dns_message  DNS response bytes -> hickory's parser -> core::message -> SrvAnswer -> peers
#   settings     consul_upstream parameters -> Settings::parse (and back: round trip)
#   state_file   state file text -> state::decode (and back: round trip)
#   health_json  Consul's /v1/health/service JSON -> health::parse -> peers
#   http_response  an agent's HTTP response -> parse_head and the chunked decoder
#
#   scripts/fuzz.sh                 600 s per target (the documented run, t/README.md)
#   scripts/fuzz.sh 5               smoke run (scripts/test.sh does this)
#   scripts/fuzz.sh 60 settings     one target
#
# Only a stable toolchain is needed: cargo fuzz passes -Z flags (sanitizer,
# coverage), which stable rustc accepts with RUSTC_BOOTSTRAP=1.
# Seeds: fuzz/seeds/<target>/ (committed; dns_message's are real BIND answers,
# fuzz/capture-seeds.pl). The growing corpus: fuzz/corpus/<target>/ (not committed).
# A crash stops the run with libFuzzer's report; the input is in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -d "$HOME/.cargo/bin" ] && case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) PATH="$HOME/.cargo/bin:$PATH" ;; esac
export PATH RUSTC_BOOTSTRAP=1 CARGO_TERM_COLOR=never

seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(dns_message settings state_file health_json http_response)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

echo "fuzz: building the targets"
cargo fuzz build -O 2>&1 | tail -n 1

for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log=$(mktemp)
    t0=$SECONDS
    if ! cargo fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
            -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz $t: FAILED after $((SECONDS - t0)) s (input in fuzz/artifacts/$t/)"
        rm -f "$log"
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1)
    echo "fuzz $t: $runs cases in $((SECONDS - t0)) s, no crash ($cov, corpus $(ls "fuzz/corpus/$t" | wc -l) inputs)"
    rm -f "$log"
done
