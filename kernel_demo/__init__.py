"""A small, real Jupyter kernel that shows how a kernel's event loop dispatches messages.

Not built yet: this package holds its place in the layout until its own issue lands.
"""
