import sys

from linkfix.entry import main

sys.exit(main())
