"""``python -m pypool_worker --app <module or file.py> [--transport stdio|ipc|zmq] [--max-in-flight N]``

Remote zmq workers add ``--connect tcp://HOST:PORT --secret-file FILE [--workers N]``.
"""

import os
import sys

if not __package__:
    # Started as a file path (python .../pypool_worker/__main__.py): make the package importable
    # and keep the package directory itself off sys.path so `protocol` is not a top-level module.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from pypool_worker.runtime import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
