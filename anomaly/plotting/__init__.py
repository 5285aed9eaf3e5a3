"""Figure style and saving. A plot is a function from a result object to a Figure.

The style context itself is ``anomaly.plotting.style.style`` (not re-exported here: the name
would hide the submodule).
"""

from anomaly.plotting.style import PALETTE, Registry, apply_style, save_figure, save_figures, styled

__all__ = ["PALETTE", "Registry", "apply_style", "save_figure", "save_figures", "styled"]
