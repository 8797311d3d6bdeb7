"""`python -m rtserve module:app`: the same as the `rtserve` command."""

import sys

from .cli import main

sys.exit(main())
