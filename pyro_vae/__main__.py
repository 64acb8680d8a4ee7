"""``python -m pyro_vae``: the same as the ``pyro-vae`` command."""

from __future__ import annotations

import sys

from pyro_vae.app.cli import main

sys.exit(main())
