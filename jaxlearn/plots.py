"""Matplotlib figures people would rather look at than read.

Every function returns a `matplotlib.figure.Figure` and never shows it; pass
`path=` to save a PNG as well. matplotlib is imported lazily with the Agg
backend, so importing jaxlearn never opens a window or needs a display.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: str | Path | None):
    """Lay out the figure, save it as a PNG when a path is given, return it."""
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
