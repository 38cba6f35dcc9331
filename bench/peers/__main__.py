"""``python -m bench.peers``: see :mod:`bench.peers` and :func:`bench.peers.driver.main`."""

import sys

if __name__ == "__main__":  # asv imports this module too while discovering benchmarks
    from bench.peers.driver import main

    sys.exit(main())
