"""An app whose import fails, as when a worker's environment lacks a dependency.

The pool must report this as a start-up failure carrying the error (type ModuleNotFoundError,
message naming the module), not hang or retry forever.
"""

import missing_dependency_for_pypool_tests  # noqa: F401  (does not exist, on purpose)

from pypool_worker import handler


@handler
def unreachable():
    return None
