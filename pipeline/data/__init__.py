"""Data layer: the shard format (`shards`), ingest of real images (`ingest`, the `prepare` command) and the
streaming loader (`loader.StreamingLoader`), shard locations as URLs (`urls`) and remote destinations
(`destination`). Import the submodules directly; this package imports nothing
heavy so that `python -m pipeline --help` stays fast."""
