"""The cache artifact, knowing nothing of training: one row (`row`), the Arrow schema (`schema`), the manifest and
its fingerprints (`manifest`, `fingerprint`), local or fsspec storage (`storage`), the shard writer and the reader
(`writer`, `reader`), interrupted builds (`resume`, `durable`), distributed parts (`parts`), the codecs
(`codecs`), and publishing to the Hugging Face Hub (`hub`, tested against `hub_standin`). The format is specified in
docs/cache-format.md; sharing in docs/sharing.md."""
