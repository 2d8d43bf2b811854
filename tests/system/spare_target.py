"""What a spare becomes in tests/system/test_spares.py: says who it is, from its
environment, on stdout (the replica's log), and stays up until SIGTERM."""

import os
import signal
import sys

print(f"became {os.environ['SPARE_TEST_REPLICA']} as {sys.argv[0].rsplit('/', 1)[-1]}", flush=True)
signal.sigwait({signal.SIGTERM})
