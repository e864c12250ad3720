"""The one exception type of the data layer.

Every message names what is at fault (file, row, column, value) so a user can
fix the input without reading code.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad or missing input data, or a prepared directory that cannot be used."""
