"""pypool_worker: serve Python functions to a pypool pool.

Write handlers in a module::

    from pypool_worker import handler

    @handler
    def predict(features, ctx):
        return model.predict(features)

and the pool starts workers with ``python -m pypool_worker --app that_module``. See PROTOCOL.md in
the pypool repository for the wire protocol this package speaks.
"""

# Set before the submodules are imported: runtime reads it for HELLO.
__version__ = "0.1.0"

from .protocol import FrameTooLarge, ProtocolError  # noqa: E402
from .runtime import Cancelled, Context, handler  # noqa: E402

__all__ = ["handler", "Context", "Cancelled", "ProtocolError", "FrameTooLarge", "__version__"]
