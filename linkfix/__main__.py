import sys

from linkfix.cli import main

sys.exit(main())
