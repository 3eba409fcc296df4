"""`python -m esta ...` (and `torchrun -m esta train ...`): the esta command line."""
import sys

from esta.cli import main

sys.exit(main())
