"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel and shows what it promises.

The kernel is this Python (a kernel spec written to a temporary directory
runs `sys.executable -m ipykernel_launcher`) and imports the armorm these
tests import. Any cell error fails the test; each cell tagged "html" must
show an HTML table and each cell tagged "plot" exactly one PNG image. The
notebook is committed without outputs, as examples/make_quickstart.py writes it.
"""
from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the test extra: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in the test extra: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="ipykernel is in the test extra: pip install -e '.[test]'")
pytest.importorskip("matplotlib", reason="matplotlib is in the test extra: pip install -e '.[test]'")

import armorm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _kernel_manager(tmp_path: Path):
    """A KernelManager for a kernel on this interpreter that imports this checkout's armorm."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    spec_dir = tmp_path / "kernels" / "armorm-test"
    spec_dir.mkdir(parents=True)
    pkg_root = str(Path(armorm.__file__).resolve().parent.parent)
    path = os.pathsep.join([pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "armorm test", "language": "python",
            "env": {"PYTHONPATH": path}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="armorm-test", kernel_spec_manager=ksm)


def test_notebook_is_committed_clean_and_generated():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import make_quickstart
    finally:
        sys.path.pop(0)
    assert NOTEBOOK.read_text(encoding="utf-8") == make_quickstart.text(), \
        "examples/quickstart.ipynb differs from what examples/make_quickstart.py writes: run the script"
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source


def test_notebook_runs_and_shows_tables_and_plots(tmp_path):
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    html_cells = plot_cells = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{cell.source!r}: {errors}"
        tags = cell.metadata.get("tags", [])
        rich = [o for o in cell.outputs if o.output_type in ("execute_result", "display_data")]
        if "html" in tags:
            html_cells += 1
            pages = [o.data["text/html"] for o in rich if "text/html" in o.data]
            assert pages, f"{cell.source!r} showed no HTML"
            assert "<table" in pages[-1] and "<script" not in pages[-1].lower(), cell.source
        if "plot" in tags:
            plot_cells += 1
            images = [o.data["image/png"] for o in rich if "image/png" in o.data]
            assert len(images) == 1, f"{cell.source!r} showed {len(images)} images, expected one"
            png = base64.b64decode(images[0])
            assert png.startswith(PNG_MAGIC) and len(png) > 10_000, cell.source
    assert html_cells >= 5 and plot_cells == 3
    # the plain-text form is short (one line) and the model card's call gives its dict
    printed = next(c for c in nb.cells if c.cell_type == "code" and c.source == "print(out)")
    text = "".join(o.get("text", "") for o in printed.outputs)
    assert text.startswith("RewardOutput(3 rows") and text.count("\n") == 1
