"""``python -m bastion.demo``: the same as ``bastion demo``."""

import sys

from bastion.demo.cli import main

raise SystemExit(main(sys.argv[1:]))
