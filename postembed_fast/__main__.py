"""`python -m postembed_fast ...` is the `postembed-fast` command (postembed_fast/cli.py)."""
import sys

from postembed_fast.cli import main

sys.exit(main())
