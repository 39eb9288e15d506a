"""``python -m ds01_cli image-update ...`` (the base image's launcher calls `main`)."""

import sys

from .commands import main

sys.exit(main())
