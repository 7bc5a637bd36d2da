"""``mmfuse serve``: a saved model behind an HTTP endpoint, with a web page, limits and metrics."""
