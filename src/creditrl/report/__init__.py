"""Reports: the credit heat-map page (`heatmap`) and the `creditrl compare` report (`compare_report`)."""

from creditrl.report.heatmap import render_heatmap, write_heatmap

__all__ = ["render_heatmap", "write_heatmap"]
