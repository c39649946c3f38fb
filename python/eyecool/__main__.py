import sys

from eyecool.cli import main

sys.exit(main())
