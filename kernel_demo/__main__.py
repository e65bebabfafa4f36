"""``python -m kernel_demo install [--user | --sys-prefix | --prefix P]`` and
``python -m kernel_demo -f CONNECTION_FILE [--trace-file PATH]``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from jupyter_client.kernelspec import KernelSpecManager

from . import logo

NAME = "kernel_demo"


def install(user: bool = False, prefix: str | None = None) -> str:
    """Write the kernelspec and install it; return the directory it went to."""
    spec = {
        "argv": [sys.executable, "-m", "kernel_demo", "-f", "{connection_file}"],
        "display_name": "Python (kernel_demo)",
        "language": "python",
        "interrupt_mode": "signal",
        # supported_encryption: jupyter_client may give it CurveZMQ keys (transport_encryption).
        "metadata": {"debugger": False, "supported_encryption": "curve"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump(spec, f, indent=1)
        for name in logo.FILES:  # the launcher's card shows the logo
            shutil.copy(os.path.join(logo.RESOURCES, name), tmp)
        return KernelSpecManager().install_kernel_spec(tmp, NAME, user=user, prefix=prefix)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["install"]:
        parser = argparse.ArgumentParser(prog="python -m kernel_demo install", description="install the kernelspec")
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--user", action="store_true", help="for this user (~/.local/share/jupyter)")
        where.add_argument("--sys-prefix", action="store_true", help="into this Python environment")
        where.add_argument("--prefix", help="under this prefix (PREFIX/share/jupyter/kernels)")
        options = parser.parse_args(args[1:])
        prefix = sys.prefix if options.sys_prefix else options.prefix
        path = install(user=options.user, prefix=prefix)
        print(f"installed kernelspec {NAME} in {path}")
        return 0
    parser = argparse.ArgumentParser(prog="python -m kernel_demo", description="run the kernel")
    parser.add_argument("-f", dest="connection_file", required=True, help="the connection file")
    parser.add_argument("--trace-file", help="also append every dispatch record to this file, as JSON lines")
    # `jupyter run --kernel kernel_demo a.py` passes its file names to the kernel too, then sends each
    # file's code as an execute_request; the kernel runs code only from requests, so it ignores them.
    parser.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    options = parser.parse_args(args)
    from .kernel import main as run

    run(options.connection_file, options.trace_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
