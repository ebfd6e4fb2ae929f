"""A prediction in a fresh Python process, and which heavy modules it imported: the check that the cached
engine's path (predict, the server's start) runs without TensorFlow, Keras or SciPy."""

import json
import subprocess
import sys


def predict_in_child(model: str, photo: str, *flags: str, then: str = "",
                     modules=("tensorflow", "keras", "scipy")) -> tuple[list, dict, subprocess.CompletedProcess]:
    """(rows, {module: imported}, the process) of ``transferkit predict MODEL PHOTO --format json FLAGS`` run by
    ``cli.main`` in a new interpreter, followed by the Python lines ``then``."""
    script = ("import json, sys\n"
              "from transferkit.apps.cli import main\n"
              f"main({['predict', model, photo, '--format', 'json', *flags]!r})\n"
              f"{then}"
              f"print(json.dumps({{m: m in sys.modules for m in {tuple(modules)!r}}}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows_text, _, found = proc.stdout.rpartition("\n{")
    return json.loads(rows_text), json.loads("{" + found), proc
