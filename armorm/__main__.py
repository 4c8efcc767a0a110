"""`python -m armorm ...` runs the `armorm` command line."""
import sys

from .cli import main

sys.exit(main())
