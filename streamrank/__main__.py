import sys

from streamrank.cli import main

sys.exit(main())
