"""Integrations with other libraries (transformers). Importing this package imports none of them."""
