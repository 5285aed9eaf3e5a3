"""Figure style and saving. A plot is a function from a result object to a Figure."""

from anomaly.plotting.style import PALETTE, Registry, apply_style, save_figure, save_figures, style, styled

__all__ = ["PALETTE", "Registry", "apply_style", "save_figure", "save_figures", "style", "styled"]
