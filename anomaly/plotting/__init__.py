"""Figure style and saving. A plot is a function from a result object to a Figure."""

from anomaly.plotting.style import PALETTE, apply_style, save_figure

__all__ = ["PALETTE", "apply_style", "save_figure"]
