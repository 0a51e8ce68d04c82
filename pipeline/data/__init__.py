"""Data layer: the shard format (`shards`), ingest of real images (`ingest`, the `prepare` command) and the
streaming loader (`loader.StreamingLoader`). Import the submodules directly; this package imports nothing
heavy so that `python -m pipeline --help` stays fast."""
