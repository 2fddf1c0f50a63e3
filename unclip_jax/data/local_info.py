"""`tfds.core.DatasetInfo` for datasets this project builds itself, on local disk."""

from __future__ import annotations

import tensorflow_datasets as tfds


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo that never looks for pre-computed metadata on GCS.

    tfds' builder, before a first build, calls `initialize_from_bucket`, which makes a
    `tempfile.mkdtemp("tfds")` folder it never removes and then asks GCS for the dataset's
    info files: each build left an empty `/tmp/tmp*tfds` behind (and tried the network). The
    `shapes` and `image_text` builds are local by definition: their info comes from the code.
    """

    def initialize_from_bucket(self) -> None:
        """Nothing to fetch: the builder's code is the whole of the info."""
