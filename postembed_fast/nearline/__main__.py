import sys

from postembed_fast.nearline import main

sys.exit(main())
