import sys

from falcon_mamba.cli import main

sys.exit(main())
