"""Drive the demo kernel with jupyter-client and print its dispatch trace.

    python examples/dispatch_trace.py

Installs the kernelspec into a temporary prefix, starts the kernel the way JupyterLab would, sends a
few requests — one of them while a cell is busy awaiting — and prints how the kernel dispatched
each message: on which channel it arrived, which handler took it, how long it waited and ran, and
what was sent back.
"""

from __future__ import annotations

import os
import tempfile
import time

from concur_magics.frontend import running_kernel
from kernel_demo.__main__ import install

os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")


def main() -> None:
    with tempfile.TemporaryDirectory() as prefix:
        kernels = os.path.dirname(install(prefix=prefix))
        with running_kernel("kernel_demo", kernel_dirs=[kernels]) as kernel:
            client = kernel.client
            print("kernel_info:", client.kernel_info(reply=True, timeout=10)["content"]["implementation"])
            kernel.execute("total = sum(range(10))")
            # A cell that awaits leaves the loop free: a completion is answered meanwhile.
            busy = kernel.execute("import asyncio\nawait asyncio.sleep(1)\ntotal", wait=False)
            time.sleep(0.2)
            matches = client.complete("tot", reply=True, timeout=10)["content"]["matches"]
            print("completed while the cell awaited:", matches, "| cell replied yet:", busy.reply is not None)
            kernel.wait(busy, timeout=30)
            print("the cell's value:", busy.results[-1]["text/plain"])
            # The last five records are this script's own requests. Before them come the
            # kernel_info_requests that wait_for_ready() sent (one, or more on a busy machine):
            # `%dispatch 20` shows those too.
            trace = kernel.execute("%dispatch 5")
            print()
            print(trace.results[0]["text/plain"])  # the table; the records are in the same output, as data


if __name__ == "__main__":
    main()
