import sys

from lsquant.cli import main

sys.exit(main())
