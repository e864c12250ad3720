"""Prepare a data source into the versioned Parquet format with Ray Data (``disunknown-prepare``).

    python pipelines/prepare_data.py mnist --root ~/datasets --out prepared/mnist
    python pipelines/prepare_data.py image_folder --root photos --csv photos/labels.csv --out prepared/photos
    python pipelines/prepare_data.py SOURCE --help
"""
import sys

from pipelines.cli import prepare_main

if __name__ == "__main__":
    sys.exit(prepare_main())
