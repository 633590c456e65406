import sys

from latentkit.cli import main

sys.exit(main())
