"""aiop: a graph-based performance predictor for training deep networks under a memory budget."""

__version__ = "0.1.0"
