"""The report: aggregate curves over seeds (aggregate), draw the figures (figures), write Markdown/HTML (render)."""
