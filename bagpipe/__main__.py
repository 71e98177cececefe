import sys

from bagpipe.runner.cli import main

sys.exit(main())
