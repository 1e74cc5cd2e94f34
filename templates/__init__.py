"""jinja2 templates (installed as mlci.templates): PR comment, job summary, starter files."""
