#!/usr/bin/env python3
"""Parses Prometheus text exposition format (stdin) with the prometheus_client
package's parser and prints it as JSON for the tests:

    {"families": {"NAME": {"type": "counter", "help": "..."}},
     "samples": [["NAME_total", {"label": "value"}, 3.0, "NAME"], ...]}

Exits 1 with a message on stderr when the text does not parse, when a family
has no TYPE or no HELP line, or when a series appears twice.
scripts/setup.sh installs prometheus_client into t/python.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def main():
    text = sys.stdin.read()
    families = {}
    samples = []
    seen = set()
    try:
        for fam in text_string_to_metric_families(text):
            if fam.type == "unknown":
                raise ValueError(f"{fam.name}: no TYPE line")
            if not fam.documentation:
                raise ValueError(f"{fam.name}: no HELP line")
            if fam.name in families:
                raise ValueError(f"{fam.name}: family given twice")
            families[fam.name] = {"type": fam.type, "help": fam.documentation}
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key in seen:
                    raise ValueError(f"{s.name}{s.labels}: series given twice")
                seen.add(key)
                samples.append([s.name, s.labels, s.value, fam.name])
    except ValueError as e:
        print(f"promparse: {e}", file=sys.stderr)
        return 1
    json.dump({"families": families, "samples": samples}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
