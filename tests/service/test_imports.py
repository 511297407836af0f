"""The service's optional parts stay optional: the engine package imports neither FastAPI nor torch."""

import subprocess
import sys


def test_importing_graphflow_and_its_queue_loads_neither_fastapi_nor_torch() -> None:
    code = ("import sys, graphflow, graphflow.cli, graphflow.service.queue, graphflow.service.results; "
            "print(sorted(m for m in ('fastapi', 'torch', 'uvicorn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
