"""The stages of ``fit``, one module each, in the order ``tlpipe.pipeline.fit`` runs them over one
``FitContext`` (``context``): ``prepare``, ``sample``, ``choose``, ``diagnose``, ``planning``, ``train``,
``extend``, ``check``, ``record``.
Each takes the context and the records before it and returns a new typed record."""
