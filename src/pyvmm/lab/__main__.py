import sys

from pyvmm.lab.cli import main

sys.exit(main())
