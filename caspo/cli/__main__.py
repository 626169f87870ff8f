"""``python -m caspo.cli``: the ``caspo`` command."""

import sys

from caspo.cli.main import main

sys.exit(main())
