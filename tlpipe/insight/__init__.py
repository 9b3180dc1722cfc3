"""Answers about the data that come cheap from frozen codes: wrong labels (``label_issues``), what more
images would buy (``learning_curve``); ``diagnosis`` is the record a fit keeps of them."""
