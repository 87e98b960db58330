#!/usr/bin/env python3
"""rusage.py OUT CMD [ARG...]: runs CMD (its output and exit status pass
through) and writes "MAXRSS_KB CPU_SECONDS WALL_SECONDS" of it to the file OUT.
The harness's nginx_t(TEXT, rusage => 1) uses it: Perl has no getrusage."""
import resource
import subprocess
import sys
import time

start = time.monotonic()
rc = subprocess.call(sys.argv[2:])
wall = time.monotonic() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as out:
    out.write("%d %.3f %.3f\n" % (ru.ru_maxrss, ru.ru_utime + ru.ru_stime, wall))
sys.exit(rc if rc >= 0 else 128 - rc)
