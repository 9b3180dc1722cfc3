"""Answers about the data no other tool gives: wrong labels (``label_issues``), what more images would
buy (``learning_curve``), what to label next (``suggest``, written by ``labelling`` for ``tlpipe
suggest``) and why the model predicted a class (``heatmaps``); ``diagnosis`` is the record a fit
keeps of the first two. Unknown images are the bundle's own business (``tlpipe.bundle.unknowns``)."""
