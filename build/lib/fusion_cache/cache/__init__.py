"""The cache artifact, knowing nothing of training: one row (`row`), the Arrow schema (`schema`), the manifest and
its fingerprints (`manifest`, `fingerprint`), local or fsspec storage (`storage`), the shard writer and the reader
(`writer`, `reader`), interrupted builds (`resume`, `durable`), distributed parts (`parts`) and the codecs
(`codecs`). The format is specified in docs/cache-format.md."""
