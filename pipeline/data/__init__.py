"""Data in: sources, the prepare stage, the prepared dataset as stages read it, shards, decoding, streams."""
