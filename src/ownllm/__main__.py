"""`python -m ownllm ...` runs the CLI (also what torchrun launches)."""

import sys

from ownllm.cli import main

sys.exit(main())
