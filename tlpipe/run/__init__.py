"""A fit's record: the output folder it owns (``folder.RunFolder``), what the record stage writes
there (``outputs``), the MLflow run and store it logs to (``tracking``, ``store``), the text and HTML
reports (``report``, ``html_report``; what the bundle commands print, ``bundle_report``), and the local servers for the MLflow UI and models (``servers``)."""
