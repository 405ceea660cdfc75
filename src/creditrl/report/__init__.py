"""Reports built from rollouts and credit: the credit heat-map page (`heatmap`)."""

from creditrl.report.heatmap import render_heatmap, write_heatmap

__all__ = ["render_heatmap", "write_heatmap"]
