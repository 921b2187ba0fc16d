"""Report files of a classification run: the comparison table (table.py) and its pictures (plots.py)."""
