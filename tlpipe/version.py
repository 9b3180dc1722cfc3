"""tlpipe's version, in a leaf module: what records and bundles stamp, importable from anywhere
without reaching back up to the package face."""
__version__ = "0.1.0"
