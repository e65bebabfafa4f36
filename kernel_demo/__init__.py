"""A small, real Jupyter kernel that shows how a kernel's event loop dispatches messages.

Written directly on pyzmq, Tornado's IOLoop and jupyter_client's ``Session`` — not on ipykernel's
``Kernel`` base class — so the whole life of a message is in plain sight in :mod:`kernel_demo.kernel`.
"""

__version__ = "0.1.0"
