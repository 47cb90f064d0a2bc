import sys

from postembed_fast.backfill.job import main

sys.exit(main())
