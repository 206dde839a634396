import sys

from engram_sidecar.main import run

sys.exit(run())
