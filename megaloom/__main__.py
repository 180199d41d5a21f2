import sys

from megaloom.cli import main

sys.exit(main())
